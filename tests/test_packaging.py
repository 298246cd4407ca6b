"""What a non-editable install gets: the wheel holds one import package, ``accel``, with the reference models'
weights and cards as package data, and console scripts that point into it."""

from __future__ import annotations

import configparser
import importlib
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from accel.pipelines.reference import MODELS_DIR

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "runs", "*.egg-info", "__pycache__")


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> dict[str, bytes]:
    # Build from a copy, so the build's own folders (build/, *.egg-info) never land in the checkout.
    source = tmp_path_factory.mktemp("source") / "accel"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
                   check=True, capture_output=True)
    (wheel,) = out.glob("accel-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")}


def test_the_wheel_holds_no_top_level_package_but_accel(wheel_files):
    top_level = {name.split("/", 1)[0] for name in wheel_files}
    metadata = {name for name in top_level if name.endswith(".dist-info")}
    assert top_level - metadata == {"accel"}
    (dist_info,) = metadata
    declared = wheel_files.get(f"{dist_info}/top_level.txt", b"accel").decode().split()
    assert declared == ["accel"]
    assert not any(name.startswith("accel/") and "/training/" in name for name in wheel_files)  # scripts stay out


def test_the_wheel_ships_every_reference_model_file(wheel_files):
    shipped = sorted(path.relative_to(MODELS_DIR.parents[2]).as_posix()  # accel/pipelines/reference_models/...
                     for path in MODELS_DIR.rglob("*") if path.is_file() and not path.name.startswith("."))
    weights = [name for name in shipped if name.endswith(".safetensors")]
    cards = [name for name in shipped if name.endswith("README.md")]
    assert len(weights) >= 3 and len(cards) >= 3  # digits-dit, moving-digits, the digit classifier
    missing = [name for name in shipped if name not in wheel_files]
    assert not missing, f"not in the wheel: {missing}"
    for name in weights:
        assert wheel_files[name] == (MODELS_DIR.parents[2] / name).read_bytes()


def test_console_scripts_point_into_accel(wheel_files):
    (entry_points,) = [data for name, data in wheel_files.items() if name.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(entry_points.decode())
    scripts = dict(parser["console_scripts"])
    assert set(scripts) == {"accel-run", "accel-eval", "accel-demo"}
    for target in scripts.values():
        module, function = target.split(":")
        assert module.startswith("accel.")
        assert callable(getattr(importlib.import_module(module), function))


def load_ci_script():
    spec = importlib.util.spec_from_file_location("ci_unpinned", ROOT / ".ci" / "unpinned.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeJob:
    """An unpinned venv in which the imports break while ``breaker`` is at its new version."""

    def __init__(self, installed: dict[str, str], breaker: str | None):
        self.versions, self.breaker, self.locked = dict(installed), breaker, {}

    def installed(self):
        return dict(self.versions)

    def pip_install(self, requirement):
        name, version = requirement.split("==")
        self.versions[name] = version
        return True

    def check(self, name):
        return self.breaker is None or self.versions[self.breaker] == self.locked[self.breaker]


def test_unpinned_job_names_the_upstream_release_that_broke_it(tmp_path):
    ci = load_ci_script()
    lock = tmp_path / "constraints.txt"
    lock.write_text("# header\nnumpy==2.4.6\nTransformers==5.24.0\nzipp==3.0\ntqdm==4.67.0\n")
    installed = {"numpy": "2.4.6", "transformers": "5.25.0", "zipp": "3.1", "tqdm": "4.67.1"}
    assert ci.differences(installed, ci.parse_pins(lock.read_text())) == {
        "tqdm": ("4.67.0", "4.67.1"), "transformers": ("5.24.0", "5.25.0"), "zipp": ("3.0", "3.1")}
    # accel's direct dependencies are tried first, in pyproject order (transformers before tqdm), then the rest.
    assert ci.suspects_in_order({"zipp": 0, "tqdm": 0, "transformers": 0},
                                ci.direct_dependencies(ROOT / "pyproject.toml")) == ["transformers", "tqdm", "zipp"]

    job = FakeJob(installed, breaker="zipp")
    job.locked = ci.parse_pins(lock.read_text())
    message = ci.diagnose(job, ["imports"], lock)
    assert message.startswith("UPSTREAM BREAK: zipp 3.1") and "zipp==3.0" in message
    assert job.versions["transformers"] == "5.25.0"  # a pin that did not help is put back

    job = FakeJob({**installed, "zipp": "3.0", "transformers": "5.24.0", "tqdm": "4.67.0"}, breaker=None)
    assert "the break is ours" in ci.diagnose(job, ["accel-run"], lock)  # nothing differs from the lock
