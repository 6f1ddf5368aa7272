"""Run a reference script in .venv-ref, in its own process, and exchange tensors with it through files.

transformers and Hugging Face's peft are installed only in .venv-ref (see setup.sh): Hugging Face's package is
imported as ``peft``, like this project's, so the two can never share a process. A parity test in the main venv
calls

    out = run_reference("ref_gpt2", {"idx": idx}, {"model_dir": str(path)})

which writes ``inputs.safetensors`` and ``args.json`` to a temporary directory, runs
``.venv-ref/bin/python tests/reference/ref_gpt2.py DIR`` there and reads back ``outputs.safetensors``.
A reference script reads and writes those files with ``ref_io.py``. Never name a file here ``peft.py``,
``transformers.py`` or ``torch.py``: a script's own folder comes first on its sys.path.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
REF_VENV = REPO / ".venv-ref"
REF_PYTHON = REF_VENV / "bin" / "python"
REF_STAMP = REF_VENV / ".installed"  # written by setup.sh once every package installed and imported
SKIP_MESSAGE = "the reference environment .venv-ref is missing: run `make parity` (it creates .venv-ref first)"


def reference_available() -> bool:
    """Whether setup.sh has finished creating .venv-ref."""
    return REF_PYTHON.is_file() and REF_STAMP.is_file()


def skip_without_reference() -> None:
    """pytest.skip the calling test, saying how to get the reference environment, when it is absent.

    With PARITY_REQUIRE_REFERENCE=1 (set by `make parity`, which has just built .venv-ref) a missing environment
    fails the test instead, so a parity run can never pass by skipping everything.
    """
    import pytest

    if reference_available():
        return
    if os.environ.get("PARITY_REQUIRE_REFERENCE") == "1":
        pytest.fail("PARITY_REQUIRE_REFERENCE=1 but " + SKIP_MESSAGE.removeprefix("the "))
    pytest.skip(SKIP_MESSAGE)


def run_reference(script: str, inputs: dict[str, torch.Tensor], args: dict | None = None,
                  timeout: float = 600) -> dict[str, torch.Tensor]:
    """Run tests/reference/<script>.py with .venv-ref's python on inputs and args; return its output tensors.

    inputs: named tensors (saved contiguous, on the CPU); args: anything JSON can hold (paths as strings).
    Raises RuntimeError with the script's stderr when it fails.
    """
    if not reference_available():
        raise RuntimeError(SKIP_MESSAGE)
    path = HERE / f"{script}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no reference script {path}")
    with tempfile.TemporaryDirectory(prefix="ref-") as tmp:
        work = Path(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in inputs.items()}, str(work / "inputs.safetensors"))
        (work / "args.json").write_text(json.dumps(args or {}))
        # cwd is the temporary directory, so the repo root (with this project's peft) is not on the child's path;
        # offline, so that nothing in the reference packages tries to reach the model hub
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        proc = subprocess.run([str(REF_PYTHON), str(path), str(work)], cwd=work, env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"reference script {script}.py failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        out = work / "outputs.safetensors"
        if not out.is_file():
            raise RuntimeError(f"reference script {script}.py wrote no outputs.safetensors:\n{proc.stderr[-4000:]}")
        return load_file(str(out))
