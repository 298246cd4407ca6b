"""CI's second job: what a user gets from `pip install accel` today, with no lock.

    python3 .ci/unpinned.py [--lock constraints.txt] [--workdir DIR]

A fresh venv, an unpinned, non-editable `pip install <repo>`, then, from a directory outside the repository:
`pip check`, `import kernels, transformers, diffusers, accel` (Hugging Face's `kernels` beside us), a check that
the installed distribution holds no top-level import package but `accel`, and `accel-run` on its smallest setting
(the shipped digits-dit weights, so the package data is checked too).

When a check fails, the installed versions are compared with the lock. None differ: the break is ours (packaging or
code), not upstream. Some differ: each differing distribution (accel's direct dependencies first) is pinned back to
its locked version in turn and the failed check rerun; the one whose pin makes it pass is named as the upstream
release that broke us. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORTS = "import kernels, transformers, diffusers, accel; print('imported', accel.__file__)"
# The only files a wheel of ours may install: the package, its metadata, and the console scripts.
ALLOWED_FILE = re.compile(r"^(accel/|accel-[^/]+\.dist-info/|(\.\./)+bin/accel-(run|eval|demo)$)")
MAX_PIN_TRIES = 12


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """``name==version`` lines (pip freeze or a constraints file) -> {canonical name: version}."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[canonical(name.split("[")[0].strip())] = version.split(";")[0].strip()
    return pins


def differences(installed: dict[str, str], locked: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{name: (locked, installed)} for every distribution installed at another version than the lock's."""
    return {name: (locked[name], version) for name, version in sorted(installed.items())
            if name in locked and locked[name] != version}


def direct_dependencies(pyproject: Path) -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: no order, every suspect alphabetically
        return []
    project = tomllib.loads(pyproject.read_text())["project"]
    return [canonical(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in project["dependencies"]]


def suspects_in_order(changed: dict[str, tuple[str, str]], direct: list[str]) -> list[str]:
    """Direct dependencies first (in pyproject order), then the rest alphabetically."""
    first = [name for name in direct if name in changed]
    return first + sorted(name for name in changed if name not in first)


class Job:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.venv = workdir / "venv"
        self.bin = self.venv / "bin"
        self.outside = workdir / "outside"  # the checks' working directory: not the repository
        self.outside.mkdir(parents=True, exist_ok=True)

    def run(self, command: list[str], quiet: bool = False) -> subprocess.CompletedProcess:
        started = time.monotonic()
        result = subprocess.run(command, cwd=self.outside, capture_output=True, text=True)
        if not quiet:
            print(f"$ {' '.join(command)}   [{time.monotonic() - started:.0f} s, exit {result.returncode}]")
            lines = (result.stdout + result.stderr).strip().splitlines()
            tail = [line for line in lines if not line.lstrip().startswith("WARNING: Location")][-25:]
            print("\n".join("    " + line for line in tail))
        return result

    def installed(self) -> dict[str, str]:
        return parse_pins(self.run([str(self.bin / "pip"), "freeze", "--exclude-editable"], quiet=True).stdout)

    def pip_install(self, *requirements: str) -> bool:
        return self.run([str(self.bin / "pip"), "install", "-q", *requirements], quiet=True).returncode == 0

    def checks(self) -> dict[str, list[str] | None]:
        """name -> command (None: checked in Python, see ``only_accel_installed``)."""
        return {
            "pip check": [str(self.bin / "pip"), "check"],
            "imports": [str(self.bin / "python"), "-c", IMPORTS],
            "only accel installed": None,
            "accel-run": [str(self.bin / "accel-run"), "--methods", "delta-dit", "--steps", "2", "--repeats", "1"],
        }

    def only_accel_installed(self) -> bool:
        shown = self.run([str(self.bin / "pip"), "show", "-f", "accel"], quiet=True).stdout
        files = [line.strip() for line in shown.split("Files:", 1)[-1].splitlines() if line.strip()]
        stray = [path for path in files if not ALLOWED_FILE.match(path)]
        print(f"$ pip show -f accel   [{len(files)} files; outside accel/: {stray or 'none'}]")
        return bool(files) and not stray

    def check(self, name: str) -> bool:
        command = self.checks()[name]
        if command is None:
            return self.only_accel_installed()
        return self.run(command).returncode == 0


def diagnose(job: Job, failed: list[str], lock: Path) -> str:
    locked = parse_pins(lock.read_text())
    changed = differences(job.installed(), locked)
    if not changed:
        return (f"FAILED: {', '.join(failed)}, with every distribution at its locked version: the break is ours "
                f"(packaging, or code that only a non-editable install exercises), not an upstream release.")
    listed = ", ".join(f"{name} {new} (lock {old})" for name, (old, new) in changed.items())
    print(f"\nInstalled versions that differ from the lock: {listed}")
    direct = direct_dependencies(REPO / "pyproject.toml")
    for name in suspects_in_order(changed, direct)[:MAX_PIN_TRIES]:
        old, new = changed[name]
        print(f"-- trying {name}=={old} (installed {new})")
        if not job.pip_install(f"{name}=={old}"):
            print("   could not install it; skipped")
            continue
        if all(job.check(check) for check in failed):
            return (f"UPSTREAM BREAK: {name} {new} breaks accel ({', '.join(failed)} failed); with {name}=={old}, "
                    f"the locked version, every failed check passes. Fix accel for {name} {new}, or cap it.")
        job.pip_install(f"{name}=={new}")
    return (f"FAILED: {', '.join(failed)}. Upstream releases since the lock: {listed}; pinning any single one of "
            f"them (up to {MAX_PIN_TRIES} tried) back to its locked version did not fix it: read the output above.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", type=Path, default=REPO / "constraints.txt")
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="accel-unpinned-") as temporary:
        job = Job(args.workdir or Path(temporary))
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(job.venv)], check=True)
        started = time.monotonic()
        installed = job.run([str(job.bin / "pip"), "install", "-q", str(REPO)])
        if installed.returncode != 0:
            print("FAILED: the unpinned `pip install .` did not resolve or install; see above.")
            return 1
        print(f"installed in {time.monotonic() - started:.0f} s: "
              + ", ".join(f"{name} {version}" for name, version in job.installed().items()
                          if name in {"torch", "diffusers", "transformers", "kernels", "accelerate", "gradio"}))
        failed = [name for name in job.checks() if not job.check(name)]
        if not failed:
            print("unpinned install: every check passed")
            return 0
        print("\n" + diagnose(job, failed, args.lock))
        return 1


if __name__ == "__main__":
    sys.exit(main())
