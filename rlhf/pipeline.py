"""The four stages end to end on the built-in data: pretraining -> SFT -> reward model -> PPO.

    python -m rlhf.pipeline                 # out/pipeline/{pretrain,sft,reward,ppo}, then report.md
    python -m rlhf.pipeline --fast          # a smoke run in about a minute
    python -m rlhf.pipeline --reward-hacking   # also PPO with beta = 0, a lesson in reward hacking

What each stage is for, on the built-in world (minigpt.corpus, minigpt.tasks): pretraining learns the world's text;
SFT imitates demonstrations, half of which follow the answer with a remark ("12. I think that is right, but I am not
sure."), as demonstrations written by people often do; the reward model learns from preference pairs that users
prefer the bare answer of the asked form; PPO, with the reward model as its only signal, teaches the policy to stop
after the answer. The ground-truth rubric (tasks.ground_truth_score), which no stage sees, measures the gain.

Each stage saves its model and a stage.json with the settings it ran with and the runs of the stages it was made
from; a second run skips the stages already done with the same settings and refuses those done with others (--redo
STAGE redoes one, --force all), so an interrupted pipeline resumes at the stage it was in and a changed one is never
mixed with old models: a stage made from an earlier run of a stage before it (redone, or deleted and run again) is
redone, and an interrupted one (its started.json records what it began with) starts afresh. The pipeline holds its
folder's run.lock while it runs: a second pipeline on the same --out-dir is refused before it touches a stage.

The report has the four-stage table (data, algorithm, model, parameters, wall time), the SFT-vs-RL comparison on
held-out prompts (ground-truth score, reward-model score, KL to the SFT model) with sample responses side by side,
and ppo.png (score and KL over PPO steps).
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from minigpt import tasks
from minigpt.checkpoint import load_resume_checkpoint
from minigpt.config import GPTConfig
from minigpt.files import read_text, write_json, write_jsonl, write_text
from minigpt.options import HelpFormatter, run
from minigpt.runs import hold
from minigpt.sft import DEFAULT_LR, SFTConfig, method_config, run_sft
from minigpt.train import PretrainConfig, TrainConfig, pretrain
from rlhf.evaluate import fmt
from rlhf.policy import RLRun
from rlhf.ppo import PPOConfig, run_ppo
from rlhf.prompts import builtin_prompts
from rlhf.reward_model import RewardConfig, run_reward


@dataclass
class Sizes:
    """How much work each stage does; FAST shrinks everything for a smoke run. The defaults are sized for
    `make demo` on 2 CPU cores (the README has the measured stage times). Pretraining takes batches of 16 windows,
    which reach a loss in fewer tokens than batches of 32; SFT and the reward model keep 32 rows a batch and their
    iterations, as fewer rows or fewer iterations cost accuracy fast."""

    corpus_chars: int = 1_500_000
    pretrain_iters: int = 1150
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    pretrain_eval_windows: int = 320
    n_layer: int = 4
    n_embd: int = 128
    sft_iters: int = 600
    remark_share: float = 0.5  # SFT demonstrations that add a remark after the answer (tasks.sft_examples)
    reward_pairs: int = 20_000
    reward_iters: int = 300
    ppo_steps: int = 30
    ppo_batch: int = 64
    eval_prompts: int = 200
    eval_samples: int = 4  # samples per held-out prompt: sampled accuracy, pass@4
    ppo_vf_lr: float = 1e-3  # the fresh value head learns at its own, higher rate
    # 2 passes over each rollout at lr 2e-5 (0.7x the stage's time) instead of PPO's default 4 at the 1e-5 of the row
    # "beta 1, lr 1e-5" of benchmarks/results/rl.md: the same results over 3 seeds (benchmarks/results/demo.md)
    ppo_epochs: int = 2
    ppo_lr: float = 2e-5


FAST = Sizes(corpus_chars=200_000, pretrain_iters=60, pretrain_batch=32, pretrain_lr=2e-3, n_layer=2, n_embd=64,
             sft_iters=30, reward_pairs=2000, reward_iters=20, ppo_steps=3, ppo_batch=16, eval_prompts=24, eval_samples=2)


def run_stage(out_dir: Path, name: str, fn, force: bool = False, settings: dict | None = None,
              made_from: dict | None = None) -> dict:
    """Run fn(mode) unless out_dir/name/stage.json says it is done; record its results, the settings it ran with,
    the runs it was made from (made_from: {earlier stage: its run_id}), a run_id of its own and its wall time there.
    mode tells the stage to continue an interrupted run of it (a checkpoint is there, begun with these settings on
    these inputs: started.json), or to start afresh over whatever an earlier attempt left (force redoes a finished
    stage). A stage made with other settings (or by an older version, which recorded none) is refused, not silently
    reused; one made from other runs of the stages before it is redone, as its inputs changed."""
    folder = out_dir / name
    marker, started = folder / "stage.json", folder / "started.json"
    record = json.loads(read_text(marker)) if marker.is_file() else None
    interrupted = record is None and any((folder / f).is_file() for f in ("ckpt.pt", "rl_state.pt"))
    if interrupted:  # what it began with; an older version's run recorded nothing, and it began on unrecorded inputs
        record = json.loads(read_text(started)) if started.is_file() else {"made_from": None}
    if record is not None and not force:
        changed = changed_inputs(record.get("made_from"), made_from)
        if changed:
            print(f"== {name}: made from an earlier run of {', '.join(changed)}; redoing it afresh")
            force = True
        elif not interrupted:
            check_same_settings(folder, record.get("settings"), settings)
            print(f"== {name}: done earlier, skipping (stage.json found; --redo {REDO.get(name, name)} to redo)")
            return record | {"skipped": True}
        elif "settings" in record:  # an interrupted run begun with other settings is refused too
            check_same_settings(folder, record["settings"], settings)
    resume = interrupted and not force
    print(f"== {name}" + (": continuing the interrupted run" if resume else ""))
    marker.unlink(missing_ok=True)  # a redo interrupted later must not pass for the run it replaces
    write_json(started, {"settings": settings, "made_from": made_from})
    t0 = time.perf_counter()
    results = fn({"resume": resume, "overwrite": not resume})
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    if settings is not None:
        results["settings"] = settings
    results["made_from"], results["run_id"] = made_from, uuid.uuid4().hex[:12]
    write_json(marker, results)
    return results


def changed_inputs(recorded: dict | None, current: dict | None) -> list[str]:
    """The earlier stages whose run differs between what a stage was made from and what it would be made from now."""
    recorded, current = recorded or {}, current or {}
    return [dep for dep in dict.fromkeys([*current, *recorded]) if recorded.get(dep) != current.get(dep)]


def check_same_settings(folder: Path, recorded: dict | None, settings: dict | None) -> None:
    """Refuse to reuse a finished stage whose recorded settings differ from this run's, naming each difference."""
    if settings is None or recorded == settings:
        return
    if recorded is None:
        raise ValueError(f"{folder} was made by an older version of the pipeline, which did not record its settings; "
                         f"redo it with --redo {REDO.get(folder.name, folder.name)} (or every stage with --force), or "
                         f"pass another --out-dir")
    diffs = ", ".join(f"{k}={recorded.get(k)!r} (now {v!r})" for k, v in settings.items() if recorded.get(k) != v)
    raise ValueError(f"{folder} was made with other settings: {diffs}; redo it with --redo "
                     f"{REDO.get(folder.name, folder.name)} (or every stage with --force), or pass another --out-dir")


