"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", Section 4.1), with no value model.

For each prompt q the policy samples a group of G responses o_1..o_G; each gets a reward r_i (the world's checker,
the reward model, or both: rlhf.rewards), and its advantage is its reward measured against the group's (eq. 3 with
outcome supervision: every token of o_i gets the same advantage):

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)        (scale_rewards=False: r_i - mean, as Dr. GRPO, Liu et al. 2025)

A group whose rewards are all equal carries no signal: its advantages are 0 (never 0/0). The objective, maximised
over inner_iters passes on the same samples (rho = pi_theta / pi_old per token, the clip of PPO):

    J = agg_{i,t} [ min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps, 1 + eps) A_i) - beta KL_{i,t} ]

with the KL to the reference inside the loss, per token, by the k3 estimator (Schulman 2020):
KL_{i,t} = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1 >= 0, unbiased. The aggregation agg:

    "grpo"     (1/G) sum_i (1/|o_i|) sum_t      each response counts once, whatever its length (the paper)
    "dapo"     sum_{i,t} / sum_i |o_i|          each token counts once (DAPO, Yu et al. 2025)
    "dr_grpo"  sum_{i,t} / (N * max_new_tokens) a constant normaliser, no length bias (Dr. GRPO)

beta defaults to 0.04, DeepSeekMath's value. Later work (DAPO, Dr. GRPO) drops the KL term for long reasoning runs
from a strong model; here the policy is a small SFT model whose list answers come apart when it drifts, and the
term is what holds it near the SFT model.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt import engine, tasks
from minigpt.checkpoint import load_checkpoint, save_checkpoint
from minigpt.files import write_json
from minigpt.options import HelpFormatter, add_options, from_args, option
from minigpt.options import run as run_cli
from minigpt.runs import Interrupted, claim, stop_requests
from minigpt.train import TrainConfig, configure_optimizer
from rlhf.plots import plot_metrics
from rlhf.policy import (
    RLRun,
    StepLog,
    entropy_of,
    kl_penalty,
    loop_state,
    masked_mean,
    open_policy,
    reference_of,
    response_logits,
    response_logprobs,
    restore_loop_state,
    rl_peft_config,
    save_policy,
)

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


@dataclass
class GRPOConfig:
    steps: int = option(30, "GRPO steps (one group of samples per prompt, then inner_iters passes over them)")
    prompts_per_step: int = option(8, "prompts per step")
    group_size: int = option(8, "responses sampled per prompt (G)")
    inner_iters: int = option(2, "passes over each step's samples (DeepSeekMath's mu)")
    minibatch_size: int = option(32, "responses per optimisation step")
    max_new_tokens: int = option(24, "the longest response, in tokens")
    temperature: float = option(1.0, "sampling temperature; the log-probabilities use the same one")
    lr: float = option(2e-5, "learning rate")
    adam_eps: float = option(1e-5, "Adam's epsilon")
    beta: float = option(0.04, "weight of the per-token k3 KL to the reference in the loss (DeepSeekMath: 0.04)")
    cliprange: float = option(0.2, "ratio clip epsilon")
    scale_rewards: bool = option(True, "divide the group-centred rewards by the group's std (off: Dr. GRPO)")
    loss_type: str = option("grpo", "how token losses are averaged: grpo (per response, then over responses), "
                            "dapo (per token over the batch), dr_grpo (a constant normaliser)", choices=LOSS_TYPES)
    max_grad_norm: float = option(1.0, "gradient-norm clip")
    seed: int = option(0, "seed of the prompt order, the sampling and the minibatches")

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "group_size", "inner_iters", "minibatch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (an advantage is measured against the group), got "
                             f"{self.group_size}")
        if (self.prompts_per_step * self.group_size) % self.minibatch_size:
            raise ValueError(f"prompts_per_step * group_size ({self.prompts_per_step * self.group_size}) must be a "
                             f"multiple of minibatch_size ({self.minibatch_size})")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be > 0 (GRPO samples), got {self.temperature}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


# -- the math --------------------------------------------------------------------------------------------------


