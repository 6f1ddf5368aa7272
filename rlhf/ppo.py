"""PPO for RLHF, written out with no RL library (Schulman et al. 2017; Ziegler et al. 2019; Stiennon et al. 2020;
Ouyang et al. 2022), with the details that published reproductions found to matter (Huang et al. 2024, "The N+
Implementation Details of RLHF with PPO"; OpenAI's lm-human-preferences).

The actors:
- the policy pi_theta: the SFT model (all weights trained, or through a PEFT method);
- a value head V: a Linear C -> 1 on the policy's own final hidden states, read through a stop-gradient. One forward
  pass gives logits and values, at half the compute of a separate critic; the stop-gradient keeps the early, large and
  noisy value loss from reshaping the policy's features. The head has its own Adam optimizer, learning rate (vf_lr)
  and gradient clipping. (A loss weight vf_coef would do nothing here: under the stop-gradient it only rescales the
  head's gradient, which Adam undoes, so there is none.)
- the reference pi_ref: the SFT model as RL began (rlhf.policy: a frozen copy, or the policy with its adapters off);
- the reward: the reward model's score, the world's checker, or both (rlhf.rewards), of the response as sampled.

Before the first step the reward model is normalised on responses the initial policy samples exactly as PPO will
(same prompts, temperature and length), to mean 0 and std 1 (lm-human-preferences), so that beta is in units of the
reward's spread.

One PPO step:
1. rollout: a response to each of batch_size prompts, sampled by the generation engine at the temperature, stopping
   at the first eos (minigpt.engine; the response mask covers the tokens up to and including it);
2. log-probabilities of the sampled tokens under pi_theta and pi_ref, from the logits at the previous position divided
   by the temperature; values V(s_t) read at the same positions (the state before each response token);
3. per-token rewards r_t = -beta * KL_t, plus the score at the last response token (the eos, when sampled), where
   KL_t = log pi(a_t) - log pi_ref(a_t) (k1) or (rho - 1) - log rho with rho = pi_ref / pi (k3); a response that never
   emits eos can have missing_eos_penalty taken off its score; whiten_rewards scales the rewards to unit variance;
4. GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1};
   returns R_t = A_t + V_t; advantages whitened over the batch;
5. ppo_epochs passes over shuffled minibatches of the clipped losses, each a mean over the minibatch's tokens:
   L_pi = E[max(-A rho_t, -A clip(rho_t, 1 - eps, 1 + eps))],  rho_t = pi_theta(a_t) / pi_old(a_t)
   L_V  = 1/2 E[max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)]
6. the adaptive KL controller (Ziegler et al. 2019, sec. 2.2): beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2)
   * n / horizon), with n the number of episodes in the step; anneal_lr decays both learning rates linearly to 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from minigpt import engine, tasks
from minigpt.checkpoint import load_checkpoint, save_checkpoint
from minigpt.files import write_json
from minigpt.model import disable_dropout
from minigpt.options import HelpFormatter, add_options, from_args, option
from minigpt.options import run as run_cli
from minigpt.runs import Interrupted, claim, stop_requests
from minigpt.train import configure_optimizer
from rlhf.plots import plot_ppo
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


@dataclass
class PPOConfig:
    steps: int = option(60, "PPO steps (one rollout and its optimisation each)")
    batch_size: int = option(64, "prompts per rollout")
    minibatch_size: int = option(16, "responses per optimisation step")
    ppo_epochs: int = option(4, "passes over each rollout")
    max_new_tokens: int = option(24, "the longest response, in tokens")
    temperature: float = option(1.0, "sampling temperature; the log-probabilities use the same one")
    lr: float = option(1e-4, "the policy's learning rate")
    vf_lr: float | None = option(None, "the value head's learning rate (none: lr); a fresh head may move faster")
    adam_eps: float = option(1e-5, "Adam's epsilon (lm-human-preferences: 1e-5)")
    anneal_lr: bool = option(False, "decay both learning rates linearly to 0 over the steps")
    beta: float = option(0.05, "initial KL coefficient")
    adaptive_kl: bool = option(False, "move beta toward target_kl (Ziegler et al. 2019)")
    target_kl: float = option(1.0, "the adaptive controller's target for the per-sequence KL (nats)")
    horizon: int = option(256, "the adaptive controller's horizon in episodes: beta moves by up to "
                          "0.2 * batch_size / horizon a step (Ziegler et al.'s 10,000 suits a million episodes)")
    kl_estimator: str = option("k1", "per-token KL estimate in the reward: k1 or k3", choices=["k1", "k3"])
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda")
    cliprange: float = option(0.2, "policy ratio clip epsilon")
    cliprange_value: float = option(0.2, "value clip epsilon")
    max_grad_norm: float = option(1.0, "gradient-norm clip, for the policy and the value head each")
    missing_eos_penalty: float | None = option(None, "subtracted from the score of a response that never emits eos")
    whiten_rewards: bool = option(False, "scale the per-token rewards to unit variance over the batch (trl)")
    normalize_reward: bool = option(True, "normalise the reward model on samples of the initial policy first")
    normalize_samples: int = option(256, "responses sampled for that normalisation")
    seed: int = option(0, "seed of the prompt order, the sampling and the minibatches")

    def __post_init__(self):
        for name in ("steps", "batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens", "horizon",
                     "normalize_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of minibatch_size "
                             f"({self.minibatch_size})")
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be > 0 for PPO (it samples), got {self.temperature}")
        for name in ("beta", "target_kl", "lr", "cliprange", "cliprange_value", "max_grad_norm"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")


# -- the pieces of the math, each checked against a hand computation in tests/test_ppo.py --------------------


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over response tokens, right to left. rewards, values, mask: (B, R); positions
    where mask is 0 (after the response ended) count as terminal: no reward, no value. Returns (advantages, returns)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):  # a loop over response positions: each depends on the next
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_adv
    return advantages, advantages + values


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / std over the masked entries of the whole batch (the mean added back when not shift_mean);
    masked-out entries become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def policy_loss(logp, old_logp, advantages, mask, cliprange: float):
    """Clipped surrogate: mean over tokens of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)). Returns the loss, the
    fraction of tokens where the clipped term was the larger one, and the ratios."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac, ratio


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """1/2 mean of max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2), and the fraction of tokens where
    the clipped term was the larger one."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_sq, clipped_sq = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_sq, clipped_sq), mask)
    return loss, masked_mean((clipped_sq > unclipped_sq).float(), mask)


class AdaptiveKLController:
    """Ziegler et al. 2019: move beta so the observed KL approaches target, by at most 20% of n / horizon per step."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_episodes: int) -> float:
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.beta *= 1.0 + error * n_episodes / self.horizon
        return self.beta


