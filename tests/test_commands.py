"""Every command the README and the Makefile name exists and answers --help.

A renamed module or a Makefile target pointing at a module that is not there (as `make demo` once did) fails here,
on the CPU in a second, instead of on a learner's machine.
"""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("minigpt", "peft", "rlhf")


def named_modules() -> list[str]:
    """Modules run as `python -m X` in the README or `$(PY) -m X` in the Makefile, this project's only."""
    text = (ROOT / "README.md").read_text() + (ROOT / "Makefile").read_text()
    found = set(re.findall(r"(?:python|\$\(PY\)) -m ([A-Za-z_][\w.]*)", text))
    return sorted(m for m in found if m.split(".")[0] in PROJECT_PACKAGES)


def test_the_readme_and_makefile_name_the_main_commands():
    assert {"minigpt.train", "peft.train", "rlhf.reward_model", "rlhf.pipeline"} <= set(named_modules())
    demo = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert demo and "-m rlhf.pipeline" in demo.group(1), "make demo runs the four stages"


@pytest.mark.parametrize("module", named_modules())
def test_command_answers_help(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and len(out.splitlines()) > 3, out
