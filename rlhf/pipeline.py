"""The four stages end to end on the built-in data: pretraining -> SFT -> reward model -> PPO.

    python -m rlhf.pipeline                 # out/pipeline/{pretrain,sft,reward,ppo}, then report.md
    python -m rlhf.pipeline --fast          # a smoke run in about a minute
    python -m rlhf.pipeline --reward-hacking   # also PPO with beta = 0, a lesson in reward hacking

What each stage is for, on the built-in world (minigpt.corpus, minigpt.tasks): pretraining learns the world's text;
SFT imitates demonstrations, half of which follow the answer with a remark ("12. I think that is right, but I am not
sure."), as demonstrations written by people often do; the reward model learns from preference pairs that users
prefer the bare answer of the asked form; PPO, with the reward model as its only signal, teaches the policy to stop
after the answer. The ground-truth rubric (tasks.ground_truth_score), which no stage sees, measures the gain.

Each stage saves its model and a stage.json; a second run skips the stages already done (--force redoes them), so an
interrupted pipeline resumes at the stage it was in. The report has the four-stage table (data, algorithm, model,
parameters, wall time), the SFT-vs-RL comparison on held-out prompts (ground-truth score, reward-model score, KL to
the SFT model) with sample responses side by side, and ppo.png (score and KL over PPO steps).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt import tasks
from rlhf.ppo import PPOConfig, make_reference, plot_ppo, response_logprobs, reward_model_fn, save_policy, train_ppo


@dataclass
class Sizes:
    """How much work each stage does; FAST shrinks everything for a smoke run. The defaults fit the four stages in
    about 8.5 minutes on 2 uncontended CPU cores (measured: pretraining 188 s, SFT 121 s, reward model 121 s, PPO 73 s),
    so that `make demo`, venv included, stays under 10 minutes. Fewer SFT iterations cost accuracy fast: 700
    pretraining and 500 SFT iterations left the SFT model at 15% instead of 35%."""

    corpus_chars: int = 1_500_000
    pretrain_iters: int = 800
    n_layer: int = 4
    n_embd: int = 128
    sft_iters: int = 600
    remark_share: float = 0.5  # SFT demonstrations that add a remark after the answer (tasks.sft_examples)
    reward_pairs: int = 20_000
    reward_iters: int = 300
    ppo_steps: int = 30
    ppo_batch: int = 64
    eval_prompts: int = 200
    ppo_vf_lr: float = 1e-3  # the fresh value head learns at its own, higher rate
    ppo_lr: float = 2e-5  # 5e-5 and above made the KL run away (to ~9 nats) with the 4-layer model


FAST = Sizes(corpus_chars=200_000, pretrain_iters=60, n_layer=2, n_embd=64, sft_iters=30, reward_pairs=2000,
             reward_iters=20, ppo_steps=3, ppo_batch=16, eval_prompts=24)


def run_stage(out_dir: Path, name: str, fn, force: bool = False) -> dict:
    """Run fn unless out_dir/name/stage.json says it is done; record its results and wall time there."""
    marker = out_dir / name / "stage.json"
    if marker.is_file() and not force:
        print(f"== {name}: done earlier, skipping (stage.json found; --force to redo)")
        return json.loads(marker.read_text())
    print(f"== {name}")
    t0 = time.perf_counter()
    results = fn()
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, marker)
    return results


# -- the stages -----------------------------------------------------------------------------------------------


def stage_pretrain(out: Path, s: Sizes, progress: bool) -> dict:
    from minigpt.train import main as pretrain

    args = ["--out-dir", str(out / "pretrain"), "--preset", "baby", "--n-layer", str(s.n_layer), "--n-head", "4",
            "--n-embd", str(s.n_embd), "--block-size", "128", "--batch-size", "32", "--max-iters",
            str(s.pretrain_iters), "--lr", "2e-3", "--min-lr", "2e-4", "--warmup-iters", "50", "--eval-interval",
            str(max(s.pretrain_iters // 4, 1)), "--eval-iters", "10", "--corpus-chars", str(s.corpus_chars)]
    rows = pretrain(args + ([] if progress else ["--no-progress"]))
    from minigpt import GPT, GPTConfig
    from minigpt.train import load_checkpoint

    config = GPTConfig.from_dict(load_checkpoint(out / "pretrain" / "best.pt")["model_config"])
    n_params = GPT(config).num_parameters()  # the tied head counted once
    val = [r for r in rows if r.get("val_loss") is not None]
    return {"data": f"built-in corpus, {s.corpus_chars:,} characters", "algorithm": "next-token prediction",
            "model": f"GPT {s.n_layer} layers x {s.n_embd} dims", "params": n_params,
            "val_loss": val[-1]["val_loss"], "iters": s.pretrain_iters}


def stage_sft(out: Path, s: Sizes, progress: bool, method: str) -> dict:
    from peft.train import main as finetune

    train, test = tasks.sft_examples(remark_share=s.remark_share)
    tasks.write_jsonl(out / "data" / "sft_train.jsonl", train)
    tasks.write_jsonl(out / "data" / "sft_test.jsonl", test)
    args = ["--method", method, "--base", str(out / "pretrain" / "best.pt"), "--out-dir", str(out / "sft"),
            "--train-file", str(out / "data" / "sft_train.jsonl"), "--test-file", str(out / "data" / "sft_test.jsonl"),
            "--max-iters", str(s.sft_iters), "--eval-interval", str(s.sft_iters),
            "--eval-examples", str(min(200, s.eval_prompts))]
    r = finetune(args + ([] if progress else ["--no-progress"]))
    remarks = sum(ex.get("remark", False) for ex in train)
    return {"data": f"{len(train):,} instructions with answers ({remarks:,} with a remark after the answer)",
            "algorithm": f"language modelling on answer tokens ({method})", "model": "SFT model",
            "params": r["total_params"], "trainable": r["trainable_params"], "accuracy": r["accuracy"],
            "accuracy_before": r["before"]["accuracy"], "answer_loss": r["answer_loss"]}


def stage_reward(out: Path, s: Sizes, progress: bool) -> dict:
    from rlhf.reward_model import main as train_rm

    args = ["--sft", str(out / "sft"), "--out-dir", str(out / "reward"), "--n-pairs", str(s.reward_pairs),
            "--max-iters", str(s.reward_iters), "--eval-interval", str(max(s.reward_iters // 3, 1)),
            "--n-normalize", str(min(100, s.eval_prompts))]
    r = train_rm(args + ([] if progress else ["--no-progress"]))
    return {"data": f"{s.reward_pairs:,} preference pairs", "algorithm": "Bradley-Terry loss",
            "model": "reward model (SFT backbone + scalar head)", "params": r["total_params"],
            "accuracy": r["accuracy"], "accuracy_by_kind": r["accuracy_by_kind"],
            "probe_accuracy": r.get("probe_accuracy", {})}


def load_models(out: Path):
    from peft.train import load_finetuned
    from rlhf.reward_model import load_reward_model

    policy, tokenizer = load_finetuned(out / "sft")
    rm, _ = load_reward_model(out / "reward" / "reward.pt")
    rm.eval()
    for p in rm.parameters():
        p.requires_grad_(False)
    return policy, rm, tokenizer


def true_score_metric(examples_by_prompt: dict, tokenizer):
    """extra_metrics for train_ppo: the ground-truth score of the sampled responses (never seen by PPO)."""

    def metric(ro):
        scores = []
        for row, m in zip(ro.tokens.tolist(), ro.response_mask.tolist()):
            prompt = tokenizer.decode([t for t in row[: ro.prompt_len] if t != tokenizer.pad_token_id])
            response = [t for t, keep in zip(row[ro.prompt_len :], m) if keep and t != tokenizer.eos_token_id]
            scores.append(tasks.ground_truth_score(examples_by_prompt[prompt], tokenizer.decode(response)))
        return {"true_score": sum(scores) / len(scores)}

    return metric


@torch.no_grad()
def evaluate_policy(policy, ref, rm, tokenizer, examples, max_new_tokens: int = 24, seed: int = 0) -> dict:
    """On held-out prompts: greedy accuracy; for sampled responses (temperature 1, as PPO samples) the ground-truth
    score, the reward-model score and KL(policy || reference) summed over the response. The scores and the KL are
    computed on the token ids the policy sampled, not on their text encoded again (which need not give them back)."""
    from rlhf.reward_model import sft_responses

    policy.eval()
    prompts = [ex["prompt"] for ex in examples]
    greedy = [tokenizer.decode(r) for r in sft_responses(policy, tokenizer, prompts, max_new_tokens)]
    sampled = sft_responses(policy, tokenizer, prompts, max_new_tokens, temperature=1.0, seed=seed)
    rm_scores, kls = [], []
    for prompt, response in zip(prompts, sampled):
        prompt_ids = tokenizer.encode(prompt)
        ids = torch.tensor([prompt_ids + response + [tokenizer.eos_token_id]])  # (1, P + R + 1)
        rm_scores.append(rm(ids).item())
        logp = response_logprobs(policy(ids)[0], ids, len(prompt_ids))
        ref_logp = response_logprobs(ref(ids)[0], ids, len(prompt_ids))
        kls.append((logp - ref_logp).sum().item())
    n = len(examples)
    return {"greedy_accuracy": sum(tasks.check_answer(ex, a) for ex, a in zip(examples, greedy)) / n,
            "true_score": sum(tasks.ground_truth_score(ex, tokenizer.decode(r))
                              for ex, r in zip(examples, sampled)) / n,
            "rm_score": sum(rm_scores) / n, "kl": sum(kls) / n, "greedy_answers": greedy}


def stage_ppo(out: Path, s: Sizes, progress: bool, beta: float, name: str) -> dict:
    policy, rm, tokenizer = load_models(out)
    ref = make_reference(policy)
    train_examples, test_examples = tasks.ppo_prompts(n_test=s.eval_prompts)
    by_prompt = {ex["prompt"]: ex for ex in train_examples}
    prompts = [tokenizer.encode(ex["prompt"]) for ex in train_examples]
    cfg = PPOConfig(steps=s.ppo_steps, batch_size=s.ppo_batch, minibatch_size=min(16, s.ppo_batch), beta=beta,
                    lr=s.ppo_lr, vf_lr=s.ppo_vf_lr)
    before = evaluate_policy(policy, ref, rm, tokenizer, test_examples)
    actor, rows = train_ppo(policy, tokenizer, prompts, reward_model_fn(rm, tokenizer.eos_token_id), cfg,
                            ref_model=ref, out_dir=out / name, extra_metrics=true_score_metric(by_prompt, tokenizer),
                            progress=progress)
    after = evaluate_policy(policy, ref, rm, tokenizer, test_examples)
    plot_ppo(rows, out / name / "ppo.png", title=f"PPO (beta = {beta:g})")
    save_policy(out / name / "policy.pt", policy, tokenizer, cfg)
    samples = [{"prompt": ex["prompt"], "reference": ex["output"], "sft": b, "rl": a}
               for ex, b, a in list(zip(test_examples, before.pop("greedy_answers"), after.pop("greedy_answers")))[:6]]
    return {"data": f"{len(prompts):,} prompts, {s.ppo_steps * s.ppo_batch:,} sampled responses",
            "algorithm": f"PPO, KL penalty beta = {beta:g}", "model": "RL model (policy + value head)",
            "params": sum(p.numel() for p in actor.parameters()), "before": before, "after": after,
            "samples": samples, "first_row": rows[0], "last_row": rows[-1]}


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
              "## SFT model vs RL model on held-out prompts", "",
              "| model | ground-truth score (sampled) | greedy accuracy | reward-model score | KL to SFT (nats) |",
              "|---|---:|---:|---:|---:|"]
    runs = [("ppo", "RL (PPO)")] + ([("ppo_beta0", "RL, beta = 0")] if "ppo_beta0" in results else [])
    b = results["ppo"]["before"]
    lines.append(f"| SFT | {b['true_score']:.3f} | {b['greedy_accuracy']:.1%} | {b['rm_score']:.3f} | {b['kl']:.2f} |")
    for key, label in runs:
        a = results[key]["after"]
        lines.append(f"| {label} | {a['true_score']:.3f} | {a['greedy_accuracy']:.1%} | {a['rm_score']:.3f} | "
                     f"{a['kl']:.2f} |")
    lines += ["", "Sample responses (greedy):", "", "| prompt | reference | SFT | RL |", "|---|---|---|---|"]
    for smp in results["ppo"]["samples"]:
        prompt = smp["prompt"].replace("\n", " ").replace("### ", "").replace("|", "/")
        cells = [prompt] + [smp[k].replace("\n", " ").replace("|", "/") for k in ("reference", "sft", "rl")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![score and KL over PPO steps](ppo/ppo.png)"]
    if "ppo_beta0" in results:
        lines += ["", "![PPO with beta = 0](ppo_beta0/ppo.png)"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def build_parser():
    p = argparse.ArgumentParser(prog="python -m rlhf.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="out/pipeline")
    p.add_argument("--fast", action="store_true", help="tiny sizes: a smoke run in about a minute")
    p.add_argument("--force", action="store_true", help="redo stages that are already done")
    p.add_argument("--sft-method", default="full", help="full or a PEFT method (see python -m peft.train --help)")
    # a small beta lets the policy drift on the list tasks, whose one-word errors the reward model cannot see (beta
    # 0.05, with an SFT model trained on 30% remarks: KL 2.6 nats, greedy accuracy 41% -> 29.5%); 0.5 holds the KL
    # under 1 nat
    p.add_argument("--beta", type=float, default=0.5, help="KL coefficient of the PPO stage (default 0.5)")
    p.add_argument("--reward-hacking", action="store_true", help="also run PPO with beta = 0")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None, sizes: Sizes | None = None) -> dict:
    args = build_parser().parse_args(argv)
    out = Path(args.out_dir)
    s = sizes or (FAST if args.fast else Sizes())
    progress = not args.no_progress
    t0 = time.perf_counter()
    results = {
        "pretrain": run_stage(out, "pretrain", lambda: stage_pretrain(out, s, progress), args.force),
        "sft": run_stage(out, "sft", lambda: stage_sft(out, s, progress, args.sft_method), args.force),
        "reward": run_stage(out, "reward", lambda: stage_reward(out, s, progress), args.force),
        "ppo": run_stage(out, "ppo", lambda: stage_ppo(out, s, progress, args.beta, "ppo"), args.force),
    }
    if args.reward_hacking:
        results["ppo_beta0"] = run_stage(out, "ppo_beta0", lambda: stage_ppo(out, s, progress, 0.0, "ppo_beta0"),
                                         args.force)
    print(report(out, results))
    print(f"pipeline finished in {time.perf_counter() - t0:.0f} s; report in {out / 'report.md'}")
    return results


if __name__ == "__main__":
    main()