# -- the actors ------------------------------------------------------------------------------------------------


class PolicyWithValue(nn.Module):
    """The policy GPT and a value head reading its final hidden states: one pass gives logits and values."""

    def __init__(self, policy):
        super().__init__()
        disable_dropout(policy)
        self.policy = policy
        self.value_head = nn.Linear(policy.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the rewards
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(policy.parameters()).device)

    def forward(self, idx, attention_mask, prompt_len: int | None = None):
        """Logits (B, T, V) and values (B, T) at every position; with prompt_len P, only at the positions P - 1 ...
        T - 2 that choose the response's tokens, (B, R, V) and (B, R) (the prompt's others are never read)."""
        h = self.policy.hidden_states(idx, attention_mask=attention_mask)  # (B, T, C)
        if prompt_len is not None:
            h = h[:, prompt_len - 1 : -1]  # (B, R, C)
        logits = self.policy.output_layer(h)  # (B, T or R, V)
        # the value head reads the policy's features but sends no gradient into them (see the module docstring)
        values = self.value_head(self.policy.output_layer.ln_f(h).detach()).squeeze(-1)  # (B, T or R)
        return logits, values


# -- rollouts -------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    tokens: torch.Tensor  # (B, P + R) prompt (left-padded) and response
    attention_mask: torch.Tensor  # (B, P + R)
    prompt_len: int  # P
    response_mask: torch.Tensor  # (B, R) float: 1 up to and including the first eos
    logprobs: torch.Tensor  # (B, R) under the policy that sampled, at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R) V(s_t)
    scores: torch.Tensor  # (B,) the reward of each response (after the missing-eos penalty)
    rewards: torch.Tensor  # (B, R) -beta * KL_t, plus the score at the last response token
    kl: torch.Tensor  # (B, R) per-token KL estimate
    has_eos: torch.Tensor  # (B,) bool
    texts: list  # the decoded responses


