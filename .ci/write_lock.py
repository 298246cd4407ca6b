"""Write the lock (a pip constraints file) from the environment this script runs in: ``make lock`` calls it with the
fresh venv's Python after the test suite passed there.

    python .ci/write_lock.py constraints.txt
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HEADER = """\
# The lock: every version the test suite last passed with, as a pip constraints file.
# `make install` (and so `make run` / `make test`) installs with `pip install -c constraints.txt -e ".[dev]"`.
# Refresh with `make lock`: it resolves the newest releases in a fresh venv, runs the tests, and rewrites this file
# only if they pass. Written {date} on Python {python}, {machine}.
"""


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    target = Path(argv[0])
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout
    pins = sorted((line for line in frozen.splitlines() if "==" in line), key=str.lower)
    if not pins:
        raise SystemExit("pip freeze listed nothing: refusing to write an empty lock")
    text = HEADER.format(date=datetime.date.today().isoformat(), python=platform.python_version(),
                         machine=f"{platform.system()} {platform.machine()}") + "\n".join(pins) + "\n"
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, target)
    print(f"wrote {target}: {len(pins)} pinned distributions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
