import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import toy_accelerators  # noqa: E402


def pytest_generate_tests(metafunc):
    # Classes built on AcceleratorTesterMixin list their families; every `family` test runs once per family.
    families = getattr(metafunc.cls, "families", None)
    if "family" in metafunc.fixturenames and families is not None:
        metafunc.parametrize("family", families)


@pytest.fixture(autouse=True, scope="session")
def _toy_accelerators():
    toy_accelerators.register()
    yield
    toy_accelerators.unregister()


@pytest.fixture(autouse=True)
def _private_schedule_cache(tmp_path_factory, monkeypatch):
    # BAC caches first-call schedules on disk; each test gets its own folder, so no test reads another's schedule
    # (their inputs differ) and none writes to the user's ~/.cache.
    monkeypatch.setenv("ACCEL_CACHE_DIR", str(tmp_path_factory.mktemp("accel-cache")))