@torch.no_grad()
def rollout(actor: PolicyWithValue, examples: list[dict], tokenizer, reward_fn, cfg: PPOConfig, beta: float,
            ref_model=None, generator=None) -> Rollout:
    prompts = [tokenizer.encode(ex["prompt"]) for ex in examples]
    gen = engine.complete(actor.policy, prompts, cfg.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                          temperature=cfg.temperature, generator=generator)
    actor.eval()
    P, mask = gen.prompt_len, gen.response_mask.float()
    logits, values = actor(gen.tokens, gen.attention_mask, P)  # V(s_t): read where the logits that chose token t are
    logprobs = response_logprobs(logits, gen.tokens, P, cfg.temperature)
    with reference_of(actor.policy, ref_model) as ref:
        ref_logits = response_logits(ref, gen.tokens, gen.attention_mask, P)
    ref_logprobs = response_logprobs(ref_logits, gen.tokens, P, cfg.temperature)
    scores = reward_fn(gen, examples).float()  # (B,)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~gen.has_eos).float()
    kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * mask
    rewards = -beta * kl
    last = gen.response_mask.sum(-1) - 1  # index of the last response token (the eos, when sampled)
    rewards[torch.arange(len(last)), last] += scores
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    texts = [tokenizer.decode(r) for r in gen.responses()]
    return Rollout(gen.tokens, gen.attention_mask, P, mask, logprobs * mask, ref_logprobs * mask, values * mask,
                   scores, rewards, kl, gen.has_eos, texts)


# -- the update -----------------------------------------------------------------------------------------------


def ppo_update(actor: PolicyWithValue, optimizer, vf_optimizer, ro: Rollout, cfg: PPOConfig, generator=None) -> dict:
    """ppo_epochs passes of the clipped policy and value losses over shuffled minibatches of one rollout. Under the
    stop-gradient each loss reaches only its own parameters, and each set is clipped on its own."""
    advantages, returns = gae(ro.rewards, ro.values, ro.response_mask, cfg.gamma, cfg.lam)
    advantages = whiten(advantages, ro.response_mask)
    B = ro.tokens.size(0)
    policy_params = [p for p in actor.policy.parameters() if p.requires_grad]
    head_params = list(actor.value_head.parameters())
    stats = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "vf_clipfrac", "approx_kl", "ratio", "entropy")}
    actor.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, cfg.minibatch_size):
            i = order[start : start + cfg.minibatch_size].to(ro.tokens.device)
            m = ro.response_mask[i]
            logits, values = actor(ro.tokens[i], ro.attention_mask[i], ro.prompt_len)  # (b, R, V), (b, R)
            logp = response_logprobs(logits, ro.tokens[i], ro.prompt_len, cfg.temperature)
            pg, clipfrac, ratio = policy_loss(logp, ro.logprobs[i], advantages[i], m, cfg.cliprange)
            vf, vf_clipfrac = value_loss(values, ro.values[i], returns[i], m, cfg.cliprange_value)
            optimizer.zero_grad(set_to_none=True)
            vf_optimizer.zero_grad(set_to_none=True)
            (pg + vf).backward()
            torch.nn.utils.clip_grad_norm_(policy_params, cfg.max_grad_norm)
            torch.nn.utils.clip_grad_norm_(head_params, cfg.max_grad_norm)
            optimizer.step()
            vf_optimizer.step()
            with torch.no_grad():
                entropy = entropy_of(logits, m, cfg.temperature)
                for key, value in (("policy_loss", pg), ("value_loss", vf), ("clipfrac", clipfrac),
                                   ("vf_clipfrac", vf_clipfrac), ("approx_kl", 0.5 * (logp - ro.logprobs[i]) ** 2),
                                   ("ratio", ratio), ("entropy", entropy)):
                    stats[key].append((value if value.dim() == 0 else masked_mean(value, m)).item())
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["first_ratio"] = stats["ratio"][0]
    mask = ro.response_mask
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - ro.values
    var_resid = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    out["explained_variance"] = (1.0 - var_resid / var_returns.clamp(min=1e-8)).item()
    return out


# -- the loop -------------------------------------------------------------------------------------------------