def group_advantages(rewards, group_size: int, scale: bool = True, eps: float = 1e-4):
    """(A (N,), all_equal (N // G,) bool) for rewards (N,) laid out group after group: r - group mean, divided by
    the group's (sample) std + eps when scale. A group of equal rewards carries no signal and gets A = 0 exactly
    (set, not computed: eight rewards of 0.7 in float32 have a mean 6e-8 off, which / (std + eps) would make
    6e-4; trl 1.16 gives that 6e-4); it is flagged, for the log."""
    r = rewards.view(-1, group_size)  # (groups, G)
    all_equal = (r.max(-1).values - r.min(-1).values) == 0
    centred = r - r.mean(-1, keepdim=True)
    if scale:
        centred = centred / (r.std(-1, keepdim=True) + eps)  # Bessel-corrected std, as DeepSeekMath's and trl's
    centred = centred.masked_fill(all_equal[:, None], 0.0)
    return centred.flatten(), all_equal


def aggregate(per_token, mask, loss_type: str, max_new_tokens: int):
    """The loss from per-token losses (B, R) under mask (B, R), by loss_type (see the module docstring)."""
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    return (per_token * mask).sum() / (mask.size(0) * max_new_tokens)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg: GRPOConfig):
    """(loss, stats): -[min(rho A, clip(rho) A) - beta KL_k3] per token, aggregated; logp etc. (B, R), A (B,)."""
    ratio = torch.exp(logp - old_logp)
    A = advantages[:, None]  # (B, 1): the same advantage for every token of a response
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange) * A)
    kl = kl_penalty(logp, ref_logp, "k3")  # (B, R), >= 0
    loss = aggregate(-(surrogate - cfg.beta * kl), mask, cfg.loss_type, cfg.max_new_tokens)
    clipped = (ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange) * A < ratio * A).float()
    return loss, {"clipfrac": masked_mean(clipped, mask), "kl": masked_mean(kl, mask)}


# -- the loop --------------------------------------------------------------------------------------------------


@dataclass
class Groups:
    """One step's samples: prompt_i's G responses are rows i*G .. i*G + G - 1."""

    gen: engine.Generation
    old_logp: torch.Tensor  # (N, R) under the policy that sampled
    ref_logp: torch.Tensor  # (N, R)
    rewards: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)
    all_equal: torch.Tensor  # (N // G,)
    texts: list


@torch.no_grad()
def sample_groups(policy, tokenizer, examples, reward_fn, cfg: GRPOConfig, reference=None, generator=None) -> Groups:
    """G responses to each example's prompt, their rewards and advantages, and the log-probabilities of the policy
    that sampled them and of the reference."""
    repeated = [ex for ex in examples for _ in range(cfg.group_size)]
    gen = engine.complete(policy, [tokenizer.encode(ex["prompt"]) for ex in repeated], cfg.max_new_tokens,
                          tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=cfg.temperature,
                          generator=generator)
    policy.eval()
    mask = gen.response_mask.float()
    P = gen.prompt_len
    old = response_logprobs(response_logits(policy, gen.tokens, gen.attention_mask, P), gen.tokens, P, cfg.temperature)
    with reference_of(policy, reference) as ref:
        ref_logp = response_logprobs(response_logits(ref, gen.tokens, gen.attention_mask, P), gen.tokens, P,
                                     cfg.temperature)
    rewards = reward_fn(gen, repeated).float()
    advantages, all_equal = group_advantages(rewards, cfg.group_size, cfg.scale_rewards)
    return Groups(gen, old * mask, ref_logp * mask, rewards, advantages, all_equal,
                  [tokenizer.decode(r) for r in gen.responses()])


