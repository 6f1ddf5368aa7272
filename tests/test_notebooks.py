"""The notebooks run, and their committed outputs are those of the current code in full mode.

The tests run each notebook in fast mode: the environment variable MINIGPT_FAST=1, which every notebook reads in its
first code cell to shrink its data, models and iterations, so that a notebook takes seconds. They run in a temporary
working directory, so nothing is left behind in the repository; the models several notebooks share
(notebooks/course.py: the pretrained base, the SFT model, the reward model) are built once per session in a temporary
folder. Cells tagged "deterministic" (by-hand checks on seeded tiny tensors, parameter counts, exercise solutions
that do not depend on the mode) must print exactly what the committed notebook shows.

The committed outputs are what learners read, so they must be current: the same file is the runner that fills them
(``make notebooks``). Run as a script, it executes the notebooks in full mode with notebooks/ as the working
directory, saves the outputs into the .ipynb files without the timing metadata that would make every run a diff, and
records in the notebook's metadata the mode, a hash of its code cells and a hash of every repository file it
imported (minigpt/, peft/, rlhf/, notebooks/*.py) or read (benchmarks/results/). A test then fails for a notebook
whose outputs came from fast mode, from other code cells or from another version of any of those files.

    python tests/test_notebooks.py                      # every notebook, full mode, saved in place
    python tests/test_notebooks.py 06e_lora 05_sft      # some of them
    python tests/test_notebooks.py --fast               # fast mode: report the times, save nothing
    python tests/test_notebooks.py --stale              # which notebooks need a full re-run, and why
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
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
TRACKED = ("minigpt/", "peft/", "rlhf/", "notebooks/", "benchmarks/")  # repository files whose change stales outputs
META = "minigpt_course"  # the notebook-metadata key of the record

# appended to the notebook for the run and removed after: which repository files did the kernel import and read?
PROBE = """\
import json as _json, sys as _sys
_files = sorted({getattr(_m, "__file__", None) or "" for _m in list(_sys.modules.values())})
_read = list(_sys.modules["course"].READ_FILES) if "course" in _sys.modules else []
print(_json.dumps({"modules": _files, "read": _read}))
"""


def execute(path: Path, fast: bool, cwd: Path, cell_timeout: int, course_out: Path | None = None,
            probe: bool = False):
    """Run the notebook at path in a fresh python3 kernel (this interpreter's) and return it with its outputs, and
    with probe the repository files it imported or read (relative paths)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ, MINIGPT_FAST="1" if fast else "0", PYDEVD_DISABLE_FILE_VALIDATION="1")
    env["PYTHONPATH"] = os.pathsep.join([str(NOTEBOOK_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if course_out is not None:
        env["MINIGPT_COURSE_OUT"] = str(course_out)
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # the notebooks' models are small enough that threads gain little, and on a machine shared with other work extra
    # threads cost many times over (a full-mode run took 4x longer with 2 threads than with 1 on 2 busy cores)
    env.setdefault("OMP_NUM_THREADS", "1")
    if probe:
        nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    if not probe:
        return nb
    found = json.loads("".join(o.get("text", "") for o in nb.cells.pop().outputs if o.get("name") == "stdout"))
    files = set()
    for name in found["modules"] + [str(ROOT / f) for f in found["read"]]:
        p = Path(name).resolve() if name else None
        if p and p.is_file() and p.is_relative_to(ROOT):
            rel = p.relative_to(ROOT).as_posix()
            if rel.startswith(TRACKED):
                files.add(rel)
    return nb, sorted(files)


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def code_hash(nb) -> str:
    """A hash of the notebook's code cells, in order."""
    code = [c["source"] if isinstance(c["source"], str) else "".join(c["source"])
            for c in nb["cells"] if c["cell_type"] == "code"]
    return hashlib.sha256("\n\x00".join(code).encode()).hexdigest()[:16]


def clean(nb, record: dict | None = None):
    """Drop what changes from run to run without meaning anything (execution timings, interpreter versions) and
    keep the record of what the outputs came from."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python", "pygments_lexer": "ipython3"},
    }
    if record is not None:
        nb.metadata[META] = record
    return nb


def output_text(nb) -> str:
    """All text in the notebook's outputs (images left out)."""
    return "\n".join(cell_output_text(cell) for cell in nb["cells"])


def cell_output_text(cell) -> str:
    """The text of a cell's outputs, the same however the kernel cut its writes into messages (a busy machine splits
    one print into several stream outputs) and in whatever order a file stores the types of a display."""
    join = lambda text: text if isinstance(text, str) else "".join(text)  # on disk, text may be a list of lines
    parts = []  # (stream name or mime type, text)
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            if parts and parts[-1][0] == out.get("name"):  # consecutive writes to one stream are one text
                parts[-1] = (parts[-1][0], parts[-1][1] + join(out.get("text", "")))
            else:
                parts.append((out.get("name"), join(out.get("text", ""))))
            continue
        data = out.get("data", {})
        parts.extend((mime, join(data[mime])) for mime in sorted(data) if mime.startswith("text/"))
        parts.extend(("traceback", line) for line in out.get("traceback", []))
    return "\n".join(text for _, text in parts)


def tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def staleness(path: Path) -> list[str]:
    """Why the committed outputs of the notebook at path are not those of the current code in full mode ([]: they
    are)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    record = nb.get("metadata", {}).get(META)
    if record is None:
        return ["no record of the run that made its outputs (it was not saved by `make notebooks`)"]
    reasons = []
    if record.get("mode") != "full":
        reasons.append(f"its outputs come from {record.get('mode')!r} mode, not full mode")
    if record.get("code") != code_hash(nb):
        reasons.append("its code cells changed after the run")
    changed = [f for f, h in record.get("sources", {}).items()
               if not (ROOT / f).is_file() or file_hash(ROOT / f) != h]
    if changed:
        reasons.append(f"{len(changed)} file(s) it imported or read changed after the run: {', '.join(changed)}")
    return reasons


# -- the tests ---------------------------------------------------------------------------------------------------

ids = [p.stem for p in NOTEBOOKS]


@pytest.fixture(scope="session")
def course_out(tmp_path_factory):
    """One folder for the session's shared models (built by the first notebook that needs them)."""
    return tmp_path_factory.mktemp("course_out")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_runs_in_fast_mode(path, tmp_path, course_out):
    """Every cell runs, exercise solutions included (they assert their answers against the library), and the cells
    tagged deterministic print what the committed notebook shows."""
    nb = execute(path, fast=True, cwd=tmp_path, cell_timeout=FAST_CELL_TIMEOUT, course_out=course_out)
    committed = json.loads(path.read_text(encoding="utf-8"))["cells"]
    for i, (new, old) in enumerate(zip(nb.cells, committed)):
        if "deterministic" in tags(new):
            assert cell_output_text(new) == cell_output_text(old), (
                f"{path.name}, cell {i} (tagged deterministic) prints other text than the committed notebook shows: "
                f"run `make notebooks NB={path.stem}`, or untag the cell if its output depends on the mode\n"
                f"now:\n{cell_output_text(new)[:800]}\ncommitted:\n{cell_output_text(old)[:800]}"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_is_committed_with_outputs_of_a_clean_run(path):
    """Learners read the notebooks on the web before they run them: every code cell has run, in order, and no
    output shows a path of the machine that ran it."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert any("FAST" in "".join(c["source"]) for c in code[:2]), (
        f"{path.name}: the first code cells must read the fast mode (MINIGPT_FAST, or course.FAST)"
    )
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: code cells were not all run in order from a fresh kernel (execution counts {counts}); "
        f"run `make notebooks NB={path.stem}`"
    )
    text = output_text(nb)
    for local in {str(ROOT), tempfile.gettempdir() + os.sep}:
        assert local not in text, f"{path.name}: an output shows the local path {local!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_committed_outputs_come_from_the_current_code_in_full_mode(path):
    """The outputs were made by `make notebooks` (full mode) from these code cells and these library files: a change
    to minigpt/, peft/, rlhf/, the notebooks' helpers or a benchmark result they read makes them stale."""
    reasons = staleness(path)
    assert not reasons, (f"{path.name}: the committed outputs are stale: {'; '.join(reasons)}. "
                         f"Re-run it in full mode: `make notebooks NB={path.stem}`")


SHOWS_A_FIGURE = re.compile(r"^(?:plt\.show\(\)|course\.plot_sft_runs\(|display\(Image\()", re.M)  # at top level


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_every_figure_is_in_the_committed_outputs(path):
    """A cell that shows a figure has an image among its committed outputs: a call that switched matplotlib away
    from the inline backend (the library once called matplotlib.use("Agg") to write its png files) would silently
    drop every later figure."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        if cell["cell_type"] == "code" and SHOWS_A_FIGURE.search(source):
            images = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
            assert images, f"{path.name}, cell {i} shows a figure, but its committed outputs hold no image"


def test_notebook_outputs_hold_no_errors():
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text(encoding="utf-8"))
        errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{path.name}: committed outputs contain an error: {errors[0].get('ename')}"


def test_staleness_is_detected(tmp_path, monkeypatch):
    """The record catches each way outputs go stale: another mode, edited code, a changed library file."""
    import shutil

    import nbformat

    lib = tmp_path / "minigpt" / "thing.py"
    lib.parent.mkdir()
    lib.write_text("x = 1\n")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    record = {"mode": "full", "code": code_hash(nb), "sources": {"minigpt/thing.py": file_hash(lib)}}
    path = tmp_path / "nb.ipynb"
    nbformat.write(clean(nb, record), path)
    assert staleness(path) == []
    lib.write_text("x = 2\n")
    assert "minigpt/thing.py" in staleness(path)[0]
    lib.write_text("x = 1\n")
    nb.cells[0].source = "print(2)"
    nbformat.write(nb, path)
    assert staleness(path) == ["its code cells changed after the run"]
    nb.cells[0].source = "print(1)"
    nb.metadata[META]["mode"] = "fast"
    nbformat.write(nb, path)
    assert "fast" in staleness(path)[0]
    shutil.rmtree(lib.parent)
    nb.metadata[META]["mode"] = "full"
    nbformat.write(nb, path)
    assert "minigpt/thing.py" in staleness(path)[0]


# -- the runner behind `make notebooks` -----------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Execute the notebooks and save their outputs (full mode).")
    parser.add_argument("names", nargs="*", help="notebooks to run, by file name or stem (default: all)")
    parser.add_argument("--fast", action="store_true", help="fast mode in a temporary directory; save nothing")
    parser.add_argument("--stale", action="store_true", help="list the notebooks whose outputs are stale; run none")
    args = parser.parse_args(argv)
    chosen = NOTEBOOKS
    if args.names:
        by_name = {p.stem: p for p in NOTEBOOKS} | {p.name: p for p in NOTEBOOKS}
        unknown = [n for n in args.names if n not in by_name]
        if unknown:
            sys.exit(f"unknown notebooks {unknown}; expected some of {sorted(p.stem for p in NOTEBOOKS)}")
        chosen = [by_name[n] for n in args.names]
    if args.stale:
        for path in chosen:
            reasons = staleness(path)
            print(f"{path.stem:24s} {'; '.join(reasons) if reasons else 'current'}")
        return
    import nbformat

    total = 0.0
    with tempfile.TemporaryDirectory() as shared:
        for path in chosen:
            t0 = time.perf_counter()
            if args.fast:
                with tempfile.TemporaryDirectory() as tmp:
                    execute(path, fast=True, cwd=Path(tmp), cell_timeout=FAST_CELL_TIMEOUT, course_out=Path(shared))
            else:
                nb, files = execute(path, fast=False, cwd=NOTEBOOK_DIR, cell_timeout=FULL_CELL_TIMEOUT, probe=True)
                record = {"mode": "full", "code": code_hash(nb), "sources": {f: file_hash(ROOT / f) for f in files},
                          "seconds": round(time.perf_counter() - t0)}
                nbformat.write(clean(nb, record), path)
            seconds = time.perf_counter() - t0
            total += seconds
            print(f"{path.name:32s} {'fast' if args.fast else 'full'} mode {seconds:7.1f} s", flush=True)
    print(f"{'total':32s} {total:17.1f} s")


if __name__ == "__main__":
    main()
