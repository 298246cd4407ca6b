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