def grpo_update(policy, optimizer, groups: Groups, cfg: GRPOConfig, reference=None, generator=None) -> dict:
    """inner_iters passes over shuffled minibatches of one step's samples."""
    gen = groups.gen
    N, P = gen.tokens.size(0), gen.prompt_len
    mask = gen.response_mask.float()
    params = [p for p in policy.parameters() if p.requires_grad]
    stats = {"loss": [], "clipfrac": [], "update_kl": [], "entropy": []}
    policy.train()
    for _ in range(cfg.inner_iters):
        order = torch.randperm(N, generator=generator)
        for start in range(0, N, cfg.minibatch_size):
            i = order[start : start + cfg.minibatch_size].to(gen.tokens.device)
            logits = response_logits(policy, gen.tokens[i], gen.attention_mask[i], P)  # (b, R, V)
            logp = response_logprobs(logits, gen.tokens[i], P, cfg.temperature)
            loss, s = grpo_loss(logp, groups.old_logp[i], groups.ref_logp[i], groups.advantages[i], mask[i], cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                s["entropy"] = entropy_of(logits, mask[i], cfg.temperature)
            stats["loss"].append(loss.item())
            stats["update_kl"].append(s["kl"].item())
            for k in ("clipfrac", "entropy"):
                stats[k].append(s[k].item())
    return {k: sum(v) / len(v) for k, v in stats.items()}


def train_grpo(policy, tokenizer, examples: list[dict], reward_fn, cfg: GRPOConfig, reference=None, out_dir=None,
               progress: bool = True, resume: dict | None = None) -> list[dict]:
    """cfg.steps GRPO steps on examples (dicts with a formatted "prompt", an "output" for the checker) drawn in
    shuffled batches; returns one metrics row per step (also in grpo_metrics.jsonl). reference None: the policy's
    adapters disabled; otherwise the frozen SFT model. With out_dir the loop's state is saved after every step
    (rl_state.pt; Ctrl-C stops after the step, saved); resume is such a state to continue from."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = next(policy.parameters()).device
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    optimizer = configure_optimizer(policy, TrainConfig(lr=cfg.lr, min_lr=0.0, weight_decay=0.0), device.type,
                                    eps=cfg.adam_eps)
    order, cursor = torch.randperm(len(examples), generator=generator).tolist(), 0
    parts = ({"policy": policy}, {"optimizer": optimizer}, {"generator": generator, "sample_gen": sample_gen})
    start = 0
    if resume is not None:
        extra = restore_loop_state(resume, *parts)
        start, order, cursor = resume["step"] + 1, extra["order"], extra["cursor"]
    log = StepLog(Path(out_dir) / "grpo_metrics.jsonl" if out_dir else None, cfg.steps, "grpo", progress,
                  resume["rows"] if resume else None)
    with stop_requests() as stop:
        for step in range(start, cfg.steps):
            if cursor + cfg.prompts_per_step > len(order):
                order, cursor = torch.randperm(len(examples), generator=generator).tolist(), 0
            batch = [examples[j] for j in order[cursor : cursor + cfg.prompts_per_step]]
            cursor += cfg.prompts_per_step
            groups = sample_groups(policy, tokenizer, batch, reward_fn, cfg, reference, sample_gen)
            stats = grpo_update(policy, optimizer, groups, cfg, reference, generator)
            gen = groups.gen
            mask = gen.response_mask.float()
            row = {"step": step, "reward": groups.rewards.mean().item(),
                   "kl": masked_mean(kl_penalty(groups.old_logp, groups.ref_logp, "k3"), mask).item(),
                   "reward_std_in_group": groups.rewards.view(-1, cfg.group_size).std(-1).mean().item(),
                   "all_equal_groups": groups.all_equal.float().mean().item(),
                   "response_len": mask.sum(-1).mean().item(), "truncated": (~gen.has_eos).float().mean().item(),
                   **stats}
            repeated = [ex for ex in batch for _ in range(cfg.group_size)]
            if all("output" in ex for ex in batch):
                row["true_score"] = sum(map(tasks.ground_truth_score, repeated, groups.texts)) / len(repeated)
            log.write(row, reward=row["reward"], kl=row["kl"], equal=row["all_equal_groups"])
            if out_dir:
                save_checkpoint(Path(out_dir) / "rl_state.pt", loop_state(step, *parts, log.rows, order=order,
                                                                          cursor=cursor))
            if stop and step < cfg.steps - 1:
                log.close()
                raise Interrupted(out_dir, step)
    log.close()
    return log.rows


GRPO_PANELS = [
    ("reward", [("reward", "mean reward"), ("true_score", "ground-truth score")], "mean over the samples"),
    ("signal", [("all_equal_groups", "groups with all-equal rewards"),
                ("reward_std_in_group", "reward std in a group")],
     "share / std"),
    ("KL to the reference", [("kl", "k3 KL per token, as sampled"), ("update_kl", "during the update")],
     "nats per token"),
    ("clip fraction", [("clipfrac", "ratio clipped")], "share of tokens"),
    ("entropy", [("entropy", "policy entropy")], "nats per token"),
    ("response length", [("response_len", "tokens"), ("truncated", "share cut off (x 10)")], "tokens"),
]


# -- the stage and its command line ---------------------------------------------------------------------------


def run_grpo(run: RLRun, cfg: GRPOConfig, peft_config=None, reward: str = "checker") -> dict:
    """GRPO from run.sft on run.prompts with the reward of kind `reward`; the policy, grpo_metrics.jsonl, grpo.png and
    results.json go to run.out_dir, with the evaluation before and after when run.eval_prompts > 0. run.resume
    continues an interrupted run."""
    with claim(run.out_dir, run.resume, run.overwrite):
        return _run_grpo(run, cfg, peft_config, reward)


def _run_grpo(run: RLRun, cfg: GRPOConfig, peft_config, reward: str) -> dict:
    from rlhf.evaluate import held_out
    from rlhf.prompts import load_prompts
    from rlhf.rewards import make_reward, open_reward_model

    pol = open_policy(run.sft, peft_config)
    tokenizer = pol.tokenizer
    rm = open_reward_model(run.reward, reward, tokenizer, next(pol.model.parameters()).device)
    examples, source = load_prompts(run.prompts, pol.info.get("template"))
    results = {"reward": reward}
    evaluate = held_out(run, pol, rm, cfg.max_new_tokens)
    if evaluate:
        results["before"] = evaluate()
    out_dir = Path(run.out_dir)
    state = load_checkpoint(out_dir / "rl_state.pt") if run.resume else None
    rows = train_grpo(pol.model, tokenizer, examples, make_reward(reward, tokenizer, rm), cfg, pol.reference,
                      out_dir, run.progress, resume=state)
    if evaluate:
        results["after"] = evaluate()
    plot_metrics(rows, out_dir / "grpo.png", GRPO_PANELS, f"GRPO ({reward}, {cfg.loss_type}, beta = {cfg.beta:g})",
                 "GRPO step")
    made_from = {"sft": run.sft, "reward": run.reward if rm is not None else None, "prompts": source}
    save_policy(out_dir, pol, "grpo", made_from, {"grpo": dataclasses.asdict(cfg), "run": dataclasses.asdict(run),
                                                  "reward": reward})
    results.update(first_row=rows[0], last_row=rows[-1])
    write_json(out_dir / "results.json", results)
    results["rows"] = rows
    return results


def build_parser() -> argparse.ArgumentParser:
    from peft.train import add_method_options
    from rlhf.rewards import KINDS

    p = argparse.ArgumentParser(prog="python -m rlhf.grpo", description="GRPO on a policy (the SFT model) with the "
                                "world's checker as the reward (or the reward model, or both): python -m rlhf.grpo "
                                "--sft out/sft/full --out-dir out/grpo", formatter_class=HelpFormatter)
    g = p.add_argument_group("what GRPO starts from and learns from")
    add_options(g, RLRun, defaults={"out_dir": "out/grpo"})
    g.add_argument("--reward-fn", default="checker", choices=KINDS, help="what is maximised: the world's checker "
                   "(the prompts need reference answers), the reward model, or their sum")
    add_method_options(p.add_argument_group("PEFT method options (with --peft)"))
    add_options(p.add_argument_group("GRPO"), GRPOConfig)
    return p


def main(argv=None) -> dict:
    from peft.train import given_method_options

    parser = build_parser()
    args = parser.parse_args(argv)
    run = from_args(RLRun, args)
    try:
        peft_config = rl_peft_config(run.peft, given_method_options(args))
        cfg = from_args(GRPOConfig, args)
    except ValueError as e:
        parser.error(str(e))
    results = run_grpo(run, cfg, peft_config, args.reward_fn)
    first, last = results["first_row"], results["last_row"]
    print(f"GRPO ({args.reward_fn}): reward {first['reward']:.3f} -> {last['reward']:.3f}, all-equal groups "
          f"{first['all_equal_groups']:.0%} -> {last['all_equal_groups']:.0%} over {cfg.steps} steps; policy saved "
          f"in {run.out_dir}, plot {run.out_dir}/grpo.png")
    return results


if __name__ == "__main__":
    run_cli(main)
