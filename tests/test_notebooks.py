"""Every notebook in notebooks/ runs from top to bottom without an error.

The tests run each notebook in fast mode: the environment variable MINIGPT_FAST=1, which every notebook reads in its
first code cell to shrink its data, models and iterations, so that a notebook takes seconds. They run in a temporary
working directory, so nothing is left behind in the repository.

The same file is the runner that fills the committed outputs (``make notebooks``): run as a script, it executes the
notebooks in full mode with notebooks/ as the working directory and saves the outputs into the .ipynb files, without
the timing metadata that would make every run a diff.

    python tests/test_notebooks.py                      # every notebook, full mode, saved in place
    python tests/test_notebooks.py 06e_lora 05_sft      # some of them
    python tests/test_notebooks.py --fast               # fast mode: report the times, save nothing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
FAST_CELL_TIMEOUT = 300  # seconds per cell in fast mode: generous, for a busy machine; a cell normally takes < 5 s
FULL_CELL_TIMEOUT = 1800


def execute(path: Path, fast: bool, cwd: Path, cell_timeout: int):
    """Run the notebook at path in a fresh python3 kernel (this interpreter's) and return it with its outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ, MINIGPT_FAST="1" if fast else "0", PYDEVD_DISABLE_FILE_VALIDATION="1")
    # the notebooks' models are small enough that threads gain little, and on a machine shared with other work extra
    # threads cost many times over (a full-mode run took 4x longer with 2 threads than with 1 on 2 busy cores)
    env.setdefault("OMP_NUM_THREADS", "1")
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    return nb


def clean(nb):
    """Drop what changes from run to run without meaning anything: execution timings, interpreter versions."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python", "pygments_lexer": "ipython3"},
    }
    return nb


def output_text(nb) -> str:
    """All text in the notebook's outputs (images left out)."""
    join = lambda text: text if isinstance(text, str) else "".join(text)  # on disk, text may be a list of lines
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            parts.append(join(out.get("text", "")))
            parts.extend(join(data) for mime, data in out.get("data", {}).items() if mime.startswith("text/"))
            parts.extend(out.get("traceback", []))
    return "\n".join(parts)


# -- the tests ---------------------------------------------------------------------------------------------------

ids = [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_runs_in_fast_mode(path, tmp_path):
    execute(path, fast=True, cwd=tmp_path, cell_timeout=FAST_CELL_TIMEOUT)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_is_committed_with_outputs_of_a_clean_run(path):
    """Learners read the notebooks on the web before they run them: every code cell has run, in order, and no
    output shows a path of the machine that ran it."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert any("MINIGPT_FAST" in "".join(c["source"]) for c in code[:2]), (
        f"{path.name}: the first code cells must read MINIGPT_FAST (FAST = os.environ.get('MINIGPT_FAST') == '1')"
    )
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: code cells were not all run in order from a fresh kernel (execution counts {counts}); "
        f"run `make notebooks NB={path.stem}`"
    )
    text = output_text(nb)
    for local in {str(ROOT), tempfile.gettempdir() + os.sep}:
        assert local not in text, f"{path.name}: an output shows the local path {local!r}"


def test_notebook_outputs_hold_no_errors():
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text(encoding="utf-8"))
        errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{path.name}: committed outputs contain an error: {errors[0].get('ename')}"


# -- the runner behind `make notebooks` -----------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Execute the notebooks and save their outputs (full mode).")
    parser.add_argument("names", nargs="*", help="notebooks to run, by file name or stem (default: all)")
    parser.add_argument("--fast", action="store_true", help="fast mode in a temporary directory; save nothing")
    args = parser.parse_args(argv)
    chosen = NOTEBOOKS
    if args.names:
        by_name = {p.stem: p for p in NOTEBOOKS} | {p.name: p for p in NOTEBOOKS}
        unknown = [n for n in args.names if n not in by_name]
        if unknown:
            sys.exit(f"unknown notebooks {unknown}; expected some of {sorted(p.stem for p in NOTEBOOKS)}")
        chosen = [by_name[n] for n in args.names]
    total = 0.0
    for path in chosen:
        t0 = time.perf_counter()
        if args.fast:
            with tempfile.TemporaryDirectory() as tmp:
                execute(path, fast=True, cwd=Path(tmp), cell_timeout=FAST_CELL_TIMEOUT)
        else:
            import nbformat

            nb = clean(execute(path, fast=False, cwd=NOTEBOOK_DIR, cell_timeout=FULL_CELL_TIMEOUT))
            nbformat.write(nb, path)
        seconds = time.perf_counter() - t0
        total += seconds
        print(f"{path.name:32s} {'fast' if args.fast else 'full'} mode {seconds:7.1f} s", flush=True)
    print(f"{'total':32s} {total:17.1f} s")


if __name__ == "__main__":
    main()
