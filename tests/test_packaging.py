"""What a non-editable install gets: the wheel holds one import package, ``accel``, with the reference models'
weights and cards as package data, and console scripts that point into it."""

from __future__ import annotations

import configparser
import importlib
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