def stage_settings(s: Sizes, name: str, **options) -> dict:
    """The sizes one stage reads (the fields of Sizes named after it, the model's shape for pretraining, the
    evaluation's prompts where it uses them) and its options: what stage.json records and a later run compares."""
    shared = {"pretrain": ("corpus_chars", "n_layer", "n_embd"), "sft": ("remark_share", "eval_prompts"),
              "reward": ("eval_prompts",), "ppo": ("eval_prompts", "eval_samples")}[name]
    fields = [f for f in asdict(s) if f in shared or f.startswith(name + "_")]
    return {f: getattr(s, f) for f in fields} | options


# -- the stages -----------------------------------------------------------------------------------------------


def stage_pretrain(out: Path, s: Sizes, progress: bool, mode: dict) -> dict:
    pcfg = PretrainConfig(preset="baby", n_layer=s.n_layer, n_head=4, n_embd=s.n_embd, block_size=128,
                          corpus_chars=s.corpus_chars)
    if mode["resume"]:  # an interrupted run continues with its own GELU (a run of an older version: the tanh one)
        state = load_resume_checkpoint(out / "pretrain")
        pcfg.activation = GPTConfig.from_dict(state["model_config"]).activation
    cfg = TrainConfig(out_dir=str(out / "pretrain"), batch_size=s.pretrain_batch, max_iters=s.pretrain_iters,
                      lr=s.pretrain_lr, min_lr=s.pretrain_lr / 10, warmup_iters=50,
                      eval_interval=max(s.pretrain_iters // 4, 1),
                      eval_iters=max(s.pretrain_eval_windows // s.pretrain_batch, 1), progress=progress, **mode)
    r = pretrain(pcfg, cfg)
    return {"data": f"built-in corpus, {s.corpus_chars:,} characters", "algorithm": "next-token prediction",
            "model": f"GPT {s.n_layer} layers x {s.n_embd} dims", "params": r["params"], "val_loss": r["val_loss"],
            "iters": s.pretrain_iters}


def stage_sft(out: Path, s: Sizes, progress: bool, method: str, mode: dict) -> dict:
    train, test = tasks.sft_examples(remark_share=s.remark_share)
    write_jsonl(out / "data" / "sft_train.jsonl", train)
    write_jsonl(out / "data" / "sft_test.jsonl", test)
    scfg = SFTConfig(method=method, base=str(out / "pretrain"), train_file=str(out / "data" / "sft_train.jsonl"),
                     test_file=str(out / "data" / "sft_test.jsonl"), eval_examples=min(200, s.eval_prompts))
    lr = DEFAULT_LR[method]
    cfg = TrainConfig(out_dir=str(out / "sft"), max_iters=s.sft_iters, batch_size=32, lr=lr, min_lr=lr / 10,
                      warmup_iters=30, weight_decay=0.0, eval_interval=s.sft_iters, eval_iters=1, progress=progress,
                      **mode)
    r = run_sft(scfg, cfg, method_config(method))
    remarks = sum(ex.get("remark", False) for ex in train)
    return {"data": f"{len(train):,} instructions with answers ({remarks:,} with a remark after the answer)",
            "algorithm": f"language modelling on answer tokens ({method})", "model": "SFT model",
            "params": r["total_params"], "trainable": r["trainable_params"], "accuracy": r["accuracy"],
            "accuracy_before": r["before"]["accuracy"], "answer_loss": r["answer_loss"]}


def stage_reward(out: Path, s: Sizes, progress: bool, mode: dict) -> dict:
    rcfg = RewardConfig(sft=str(out / "sft"), n_pairs=s.reward_pairs, n_normalize=min(100, s.eval_prompts))
    cfg = TrainConfig(out_dir=str(out / "reward"), max_iters=s.reward_iters, batch_size=32, lr=1e-3, min_lr=1e-4,
                      warmup_iters=20, weight_decay=0.0, eval_interval=max(s.reward_iters // 3, 1), eval_iters=1,
                      progress=progress, **mode)
    r = run_reward(rcfg, cfg)
    return {"data": f"{s.reward_pairs:,} preference pairs", "algorithm": "Bradley-Terry loss",
            "model": "reward model (SFT backbone + scalar head)", "params": r["total_params"],
            "accuracy": r["accuracy"], "accuracy_by_kind": r["accuracy_by_kind"],
            "probe_accuracy": r.get("probe_accuracy", {})}


def ppo_config(s: Sizes, beta: float) -> PPOConfig:
    """The PPO stage's settings; PPOConfig refuses bad values (main builds it once before any stage runs)."""
    return PPOConfig(steps=s.ppo_steps, batch_size=s.ppo_batch, minibatch_size=min(16, s.ppo_batch),
                     ppo_epochs=s.ppo_epochs, beta=beta, lr=s.ppo_lr, vf_lr=s.ppo_vf_lr)


def stage_ppo(out: Path, s: Sizes, progress: bool, beta: float, name: str, reward: str, mode: dict) -> dict:
    run = RLRun(sft=str(out / "sft"), reward=str(out / "reward"), out_dir=str(out / name),
                eval_prompts=s.eval_prompts, eval_samples=s.eval_samples, progress=progress, **mode)
    r = run_ppo(run, ppo_config(s, beta), reward=reward)
    test = builtin_prompts(n_test=s.eval_prompts)[1]
    before, after = r["before"], r["after"]
    samples = [{"prompt": ex["prompt"], "reference": ex["output"], "sft": b, "rl": a}
               for ex, b, a in list(zip(test, before.pop("greedy_answers"), after.pop("greedy_answers")))[:6]]
    return {"data": f"{len(builtin_prompts()[0]):,} prompts, {s.ppo_steps * s.ppo_batch:,} sampled responses",
            "algorithm": f"PPO ({reward}), KL penalty beta = {beta:g}", "model": "RL model (policy + value head)",
            "params": r["params"], "before": before, "after": after, "samples": samples,
            "first_row": r["first_row"], "last_row": r["last_row"]}


STAGES = ("pretrain", "sft", "reward", "ppo")
DEPENDS = {"pretrain": (), "sft": ("pretrain",), "reward": ("sft",), "ppo": ("sft", "reward")}
REDO = {"ppo_beta0": "ppo"}  # --reward-hacking's second PPO run is redone with the first one


# -- the report -----------------------------------------------------------------------------------------------


def report(out: Path, results: dict) -> str:
    lines = ["# The pipeline on the built-in data", "",
             "| stage | data | algorithm | model | parameters | wall time |", "|---|---|---|---|---:|---:|"]
    for name in ("pretrain", "sft", "reward", "ppo"):
        r = results[name]
        lines.append(f"| {name} | {r['data']} | {r['algorithm']} | {r['model']} | {r['params']:,} | "
                     f"{r['wall_s']:.0f} s |")
    lines += ["", f"Pretraining validation loss {results['pretrain']['val_loss']:.3f}; SFT held-out accuracy "
              f"{results['sft']['accuracy_before']:.1%} -> {results['sft']['accuracy']:.1%}; reward-model held-out "
              f"pairwise accuracy {results['reward']['accuracy']:.1%} ("
              + ", ".join(f"{k} {v:.0%}" for k, v in results["reward"].get("accuracy_by_kind", {}).items())
              + "); on the probes left out of the preference set: "
              + ", ".join(f"{k} {v:.0%}" for k, v in results["reward"].get("probe_accuracy", {}).items())
              + " (near_miss needs the task solved, list_edit a word-by-word copy check).", "",
              f"## SFT model vs RL model on {results['ppo']['before']['n_prompts']} held-out prompts", "",
              f"Each cell is a mean over the prompts ± its standard error; sampled columns use "
              f"{results['ppo']['before']['k']} samples per prompt at temperature 1, as PPO samples.", "",
              "| model | greedy accuracy | sampled accuracy | pass@k | ground-truth score | remarks after the answer | "
              "KL to SFT (nats) | reward-model score |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    runs = [("ppo", "RL (PPO)")] + ([("ppo_beta0", "RL, beta = 0")] if "ppo_beta0" in results else [])
    rows = [("SFT", results["ppo"]["before"])] + [(label, results[key]["after"]) for key, label in runs]
    for label, e in rows:
        cells = [fmt(e[m], percent=True) for m in ("greedy_accuracy", "sampled_accuracy", "pass_at_k")]
        cells += [fmt(e["true_score"]), fmt(e["remarks"], percent=True), fmt(e["kl"], 2),
                  fmt(e["rm_score"]) if "rm_score" in e else "-"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Sample responses (greedy):", "", "| prompt | reference | SFT | RL |", "|---|---|---|---|"]
    for smp in results["ppo"]["samples"]:
        prompt = smp["prompt"].replace("\n", " ").replace("### ", "").replace("|", "/")
        cells = [prompt] + [smp[k].replace("\n", " ").replace("|", "/") for k in ("reference", "sft", "rl")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![score and KL over PPO steps](ppo/ppo.png)"]
    if "ppo_beta0" in results:
        lines += ["", "![PPO with beta = 0](ppo_beta0/ppo.png)"]
    text = "\n".join(lines) + "\n"
    write_text(out / "report.md", text)
    return text


def build_parser():
    p = argparse.ArgumentParser(prog="python -m rlhf.pipeline", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out-dir", default="out/pipeline", help="where every stage writes its folder and the report")
    p.add_argument("--fast", action="store_true", help="tiny sizes: a smoke run in about a minute")
    p.add_argument("--force", action="store_true", help="redo every stage, even those already done (a finished "
                   "stage is skipped when it was made with the sizes and options given now, refused otherwise)")
    p.add_argument("--redo", choices=STAGES, help="redo this stage even if it is done (ppo: with --reward-hacking's "
                   "beta = 0 run); each later stage, made from it, is redone when it runs")
    p.add_argument("--sft-method", default="full", help="full or a PEFT method (see python -m peft.train --help)")
    # a smaller beta or a larger rate buys fewer remarks at a larger KL, and on some SFT models lost accuracy, the
    # policy drifting on list tasks whose one-word errors the reward model cannot see (benchmarks/results/rl.md)
    p.add_argument("--beta", type=float, default=1.0, help="KL coefficient of the PPO stage")
    p.add_argument("--ppo-lr", type=float, help=f"learning rate of the PPO policy (default: {Sizes.ppo_lr:g})")
    p.add_argument("--ppo-epochs", type=int, help=f"PPO's passes over each rollout (default: {Sizes.ppo_epochs}; "
                   "--ppo-epochs 4 --ppo-lr 1e-5 is the earlier setting)")
    p.add_argument("--reward-fn", default="reward_model", choices=["reward_model", "checker", "both"],
                   help="what PPO maximises: the reward model, the world's checker (a verifiable reward), or both")
    p.add_argument("--reward-hacking", action="store_true", help="also run PPO with beta = 0")
    p.add_argument("--stages", default="pretrain,sft,reward,ppo", help="the stages to run, in order, stopping after "
                   "the last one named (e.g. pretrain,sft,reward for the models RL starts from)")
    p.add_argument("--no-progress", action="store_true")
    return p


def made_from(results: dict, name: str) -> dict | None:
    """{earlier stage: its run_id} for the stages name is made from, as far as they recorded one (None: none did)."""
    ids = {dep: results[dep].get("run_id") for dep in DEPENDS[name] if dep in results}
    return {dep: i for dep, i in ids.items() if i is not None} or None


def main(argv=None, sizes: Sizes | None = None) -> dict:
    args = build_parser().parse_args(argv)
    out = Path(args.out_dir)
    s = sizes or (FAST if args.fast else Sizes())
    if args.ppo_lr is not None:
        s = replace(s, ppo_lr=args.ppo_lr)
    if args.ppo_epochs is not None:
        s = replace(s, ppo_epochs=args.ppo_epochs)
    progress = not args.no_progress
    wanted = [x for x in args.stages.split(",") if x]
    if not wanted or [x for x in wanted if x not in STAGES] or wanted != list(STAGES[: len(wanted)]):
        raise ValueError(f"--stages must be the first stages of {','.join(STAGES)} in order, got {args.stages!r}")
    if "ppo" in wanted:
        ppo_config(s, args.beta)  # bad PPO values refused before any stage runs
    if args.redo and args.redo not in wanted:
        raise ValueError(f"--redo {args.redo}: that stage is not among --stages {args.stages}")
    stages = {
        "pretrain": lambda mode: stage_pretrain(out, s, progress, mode),
        "sft": lambda mode: stage_sft(out, s, progress, args.sft_method, mode),
        "reward": lambda mode: stage_reward(out, s, progress, mode),
        "ppo": lambda mode: stage_ppo(out, s, progress, args.beta, "ppo", args.reward_fn, mode),
    }
    settings = {"pretrain": stage_settings(s, "pretrain"), "sft": stage_settings(s, "sft", method=args.sft_method),
                "reward": stage_settings(s, "reward"),
                "ppo": stage_settings(s, "ppo", beta=args.beta, reward=args.reward_fn)}
    t0 = time.perf_counter()
    results = {}
    with hold(out):  # before any stage's marker is touched: a second pipeline on this folder is refused here
        for name in wanted:
            force = args.force or args.redo == name
            results[name] = run_stage(out, name, stages[name], force, settings[name], made_from(results, name))
        if len(wanted) < len(STAGES):
            print(f"pipeline stopped after {wanted[-1]} (--stages) in {time.perf_counter() - t0:.0f} s; in {out}")
            return results
        if args.reward_hacking:
            def hacking(mode):
                return stage_ppo(out, s, progress, 0.0, "ppo_beta0", args.reward_fn, mode)

            results["ppo_beta0"] = run_stage(out, "ppo_beta0", hacking, args.force or args.redo == "ppo",
                                             stage_settings(s, "ppo", beta=0.0, reward=args.reward_fn),
                                             made_from(results, "ppo"))
        print(report(out, results))
    print(f"pipeline finished in {time.perf_counter() - t0:.0f} s; report in {out / 'report.md'}")
    return results


if __name__ == "__main__":
    run(main)
