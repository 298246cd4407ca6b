"""The Python snippets of the README and the contributor guide run, so they never rot."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
CONTRIBUTING = README.parent / "CONTRIBUTING.md"
SNIPPETS = [snippet for path in (README, CONTRIBUTING)
            for snippet in re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)]


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index):
    exec(compile(SNIPPETS[index], f"snippet {index}", "exec"), {"__name__": f"readme_{index}"})


def test_readme_quickstart_commands_exist_in_makefile():
    makefile = (README.parent / "Makefile").read_text(encoding="utf-8")
    for target in re.findall(r"^make (\w[\w-]*)", README.read_text(encoding="utf-8"), flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
