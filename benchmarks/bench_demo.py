"""`make demo` timed from a fresh clone, beside nanoGPT's CPU baby run measured in the same script.

    python benchmarks/bench_demo.py --nanogpt path/to/nanoGPT        # the table below, printed
    python benchmarks/bench_demo.py --nanogpt path/to/nanoGPT --pipeline-only   # the stages alone, no clone or venv

One after the other on the same machine, each a fresh process:
1. nanoGPT's baby run (4 layers x 128, block 64, batch 12, 2000 iterations on tinyshakespeare) twice: as its README
   prints the command (--eval_iters=20) and as its config file evaluates (eval_iters 200, the run that
   bench_pretrain.py times side by side with minigpt's trainer). bench_pretrain.prepare_nanogpt and run_nanogpt.
2. A `git clone` of this repository's last commit into a temporary folder and `make demo` there: the virtual
   environment created and installed, then the four stages (`python -m rlhf.pipeline`); the stage times are read
   from the clone's out/pipeline/*/stage.json. --pipeline-only runs the stages with this Python instead.

The figures are the wall times and their ratios to the two baby runs; load is not controlled, so run it on a quiet
machine and read the ratios rather than the seconds. benchmarks/results/demo.md has the measured runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_pretrain import BABY, prepare_nanogpt, run_nanogpt, timed_process  # noqa: E402 (puts REPO on the path)

from rlhf.pipeline import STAGES  # noqa: E402


def time_demo(work: Path, pipeline_only: bool) -> dict:
    """Wall time of `make demo` in a fresh clone (or of the stages alone), and each stage's from its stage.json."""
    if pipeline_only:
        out = work / "pipeline"
        _, wall, _ = timed_process([sys.executable, "-m", "rlhf.pipeline", "--out-dir", str(out), "--no-progress"],
                                   REPO)
    else:
        changed = subprocess.run(["git", "status", "--porcelain", "--", "minigpt", "peft", "rlhf", "Makefile",
                                  "pyproject.toml"], cwd=REPO, capture_output=True, text=True).stdout
        if changed:
            print(f"note: uncommitted changes are not in the clone, which times the last commit:\n{changed}")
        clone = work / "clone"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        _, wall, _ = timed_process(["make", "demo", f"PYTHON={sys.executable}"], clone)  # its venv from this Python
        out = clone / "out" / "pipeline"
    stages = {s: json.loads((out / s / "stage.json").read_text()) for s in STAGES}
    return {"wall_s": wall, "stages": {s: r["wall_s"] for s, r in stages.items()},
            "report": (out / "report.md").read_text(),
            "val_loss": stages["pretrain"]["val_loss"], "sft_accuracy": stages["sft"]["accuracy"],
            "rm_accuracy": stages["reward"]["accuracy"]}


def table(baby: dict, demo: dict, pipeline_only: bool) -> str:
    what = "the four stages (`python -m rlhf.pipeline`)" if pipeline_only else \
        "`make demo` from a fresh clone (venv included)"
    lines = ["| run | wall time (s) | / baby run, eval_iters 20 | / baby run, eval_iters 200 |", "|---|---:|---:|---:|"]
    for name, r in baby.items():
        lines.append(f"| nanoGPT's baby run, {name} (val {r['val_loss']:.4f}) | {r['wall_s']:.1f} | | |")
    b20, b200 = baby["eval_iters 20"]["wall_s"], baby["eval_iters 200"]["wall_s"]
    lines.append(f"| {what} | {demo['wall_s']:.1f} | {demo['wall_s'] / b20:.2f}x | {demo['wall_s'] / b200:.2f}x |")
    stages = ", ".join(f"{s} {t:.0f} s" for s, t in demo["stages"].items())
    lines += ["", f"Stages: {stages} (sum {sum(demo['stages'].values()):.0f} s). Pretraining validation loss "
              f"{demo['val_loss']:.3f}, SFT accuracy {demo['sft_accuracy']:.1%}, reward-model accuracy "
              f"{demo['rm_accuracy']:.1%}."]
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", required=True, help="a checkout of karpathy/nanoGPT (its train.py is run as it is)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"),
                   help="tinyshakespeare's input.txt (default: %(default)s)")
    p.add_argument("--pipeline-only", action="store_true", help="time the four stages with this Python, without "
                   "cloning or creating a virtual environment")
    p.add_argument("--out", default=None, help="also write the table to this file, and the pipeline's report.md to "
                   "OUT's name + _report.md (default: print the table only)")
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file (tinyshakespeare's input.txt)")
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        work = Path(tmp)
        nano = prepare_nanogpt(Path(args.nanogpt), args.data, work / "nanogpt")
        baby = {}
        for name, eval_iters in (("eval_iters 20", 20), ("eval_iters 200", 200)):
            baby[name] = run_nanogpt(nano, name, dict(BABY, eval_iters=eval_iters))
            print(f"nanoGPT's baby run, {name}: {baby[name]['wall_s']:.1f} s, val {baby[name]['val_loss']:.4f}",
                  flush=True)
        demo = time_demo(work, args.pipeline_only)
    text = table(baby, demo, args.pipeline_only)
    print(text)
    if args.out:  # and the pipeline's own report beside it (the PPO row, sample answers), as the run is deleted
        out = Path(args.out)
        out.write_text(text + "\n")
        out.with_name(out.stem + "_report.md").write_text(demo["report"])
    return text


if __name__ == "__main__":
    main()
