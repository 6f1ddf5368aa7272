"""Every alignment method from the same SFT model, in one table (make bench-rl).

    python benchmarks/bench_rl.py --from out/pipeline     # the SFT and reward models make demo trained
    python benchmarks/bench_rl.py                         # trains them first (the pipeline's first three stages)
    python benchmarks/bench_rl.py --seeds 0 --methods ppo_rm,grpo_checker --budget 1920 --jobs 2

Rows: the SFT model, then PPO with the reward model (beta 0.5 and lr 2e-5, the pipeline's setting when the table was
first measured, and beta 1 at lr 1e-5, its default after that, both at PPO's 4 epochs; the pipeline now takes 2
epochs at lr 2e-5), PPO with the verifiable reward (the world's checker; beta
0.1, 2 passes of minibatches of 32 a rollout, temperature 0.7: the recipe of rl_greedy.md), GRPO with the verifiable
reward (temperature 0.7, its defaults otherwise), DPO on the built-in preference pairs, and DPO on on-policy pairs (the
SFT model's own samples ordered by the checker). Every RL method gets the same budget of sampled responses (--budget
B, default 7,680: PPO B/64 steps x 64, GRPO B/64 steps x 8 prompts x 8, DPO's on-policy pairs from B/4 prompts x 4);
DPO trains --dpo-steps optimizer steps (default 192) on either kind of pair, as 4x that over-optimised
(rl_dpo_steps.md); DPO on the built-in pairs samples nothing. Each method runs with several seeds (the seed of its
sampling and order); every run is evaluated on the same held-out prompts (rlhf.evaluate, 4 samples a prompt at
temperature 1), and the table gives the mean over seeds +- their standard deviation, the gain in greedy accuracy over
the SFT model on the same prompts (paired) +- its standard error, and the greedy gain on a larger set of distinct
held-out prompts (--gain-prompts), averaged over the seeds per prompt, +- its standard error: a gain of a few points
needs that many prompts to stand out. Runs go to worker processes
(--jobs), each on one thread. Writes benchmarks/results/rl.md, rl.json and rl.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BUDGET = 7680  # sampled responses per RL run (the default of --budget)
DPO_STEPS = 192  # DPO's optimizer steps of 16 pairs (the default of --dpo-steps): 768 over-optimised (rl_dpo_steps.md)
METHODS = {
    "ppo_rm": "PPO + reward model",
    "ppo_rm_beta1": "PPO + reward model, beta 1, lr 1e-5",
    "ppo_checker": "PPO + verifiable reward",
    "grpo_checker": "GRPO + verifiable reward",
    "dpo_builtin": "DPO, built-in pairs",
    "dpo_on_policy": "DPO, on-policy pairs",
}
COLUMNS = [("greedy_accuracy", "greedy accuracy", True), ("sampled_accuracy", "sampled accuracy", True),
           ("pass_at_k", "pass@4", True), ("true_score", "ground-truth score", False),
           ("remarks", "remarks after the answer", True), ("kl", "KL to SFT (nats)", False)]


def configs(method: str, seed: int, out: str, budget: int = BUDGET, dpo_steps: int = DPO_STEPS) -> dict:
    """The settings of one run with budget sampled responses: the algorithm's config (and DPO's training config), as
    plain values. DPO takes dpo_steps optimizer steps whatever the budget (its on-policy pairs grow with it)."""
    import dataclasses

    from minigpt.train import TrainConfig
    from rlhf.dpo import DPOConfig
    from rlhf.grpo import GRPOConfig
    from rlhf.ppo import PPOConfig

    steps = budget // 64
    if method == "ppo_checker":  # the recipe that gained greedy accuracy (rl_greedy.md): GRPO's 4 updates a rollout
        return {"ppo": dataclasses.asdict(PPOConfig(steps=steps, batch_size=64, minibatch_size=32, ppo_epochs=2,
                                                    temperature=0.7, lr=2e-5, vf_lr=1e-3, beta=0.1, seed=seed))}
    if method.startswith("ppo"):  # beta 0.5, lr 2e-5 (the pipeline's first setting); ppo_rm_beta1: its second
        beta, lr = (1.0, 1e-5) if method == "ppo_rm_beta1" else (0.5, 2e-5)
        return {"ppo": dataclasses.asdict(PPOConfig(steps=steps, batch_size=64, minibatch_size=16, lr=lr,
                                                    vf_lr=1e-3, beta=beta, seed=seed))}
    if method == "grpo_checker":
        return {"grpo": dataclasses.asdict(GRPOConfig(steps=steps, prompts_per_step=8, group_size=8, temperature=0.7,
                                                      seed=seed))}
    dcfg = DPOConfig(pairs="builtin" if method == "dpo_builtin" else "on_policy", on_policy_prompts=budget // 4,
                     samples_per_prompt=4)
    tcfg = TrainConfig(max_iters=dpo_steps, batch_size=16, lr=1e-5, min_lr=1e-6, warmup_iters=10, weight_decay=0.0,
                       eval_interval=50, eval_iters=1, log_interval=5, out_dir=out, seed=1337 + seed, progress=False,
                       overwrite=True)
    return {"dpo": dataclasses.asdict(dcfg), "train": dataclasses.asdict(tcfg)}


def run_one(method: str, seed: int, base: str, out: str, eval_prompts: int, budget: int = BUDGET,
            dpo_steps: int = DPO_STEPS) -> dict:
    """One method with one seed, in a worker process; returns its evaluation before and after, and its wall time.
    A run whose bench.json records the same settings is read back instead of run again."""
    import torch

    torch.set_num_threads(1)
    from minigpt.train import TrainConfig
    from rlhf.dpo import DPOConfig, run_dpo
    from rlhf.grpo import GRPOConfig, run_grpo
    from rlhf.policy import RLRun
    from rlhf.ppo import PPOConfig, run_ppo

    settings = {"method": method, "seed": seed, "base": base, "eval_prompts": eval_prompts,
                **configs(method, seed, out, budget, dpo_steps)}
    saved = Path(out) / "bench.json"
    if saved.is_file():
        done = json.loads(saved.read_text())
        if done["settings"] == json.loads(json.dumps(settings)):
            print(f"  {method} seed {seed}: reusing {saved}", flush=True)
            return done
    run = RLRun(sft=f"{base}/sft", reward=f"{base}/reward", out_dir=out, eval_prompts=eval_prompts, eval_samples=4,
                progress=False, overwrite=True)
    t0 = time.perf_counter()
    if method.startswith("ppo"):
        r = run_ppo(run, PPOConfig(**settings["ppo"]), reward="checker" if method == "ppo_checker" else "reward_model")
    elif method == "grpo_checker":
        r = run_grpo(run, GRPOConfig(**settings["grpo"]), reward="checker")
    else:
        r = run_dpo(run, DPOConfig(**settings["dpo"]), TrainConfig(**settings["train"]))
    done = {"method": method, "seed": seed, "wall_s": time.perf_counter() - t0, "before": r["before"],
            "after": r["after"], "settings": settings}
    saved.write_text(json.dumps(done))
    print(f"  {method} seed {seed}: {done['wall_s']:.0f} s", flush=True)
    return done


def summarize(runs: list[dict]) -> dict:
    """{method: {metric: {"mean", "sd"}, "gain": {"mean", "sd"}, "gain_se": ..., "wall_s": ...}} and the SFT row."""
    from rlhf.evaluate import gain, over_seeds

    table = {"sft": over_seeds([runs[0]["before"]])}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        row = over_seeds([r["after"] for r in mine])
        gains = [gain(r["before"], r["after"]) for r in mine]
        row["gain"] = {"mean": statistics.fmean(g["mean"] for g in gains),
                       "sd": statistics.stdev([g["mean"] for g in gains]) if len(gains) > 1 else 0.0}
        row["gain_se"] = statistics.fmean(g["se"] for g in gains)  # the paired standard error of one run
        row["wall_s"] = {"mean": statistics.fmean(r["wall_s"] for r in mine), "sd": 0.0}
        row["seeds"] = len(mine)
        table[method] = row
    return table


def settings(budget: int, dpo_steps: int) -> str:
    """One sentence on the settings that differ between the methods, read from configs()."""
    rm, checker = configs("ppo_rm", 0, "", budget)["ppo"], configs("ppo_checker", 0, "", budget)["ppo"]
    grpo, dpo = configs("grpo_checker", 0, "", budget)["grpo"], configs("dpo_on_policy", 0, "", budget, dpo_steps)
    def lr(x):
        return str(x).replace("e-0", "e-")  # 2e-05 -> 2e-5

    return (f"Settings (configs() in benchmarks/bench_rl.py): PPO + reward model at PPO's {rm['ppo_epochs']} epochs of "
            f"minibatches of {rm['minibatch_size']} a rollout, temperature {rm['temperature']:g} (and "
            f"{rm['normalize_samples']} responses first to normalise the reward model's scores); PPO + verifiable "
            f"reward at beta {checker['beta']:g}, lr {lr(checker['lr'])}, {checker['ppo_epochs']} epochs of "
            f"{checker['minibatch_size']}, temperature {checker['temperature']:g}; GRPO at temperature "
            f"{grpo['temperature']:g}, its defaults otherwise; DPO at beta {dpo['dpo']['beta']:g}, lr "
            f"{lr(dpo['train']['lr'])}, {dpo['train']['max_iters']} optimizer steps of {dpo['train']['batch_size']} "
            "pairs.")


def write_table(table: dict, runs: list[dict], path: Path, args, wide: dict | None = None) -> str:
    """rl.md: the table, and under "wide" (from wide_gains) a last column of greedy gains on more prompts."""
    from rlhf.evaluate import fmt

    n = runs[0]["before"]["n_prompts"]
    sft = f"{args.base}/sft" if not Path(args.base).is_absolute() else "sft/ of the --from folder"  # no machine paths
    load = os.getloadavg()
    lines = ["# Every alignment method from the same SFT model", "",
             f"{n} held-out prompts (the built-in PPO test prompts), 4 samples each at temperature 1; the same SFT "
             f"model ({sft}) and reward model for every run; each RL method sampled {args.budget:,} responses "
             f"(DPO on the built-in pairs none). Cells: mean over {max(r.get('seeds', 1) for r in table.values())} "
             "seeds +- their standard deviation (the SFT row: one evaluation +- its standard error over prompts). "
             "Greedy gain: greedy accuracy minus the SFT model's on the same prompts, with the paired standard "
             "error of one run." + ("" if wide is None else
             f" Greedy gain on {wide['n_prompts']}: on the {wide['n_prompts']} distinct prompts among the first "
             f"{args.gain_prompts} held-out ones (the SFT model {100 * wide['sft_accuracy']:.1f}% greedy there), "
             "each prompt's change averaged over the seeds, +- its standard error over prompts."), "",
             settings(args.budget, args.dpo_steps), "",
             "| method | " + " | ".join(label for _, label, _ in COLUMNS) + " | greedy gain (paired SE) | "
             + ("" if wide is None else f"greedy gain on {wide['n_prompts']} (SE) | ") + "wall time |",
             "|---|" + "---:|" * (len(COLUMNS) + 2 + (wide is not None))]
    sft = runs[0]["before"]
    cells = [fmt(sft[k], percent=pct) if k in sft else "-" for k, _, pct in COLUMNS]
    lines.append("| SFT | " + " | ".join(cells) + " | - |" + ("" if wide is None else " - |") + " - |")
    for method, label in METHODS.items():
        row = table.get(method)
        if row is None:
            continue
        cells = [fmt(row[k], percent=pct) if k in row else "-" for k, _, pct in COLUMNS]
        g = row["gain"]
        w = "" if wide is None else (f" {100 * wide['methods'][method]['mean']:+.1f} "
                                     f"({100 * wide['methods'][method]['se']:.1f}) |")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * g['mean']:+.1f} +- {100 * g['sd']:.1f} "
                     f"({100 * row['gain_se']:.1f}) |{w} {row['wall_s']['mean']:.0f} s |")
    lines += ["", "Wall time: one run's, from loading the models to saving the policy, the evaluations before and "
              "after included, on one thread while other runs shared the CPUs (load average when this table was "
              f"written: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; runs read back from bench.json may come from "
              "other times), so these times say little about speed."]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(table: dict, path: Path, wide: dict | None = None) -> None:
    """rl.png: four metrics by method (mean over seeds +- sd) and, with wide, the greedy gain on the larger set with
    bars of two standard errors (a bar that clears zero is the goal of a gain above two standard errors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["sft"] + [m for m in METHODS if m in table]
    labels = ["SFT"] + [METHODS[m] for m in names[1:]]
    panels = (("greedy_accuracy", "greedy accuracy"), ("sampled_accuracy", "sampled accuracy"),
              ("remarks", "remarks after the answer"), ("kl", "KL to SFT (nats)"))
    n_axes = len(panels) + (wide is not None)
    fig, axes = plt.subplots(1, n_axes, figsize=(4 * n_axes, 4))
    for ax, (key, title) in zip(axes, panels):
        means = [table[m].get(key, {"mean": 0})["mean"] for m in names]
        sds = [table[m].get(key, {"sd": 0}).get("sd", 0) for m in names]
        ax.bar(range(len(names)), means, yerr=sds, color=[f"C{i}" for i in range(len(names))], capsize=3)
        ax.set_xticks(range(len(names)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    if wide is not None:
        ax = axes[-1]
        gains = [wide["methods"][m] for m in names[1:]]
        ax.bar(range(1, len(names)), [100 * g["mean"] for g in gains], yerr=[200 * g["se"] for g in gains],
               color=[f"C{i}" for i in range(1, len(names))], capsize=3)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(1, len(names)), labels[1:], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"greedy gain on {wide['n_prompts']} prompts\n(points, bars: 2 SE)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Alignment methods from the same SFT model (mean over seeds +- sd)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headroom(base: str, eval_prompts: int, path: Path, k: int = 16, temperatures=(0.3, 0.7, 1.0)) -> str:
    """How much greedy accuracy RL could buy by re-ranking what the SFT model already samples: on the held-out
    prompts, how many of those it answers wrongly when greedy it sometimes answers rightly when sampling (k samples at
    each temperature), and how many of those it answers rightly when greedy it samples wrongly more than half the
    time (the ones a policy moved by sampled rewards can lose). A policy gradient raises the probability of sampled
    answers that scored well; the greedy answer changes only where a right answer already has some probability."""
    import torch

    from minigpt import checkpoint
    from rlhf.evaluate import evaluate_policy
    from rlhf.prompts import builtin_prompts

    torch.manual_seed(0)
    loaded = checkpoint.load(f"{base}/sft")
    test = builtin_prompts(n_test=eval_prompts)[1]
    lines = ["# Headroom: what the SFT model already samples", "",
             f"The SFT model ({Path(base).name}/sft) on {len(test)} held-out prompts (the built-in PPO test prompts), "
             f"{k} samples a prompt at each temperature (python benchmarks/bench_rl.py --headroom).", "",
             "| temperature | sampled accuracy | greedy wrong: some sample right | greedy wrong: at least 1/4 of "
             "samples right | greedy right: under 1/2 of samples right |", "|---:|---:|---:|---:|---:|"]
    for t in temperatures:
        ev = evaluate_policy(loaded.model, loaded.tokenizer, test, k=k, temperature=t)
        pairs = list(zip(ev["per_prompt"]["greedy_accuracy"], ev["per_prompt"]["sampled_accuracy"]))
        wrong = [s for g, s in pairs if g == 0]
        right = [s for g, s in pairs if g == 1]
        lines.append(f"| {t:g} | {ev['sampled_accuracy']['mean']:.1%} | {sum(s > 0 for s in wrong)} of {len(wrong)} | "
                     f"{sum(s >= 0.25 for s in wrong)} of {len(wrong)} | {sum(s < 0.5 for s in right)} of "
                     f"{len(right)} |")
    lines += ["", f"Greedy accuracy {len(right) / len(pairs):.1%} ({len(right)} of {len(pairs)})."]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def distinct_prompts(eval_prompts: int) -> list[dict]:
    """The distinct prompts among the first eval_prompts built-in held-out ones: a small family repeats in a long
    list, and a prompt counted twice would weigh double in a standard error."""
    from rlhf.prompts import builtin_prompts

    test, seen = [], set()
    for ex in builtin_prompts(n_test=eval_prompts)[1]:
        if (ex["instruction"], ex["input"]) not in seen:
            seen.add((ex["instruction"], ex["input"]))
            test.append(ex)
    return test


def greedy_correct(folder: str, test: list[dict]) -> list[float]:
    """1.0 or 0.0 for each prompt of test: whether the greedy answer of the model in folder passes the checker."""
    import torch

    from minigpt import checkpoint, tasks
    from rlhf.evaluate import greedy_answers

    with torch.no_grad():
        model, tok = checkpoint.load_model(folder)
        return [float(tasks.check_answer(ex, a)) for ex, a in zip(test, greedy_answers(model, tok, test))]


def wide_gains(base: str, groups: dict[str, list[str]], eval_prompts: int) -> dict:
    """For each method's runs (policy folders, one per seed), the greedy gain over base's SFT model on the distinct
    prompts among eval_prompts held-out ones, each prompt's change averaged over the runs (gain_over_seeds)."""
    from rlhf.evaluate import gain_over_seeds

    test = distinct_prompts(eval_prompts)
    before = greedy_correct(f"{base}/sft", test)
    methods = {m: gain_over_seeds(before, [greedy_correct(run, test) for run in runs]) for m, runs in groups.items()}
    return {"n_prompts": len(test), "sft_accuracy": statistics.fmean(before), "methods": methods}


def greedy_gain(base: str, groups: list[list[str]], eval_prompts: int, path: Path) -> str:
    """The greedy accuracy of each run's policy against the SFT model of base on the distinct prompts among
    eval_prompts held-out ones: a larger set than the table's, as a gain of a few points needs one to stand out.
    Each run's paired gain and, for each group of runs (one method's seeds), the change averaged over its runs per
    prompt (gain_over_seeds), with standard errors."""
    from rlhf.evaluate import gain_over_seeds, mean_se

    test = distinct_prompts(eval_prompts)

    def row(name, accuracy, gain, extra=""):
        ratio = gain["mean"] / gain["se"] if gain["se"] else float("nan")
        return f"| {name} | {accuracy:.1%} | {100 * gain['mean']:+.2f} ({100 * gain['se']:.2f}) | {ratio:.2f} |{extra}"

    before = greedy_correct(f"{base}/sft", test)
    flags = " ".join(f"--greedy-gain {','.join(g)}" for g in groups)
    lines = ["# Greedy accuracy on a larger held-out set", "",
             f"{len(test)} distinct held-out prompts (of the first {eval_prompts} built-in PPO test prompts); the SFT "
             f"model of {base}: greedy accuracy {statistics.fmean(before):.1%}. Gains are paired (the same prompts), "
             f"in points, +- their standard error (python benchmarks/bench_rl.py {flags} --from {base} "
             f"--eval-prompts {eval_prompts}).", "",
             "| run | greedy accuracy | gain (SE) | gain / SE | prompts gained | prompts lost |",
             "|---|---:|---:|---:|---:|---:|"]
    for runs in groups:
        afters = [greedy_correct(run, test) for run in runs]
        for run, after in zip(runs, afters):
            gain = dict(zip(("mean", "se"), mean_se([a - b for a, b in zip(after, before)])))
            lines.append(row(run, statistics.fmean(after), gain, f" {sum(a > b for a, b in zip(after, before))} | "
                                                               f"{sum(a < b for a, b in zip(after, before))} |"))
        averaged = gain_over_seeds(before, afters)
        lines.append(row(f"the {len(runs)} run(s) above, averaged per prompt", statistics.fmean(before) + averaged["mean"],
                         averaged, " | |"))
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--from", dest="base", default=None, help="a pipeline output folder with sft/ and reward/ (default: "
                   "train them into OUT/base)")
    p.add_argument("--out", default="out/bench_rl", help="where the runs go (default out/bench_rl)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts (default 200)")
    p.add_argument("--budget", type=int, default=BUDGET, help=f"sampled responses per RL run (default {BUDGET}; "
                   "a multiple of 64)")
    p.add_argument("--dpo-steps", type=int, default=DPO_STEPS, help=f"DPO's optimizer steps of 16 pairs, whatever the "
                   f"budget (default {DPO_STEPS})")
    p.add_argument("--gain-prompts", type=int, default=1000, help="held-out prompts whose distinct ones measure the "
                   "wide greedy gain, per prompt over seeds (default 1000; 0: none)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each (default 2)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where rl.md, rl.json, rl.png go")
    p.add_argument("--headroom", action="store_true", help="instead: what the SFT model of --from already samples "
                   "right where its greedy answer is wrong (rl_headroom.md)")
    p.add_argument("--greedy-gain", metavar="RUNS", action="append", default=None, help="instead: the greedy "
                   "accuracy of these comma-separated policy folders (one method's seeds; repeat the flag for another "
                   "method) against --from's SFT model on the distinct prompts among --eval-prompts held-out ones "
                   "(rl_greedy.md)")
    args = p.parse_args(argv)
    if args.greedy_gain:
        if args.base is None:
            p.error("--greedy-gain needs --from (the pipeline output folder whose sft/ the runs started from)")
        groups = [[r for r in runs.split(",") if r] for runs in args.greedy_gain]
        return print(greedy_gain(args.base, groups, args.eval_prompts, Path(args.results) / "rl_greedy.md"))
    if args.headroom:
        if args.base is None:
            p.error("--headroom needs --from (a pipeline output folder with sft/)")
        return print(headroom(args.base, args.eval_prompts, Path(args.results) / "rl_headroom.md"))
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; expected some of {list(METHODS)}")
    if args.budget < 64 or args.budget % 64:
        p.error(f"--budget must be a positive multiple of 64 (PPO's and GRPO's responses a step), got {args.budget}")
    if args.dpo_steps < 1:
        p.error(f"--dpo-steps must be >= 1, got {args.dpo_steps}")
    if args.base is None:
        from rlhf import pipeline

        args.base = f"{args.out}/base"
        pipeline.main(["--out-dir", args.base, "--no-progress", "--stages", "pretrain,sft,reward"])
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(m, s, args.base, f"{args.out}/{m}/seed{s}", args.eval_prompts, args.budget, args.dpo_steps)
            for m in methods for s in seeds]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(run_one, *zip(*jobs)))
    table = summarize(runs)
    wide = None if not args.gain_prompts else wide_gains(
        args.base, {m: [f"{args.out}/{m}/seed{s}" for s in seeds] for m in methods}, args.gain_prompts)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "rl.json").write_text(json.dumps({"table": table, "runs": [
        {k: v for k, v in r.items() if k not in ("before", "after")} | {"after": strip(r["after"])}
        for r in runs], "sft": strip(runs[0]["before"]), "total_s": time.perf_counter() - t0,
        "wide_greedy_gain": wide, "load_at_end": os.getloadavg()}, indent=1))
    print(write_table(table, runs, results / "rl.md", args, wide))
    plot(table, results / "rl.png", wide)


def strip(evaluation: dict) -> dict:
    return {k: v for k, v in evaluation.items() if k not in ("per_prompt", "greedy_answers")}


if __name__ == "__main__":
    main()