def make_optimizers(actor: PolicyWithValue, cfg: PPOConfig, device_type: str):
    """AdamW (no weight decay) for the policy's trainable tensors, and one for the value head at its own rate."""
    from minigpt.train import TrainConfig

    optimizer = configure_optimizer(actor.policy, TrainConfig(lr=cfg.lr, min_lr=0.0, weight_decay=0.0), device_type,
                                    eps=cfg.adam_eps)
    vf_lr = cfg.lr if cfg.vf_lr is None else cfg.vf_lr
    vf_optimizer = torch.optim.AdamW(actor.value_head.parameters(), lr=vf_lr, betas=(0.9, 0.99), eps=cfg.adam_eps,
                                     weight_decay=0.0)
    return optimizer, vf_optimizer


def train_ppo(policy, tokenizer, examples: list[dict], reward_fn, cfg: PPOConfig, ref_model=None, out_dir=None,
              progress: bool = True, resume: dict | None = None) -> tuple[PolicyWithValue, list[dict]]:
    """Run cfg.steps PPO steps on examples (dicts with a formatted "prompt", and an "output" for the ground-truth
    score), drawn in shuffled batches; return the actor and one metrics row per step (also in ppo_metrics.jsonl).
    ref_model None: the policy carries a PEFT method whose disabled adapters are the reference; otherwise the frozen
    SFT model. reward_fn(generation, examples) -> (B,) scores (rlhf.rewards). With out_dir, the loop's state is saved
    after every step (rl_state.pt; Ctrl-C stops after the step, saved); resume is such a state to continue from."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)  # the prompt order and the minibatches
    device = next(policy.parameters()).device
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the sampling
    actor = PolicyWithValue(policy)
    optimizer, vf_optimizer = make_optimizers(actor, cfg, device.type)
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in (optimizer, vf_optimizer)]
    controller = AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.horizon)
    order, cursor = torch.randperm(len(examples), generator=generator).tolist(), 0
    parts = ({"policy": policy, "value_head": actor.value_head}, {"optimizer": optimizer, "vf_optimizer": vf_optimizer},
             {"generator": generator, "sample_gen": sample_gen})
    start = 0
    if resume is not None:
        extra = restore_loop_state(resume, *parts)
        start, controller.beta, order, cursor = resume["step"] + 1, extra["beta"], extra["order"], extra["cursor"]
    log = StepLog(Path(out_dir) / "ppo_metrics.jsonl" if out_dir else None, cfg.steps, "ppo", progress,
                  resume["rows"] if resume else None)
    with stop_requests() as stop:
        for step in range(start, cfg.steps):
            if cursor + cfg.batch_size > len(order):
                order, cursor = torch.randperm(len(examples), generator=generator).tolist(), 0
            batch = [examples[j] for j in order[cursor : cursor + cfg.batch_size]]
            cursor += cfg.batch_size
            if cfg.anneal_lr:
                for opt, lrs in zip((optimizer, vf_optimizer), base_lrs):
                    for group, lr in zip(opt.param_groups, lrs):
                        group["lr"] = lr * (1.0 - step / cfg.steps)
            beta = controller.beta
            ro = rollout(actor, batch, tokenizer, reward_fn, cfg, beta, ref_model, sample_gen)
            stats = ppo_update(actor, optimizer, vf_optimizer, ro, cfg, generator)
            seq_kl = ro.kl.sum(-1).mean().item()
            if cfg.adaptive_kl:
                controller.update(seq_kl, cfg.batch_size)
            row = {"step": step, "score": ro.scores.mean().item(), "kl": seq_kl,
                   "total_reward": ro.rewards.sum(-1).mean().item(), "beta": beta,
                   "lr": optimizer.param_groups[0]["lr"], "response_len": ro.response_mask.sum(-1).mean().item(),
                   "truncated": (~ro.has_eos).float().mean().item(), **stats}
            if all("output" in ex for ex in batch):  # the world's rubric, whatever the reward was
                row["true_score"] = sum(map(tasks.ground_truth_score, batch, ro.texts)) / len(batch)
            log.write(row, score=row["score"], kl=seq_kl, beta=beta)
            if out_dir:
                save_checkpoint(Path(out_dir) / "rl_state.pt", loop_state(step, *parts, log.rows, beta=controller.beta,
                                                                          order=order, cursor=cursor))
            if stop and step < cfg.steps - 1:
                log.close()
                raise Interrupted(out_dir, step)
    log.close()
    return actor, log.rows


# -- the stage and its command line ---------------------------------------------------------------------------


def run_ppo(run: RLRun, cfg: PPOConfig, peft_config=None, reward: str = "reward_model") -> dict:
    """PPO from run.sft on run.prompts with the reward of kind `reward` (rlhf.rewards); the policy, ppo_metrics.jsonl,
    ppo.png and results.json go to run.out_dir, with the evaluation before and after on the held-out prompts when
    run.eval_prompts > 0. Returns the results (and the rows). run.resume continues an interrupted run."""
    with claim(run.out_dir, run.resume, run.overwrite):
        return _run_ppo(run, cfg, peft_config, reward)


def _run_ppo(run: RLRun, cfg: PPOConfig, peft_config, reward: str) -> dict:
    from rlhf.evaluate import held_out
    from rlhf.prompts import load_prompts
    from rlhf.reward_model import normalize_on_samples
    from rlhf.rewards import make_reward, open_reward_model

    pol = open_policy(run.sft, peft_config)
    tokenizer = pol.tokenizer
    rm = open_reward_model(run.reward, reward, tokenizer, next(pol.model.parameters()).device)
    examples, source = load_prompts(run.prompts, pol.info.get("template"))
    results = {"reward": reward}
    if rm is not None and cfg.normalize_reward:  # on the policy's own samples, drawn as the rollouts will be
        picked = [examples[i % len(examples)]["prompt"] for i in range(cfg.normalize_samples)]
        results["normalization"] = normalize_on_samples(rm, pol.model, tokenizer, picked, cfg.max_new_tokens,
                                                        cfg.temperature, seed=cfg.seed + 1)
    evaluate = held_out(run, pol, rm, cfg.max_new_tokens)
    if evaluate:
        results["before"] = evaluate()
    out_dir = Path(run.out_dir)
    state = load_checkpoint(out_dir / "rl_state.pt") if run.resume else None
    actor, rows = train_ppo(pol.model, tokenizer, examples, make_reward(reward, tokenizer, rm), cfg,
                            ref_model=pol.reference, out_dir=out_dir, progress=run.progress, resume=state)
    if evaluate:
        results["after"] = evaluate()
    plot_ppo(rows, out_dir / "ppo.png", title=f"PPO ({reward}, beta = {cfg.beta:g})")
    made_from = {"sft": run.sft, "reward": run.reward if rm is not None else None, "prompts": source}
    settings = {"ppo": dataclasses.asdict(cfg), "run": dataclasses.asdict(run), "reward": reward}
    save_policy(out_dir, pol, "ppo", made_from, settings)
    results.update(first_row=rows[0], last_row=rows[-1], params=sum(p.numel() for p in actor.parameters()))
    write_json(out_dir / "results.json", results)
    results["rows"] = rows
    return results


def build_parser() -> argparse.ArgumentParser:
    from peft.train import add_method_options
    from rlhf.rewards import KINDS

    p = argparse.ArgumentParser(prog="python -m rlhf.ppo", description="PPO on a policy (the SFT model) against a "
                                "reward model, the world's checker or both: python -m rlhf.ppo --sft out/sft/full "
                                "--reward out/reward", formatter_class=HelpFormatter)
    g = p.add_argument_group("what PPO starts from and learns from")
    add_options(g, RLRun)
    g.add_argument("--reward-fn", default="reward_model", choices=KINDS, help="what is maximised: the reward model, "
                   "the world's graded checker or its exact match (the prompts need reference answers), or the sum "
                   "of the reward model and the checker")
    add_method_options(p.add_argument_group("PEFT method options (with --peft)"))
    add_options(p.add_argument_group("PPO"), PPOConfig)
    return p


def main(argv=None) -> dict:
    from peft.train import given_method_options

    parser = build_parser()
    args = parser.parse_args(argv)
    run = from_args(RLRun, args)
    try:
        peft_config = rl_peft_config(run.peft, given_method_options(args))
        cfg = from_args(PPOConfig, args)
    except ValueError as e:
        parser.error(str(e))
    results = run_ppo(run, cfg, peft_config, args.reward_fn)
    first, last = results["first_row"], results["last_row"]
    print(f"PPO ({args.reward_fn}): score {first['score']:.3f} -> {last['score']:.3f}, KL {first['kl']:.3f} -> "
          f"{last['kl']:.3f} over {cfg.steps} steps; policy saved in {run.out_dir}, plot {run.out_dir}/ppo.png")
    return results


if __name__ == "__main__":
    run_cli(main)
