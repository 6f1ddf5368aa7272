"""A run's folder and its stopping: no finished work is replaced without being asked, and Ctrl-C loses nothing.

- ``claim(out_dir, resume, overwrite)``: before any work, a folder that already holds a run is refused unless the
  run is continued (resume) or replaced on purpose (overwrite); a run another process is writing is always refused.
  The claim holds a lock file (the process id) until the run ends; ``hold(out_dir)`` holds that lock alone.
- ``stop_requests()``: while it is active, Ctrl-C (SIGINT) does not break a training step in half; it sets a flag that
  the loop reads between steps, so the loop can save a checkpoint of the last finished step and raise ``Interrupted``.
  A second Ctrl-C stops at once, as usual.
- ``Interrupted``: what a loop raises after saving; the command line prints where the run is and how to continue it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

RUN_FILES = ("model.json", "ckpt.pt", "best.pt", "metrics.jsonl", "ppo_metrics.jsonl", "grpo_metrics.jsonl",
             "rl_state.pt", "results.json")
LOCK = "run.lock"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C reached a loop, which saved a resumable checkpoint first."""

    def __init__(self, out_dir, step: int):
        super().__init__(f"interrupted after step {step}; the run is saved in {out_dir}")
        self.out_dir, self.step = str(out_dir), step


def previous_run(out_dir) -> list[str]:
    """The files of an earlier run in out_dir (empty: the folder is free)."""
    out_dir = Path(out_dir)
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse_if_held(out_dir: Path) -> None:
    """Refuse a folder whose lock file names another process that is still running."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out-dir {str(out_dir)!r} is a file; expected a folder")
    lock = out_dir / LOCK
    if lock.is_file():
        text = lock.read_text().strip()
        if text.isdigit() and int(text) != os.getpid() and _alive(int(text)):
            raise RuntimeError(f"another run (process {text}) is writing to {out_dir}; wait for it, or choose "
                               f"another --out-dir")


@contextlib.contextmanager
def hold(out_dir):
    """Hold out_dir's lock file (this process's id) while the block runs, refusing a folder another live process
    holds; claim's lock without its checks, for a folder of several runs (the pipeline's)."""
    out_dir = Path(out_dir)
    _refuse_if_held(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK
    lock.write_text(str(os.getpid()))
    try:
        yield out_dir
    finally:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def claim(out_dir, resume: bool = False, overwrite: bool = False, main: bool = True):
    """Hold out_dir for one run (see the module docstring). Under torchrun only the main process claims (when it
    refuses, torchrun stops the others)."""
    out_dir = Path(out_dir)
    if not main:
        yield out_dir
        return
    _refuse_if_held(out_dir)
    found = previous_run(out_dir)
    if resume and not (out_dir / "ckpt.pt").is_file() and not (out_dir / "best.pt").is_file() and \
            not (out_dir / "rl_state.pt").is_file():
        raise FileNotFoundError(f"--resume: {out_dir} holds no checkpoint to continue from")
    if found and not (resume or overwrite):
        raise FileExistsError(f"{out_dir} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                              f"--overwrite to replace it, or choose another --out-dir")
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces it: give one of them")
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in found:
            (out_dir / name).unlink()
    with hold(out_dir):
        yield out_dir


class StopFlag:
    """Set by the first Ctrl-C while stop_requests() is active; read by a loop between its steps."""

    def __init__(self):
        self.requested = False

    def __bool__(self):
        return self.requested


@contextlib.contextmanager
def stop_requests():
    """Yield a StopFlag; the first SIGINT sets it instead of raising, the second raises KeyboardInterrupt. Outside
    the main thread (where signals cannot be caught) the flag simply stays unset."""
    flag = StopFlag()
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        print("\nstopping after this step, with a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr,
              flush=True)

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def resume_command() -> str:
    """The command line that started this process, with --resume (and without --overwrite), for the message."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
    return " ".join([head, *args, "--resume"])
