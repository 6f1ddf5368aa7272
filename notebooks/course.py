"""What the course notebooks share: their furniture, not part of the library (the library is minigpt/, peft/, rlhf/).

- ``FAST``: the notebooks' fast mode (MINIGPT_FAST=1, which the tests set): tiny models, a few iterations.
- ``OUT``: where the notebooks write, ``_out`` next to them (``MINIGPT_COURSE_OUT`` moves it: the tests share one
  folder between the notebooks of a session).
- ``base_model()``, ``sft_model()``, ``reward_model()``: the models several notebooks start from, built once through
  the library's stage functions (``minigpt.train.pretrain``, ``minigpt.sft.run_sft``, ``rlhf.reward_model.run_reward``)
  and reused while the library's source and the settings stay the same (a fingerprint of both is kept beside them).
- ``evaluate_answers``: the greedy answers to held-out SFT examples, scored three ways, each with its standard error.
- ``answers_table``: before / after answers side by side.
- ``show_source``: a library function's source, with the file it lives in.
- ``read_result``: a file of benchmarks/results; the files read are listed for the check that outputs are current.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import textwrap
from pathlib import Path

FAST = os.environ.get("MINIGPT_FAST") == "1"
ROOT = Path(__file__).resolve().parents[1]  # the repository
OUT = Path(os.environ.get("MINIGPT_COURSE_OUT", "_out"))
READ_FILES: list[str] = []  # repository files read by read_result, for tests/test_notebooks.py


def out_dir(name: str, clear: bool = True) -> Path:
    """OUT/name, emptied first (a notebook re-run starts from nothing)."""
    folder = OUT / name
    if clear:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- the shared models ---------------------------------------------------------------------------------------------


def _source_hash(packages) -> str:
    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((ROOT / package).glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _cached(name: str, settings: dict, packages, build) -> Path:
    """OUT/shared/name, built by build(folder) -> results unless a build with the same settings and the same library
    source is already there. Built in a temporary folder, then renamed, so a half-built model is never reused."""
    folder = OUT / "shared" / name
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                         + _source_hash(packages).encode()).hexdigest()
    marker = folder / "course.json"
    if marker.is_file() and json.loads(marker.read_text())["key"] == key:
        return folder
    tmp = folder.with_name(f"{name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    results = build(tmp)
    (tmp / "course.json").write_text(json.dumps({"key": key, "settings": settings, "results": results}, indent=1,
                                                default=str))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def cached_results(folder) -> dict:
    """What the build of a shared model returned (its stage function's results)."""
    return json.loads((Path(folder) / "course.json").read_text())["results"]


def base_settings():
    """(PretrainConfig, TrainConfig) of the shared base: 4 blocks of 64 dimensions and a context of 128 tokens
    (room for the longest SFT example), pretrained on the built-in corpus."""
    from minigpt.train import PretrainConfig, TrainConfig

    pcfg = PretrainConfig(n_layer=1 if FAST else 4, n_head=4, n_embd=32 if FAST else 64, block_size=128,
                          corpus_chars=100_000 if FAST else 400_000, vocab_size=512)
    cfg = TrainConfig(max_iters=30 if FAST else 600, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_iters=20,
                      eval_interval=30 if FAST else 200, eval_iters=4 if FAST else 10, progress=False, plot=False)
    return pcfg, cfg


def base_model() -> Path:
    """The folder of the pretrained base that notebooks 05-11 start from (minigpt.train.pretrain)."""
    from minigpt.train import pretrain

    pcfg, cfg = base_settings()

    def build(folder):
        return pretrain(pcfg, dataclasses.replace(cfg, out_dir=str(folder)))

    return _cached("base", {"pretrain": dataclasses.asdict(pcfg), "train": dataclasses.asdict(cfg)}, ["minigpt"],
                   build)


def sft_settings():
    """(SFTConfig, TrainConfig) of the SFT model the RL notebooks start from: all weights, on the built-in
    instructions, half of whose demonstrations follow the answer with a remark (as in the pipeline)."""
    from minigpt.sft import SFTConfig
    from minigpt.train import TrainConfig

    scfg = SFTConfig(method="full", base="<the shared base>", remark_share=0.5, eval_examples=20 if FAST else 200)
    cfg = TrainConfig(max_iters=15 if FAST else 500, batch_size=8 if FAST else 32, lr=3e-3, min_lr=3e-4,
                      warmup_iters=10 if FAST else 30, weight_decay=0.0, eval_interval=15 if FAST else 500,
                      eval_iters=1, progress=False, plot=False)
    return scfg, cfg


def sft_model() -> Path:
    """The folder of the SFT model of notebooks 08-11 (minigpt.sft.run_sft on the shared base)."""
    from minigpt.sft import run_sft

    base = base_model()
    scfg, cfg = sft_settings()

    def build(folder):
        results = run_sft(dataclasses.replace(scfg, base=str(base)), dataclasses.replace(cfg, out_dir=str(folder)))
        return {k: v for k, v in results.items() if k != "saved"}

    settings = {"sft": dataclasses.asdict(scfg), "train": dataclasses.asdict(cfg), "base": cached_results(base)}
    return _cached("sft", settings, ["minigpt", "peft"], build)


def reward_settings():
    """(RewardConfig, TrainConfig) of the reward model of notebooks 08-09 (rlhf.reward_model.run_reward)."""
    from minigpt.train import TrainConfig
    from rlhf.reward_model import RewardConfig

    rcfg = RewardConfig(sft="<the shared SFT model>", peft="full", n_pairs=400 if FAST else 20_000,
                        eval_pairs=40 if FAST else 200, n_normalize=16 if FAST else 256)
    cfg = TrainConfig(max_iters=10 if FAST else 400, batch_size=8 if FAST else 32, lr=1e-3, min_lr=1e-4,
                      warmup_iters=5 if FAST else 20, weight_decay=0.0, eval_interval=5 if FAST else 50,
                      eval_iters=1, progress=False, plot=False)
    return rcfg, cfg


def reward_model() -> Path:
    """The folder of the reward model trained from the shared SFT model."""
    from rlhf.reward_model import run_reward

    sft = sft_model()
    rcfg, cfg = reward_settings()

    def build(folder):
        return run_reward(dataclasses.replace(rcfg, sft=str(sft)), dataclasses.replace(cfg, out_dir=str(folder)))

    settings = {"reward": dataclasses.asdict(rcfg), "train": dataclasses.asdict(cfg), "sft": cached_results(sft)}
    return _cached("reward", settings, ["minigpt", "peft", "rlhf"], build)


def metrics(folder, name: str = "metrics.jsonl") -> list[dict]:
    """The rows a run logged (minigpt.train writes metrics.jsonl; PPO and GRPO ppo_/grpo_metrics.jsonl)."""
    return [json.loads(line) for line in (Path(folder) / name).read_text().splitlines() if line.strip()]


# -- measuring SFT answers -------------------------------------------------------------------------------------------


def mean_se(values) -> dict:
    """{"mean", "se"}: the mean and its standard error (rlhf.evaluate.mean_se)."""
    from rlhf.evaluate import mean_se as library_mean_se

    return dict(zip(("mean", "se"), library_mean_se(values)))


def evaluate_answers(model, tokenizer, examples, max_new_tokens: int = 32) -> dict:
    """Greedy answers to the examples (minigpt.sft.generate_answers) and three scores, each a mean with its standard
    error: exact match (tasks.check_answer), well-formed (tasks.well_formed: the answer has the reference's form, a
    number for a number, the input's words for a list, a place for a place) and the graded ground-truth score
    (tasks.ground_truth_score); and the held-out answer loss (minigpt.sft.answer_loss)."""
    from minigpt import engine, sft, tasks

    answers = sft.generate_answers(model, tokenizer, examples, max_new_tokens)
    encoded = sft.encode_dataset(tokenizer, examples, engine.context_window(model))
    correct = [float(tasks.check_answer(ex, a)) for ex, a in zip(examples, answers)]
    formed = [float(tasks.well_formed(ex, a)) for ex, a in zip(examples, answers)]
    by_task = {}
    for ex, c in zip(examples, correct):
        by_task.setdefault(ex["task"], []).append(c)
    return {"accuracy": mean_se(correct),
            "well_formed": mean_se(formed),
            "score": mean_se([tasks.ground_truth_score(ex, a) for ex, a in zip(examples, answers)]),
            "answer_loss": sft.answer_loss(model, encoded, tokenizer.pad_token_id),
            "by_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())},
            "correct": correct, "formed": formed, "answers": answers, "n": len(examples)}


def pct(m: dict) -> str:
    """'12.5% ± 2.3' from {"mean", "se"}."""
    return f"{100 * m['mean']:.1f}% ± {100 * m['se']:.1f}"


def change(before: list[float], after: list[float]) -> str:
    """The change of a per-example score between two evaluations on the same examples, in points, with the standard
    error of the paired differences, and whether it is more than two standard errors from zero."""
    d = mean_se([a - b for a, b in zip(after, before)])
    verdict = ("a real rise" if d["mean"] > 2 * d["se"] and d["mean"] > 0 else
               "a real fall" if d["mean"] < -2 * d["se"] and d["mean"] < 0 else
               "within two standard errors of no change")
    return f"{100 * d['mean']:+.1f} ± {100 * d['se']:.1f} points ({verdict})"


def policy_change(before: dict, after: dict, metric: str, percent: bool = False) -> str:
    """How metric moved between two rlhf.evaluate.evaluate_policy results on the same prompts: both values with
    their standard errors, and the paired difference (rlhf.evaluate.gain) with its verdict."""
    from rlhf.evaluate import fmt, gain

    d = gain(before, after, metric)
    verdict = ("a real rise" if d["mean"] > 2 * d["se"] and d["mean"] > 0 else
               "a real fall" if d["mean"] < -2 * d["se"] and d["mean"] < 0 else
               "within two standard errors of no change")
    scale, unit = (100, " points") if percent else (1, "")
    return (f"{fmt(before[metric], percent=percent)} -> {fmt(after[metric], percent=percent)} "
            f"(paired change {scale * d['mean']:+.{1 if percent else 3}f} ± {scale * d['se']:.{1 if percent else 3}f}"
            f"{unit}: {verdict})")


def report(name: str, before: dict, after: dict) -> str:
    """Three lines: the answer loss, exact match and well-formed answers, before and after, with standard errors."""
    return (f"{name} on {after['n']} held-out examples:\n"
            f"  answer loss   {before['answer_loss']:.3f} -> {after['answer_loss']:.3f} nats per answer token\n"
            f"  exact match   {pct(before['accuracy'])} -> {pct(after['accuracy'])}: "
            f"{change(before['correct'], after['correct'])}\n"
            f"  well-formed   {pct(before['well_formed'])} -> {pct(after['well_formed'])}: "
            f"{change(before['formed'], after['formed'])}")


def answers_table(examples, columns: dict, n: int = 6) -> str:
    """A Markdown table of the first n examples: the question, the reference answer, then each column's answer with
    a tick when it is exactly right."""
    from minigpt import tasks

    cell = lambda s: s.strip().replace("\n", "⏎").replace("|", "/") or "(nothing)"
    lines = ["| question | reference | " + " | ".join(columns) + " |", "|---" * (2 + len(columns)) + "|"]
    for i, ex in enumerate(examples[:n]):
        question = (ex["instruction"] + " " + ex.get("input", "")).strip()
        marks = [("✓ " if tasks.check_answer(ex, answers[i]) else "✗ ") + cell(answers[i][:40])
                 for answers in columns.values()]
        lines.append(f"| {cell(question[:60])} | {cell(ex['output'])} | " + " | ".join(marks) + " |")
    return "\n".join(lines)


def plot_sft_runs(runs: dict, base_loss: float | None = None, title: str = "Held-out answer loss"):
    """The held-out answer loss logged during fine-tuning (metrics.jsonl) of each run {label: folder}, with the
    base model's as a dashed line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for i, (label, folder) in enumerate(runs.items()):
        rows = metrics(folder)
        val = [r for r in rows if r.get("val_loss") is not None]
        ax.plot([r["iter"] for r in rows], [r["train_loss"] for r in rows], lw=0.8, alpha=0.5, color=f"C{i}")
        ax.plot([r["iter"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, color=f"C{i}",
                label=f"{label}: held-out (thin: training batches)")
    if base_loss is not None:
        ax.axhline(base_loss, color="grey", ls="--", lw=1, label="the base model, before")
    ax.set_xlabel("iteration")
    ax.set_ylabel("answer loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    plt.show()


# -- showing the library ----------------------------------------------------------------------------------------------


def show_source(obj, max_lines: int | None = None) -> None:
    """Display obj's source (a function or class of the library) under the file and line it comes from."""
    from IPython.display import Markdown, display

    lines, start = inspect.getsourcelines(obj)
    path = Path(inspect.getsourcefile(obj)).resolve().relative_to(ROOT)
    shown = textwrap.dedent("".join(lines if max_lines is None else lines[:max_lines])).rstrip()
    more = "" if max_lines is None or len(lines) <= max_lines else f"\n    # ... {len(lines) - max_lines} more lines"
    display(Markdown(f"`{path}`, line {start}: `{obj.__qualname__}`\n```python\n{shown}{more}\n```"))


def read_result(name: str):
    """The file benchmarks/results/name (parsed when it is JSON), or None when it has not been written yet."""
    path = ROOT / "benchmarks" / "results" / name
    if not path.is_file():
        return None
    READ_FILES.append(str(path.relative_to(ROOT)))
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else text


def result_path(name: str) -> Path | None:
    """benchmarks/results/name, recorded as read, or None when it is not there (an image, say)."""
    path = ROOT / "benchmarks" / "results" / name
    if not path.is_file():
        return None
    READ_FILES.append(str(path.relative_to(ROOT)))
    return path
