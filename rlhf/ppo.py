"""PPO for RLHF, written out with no RL library (Schulman et al. 2017; Ziegler et al. 2019; Stiennon et al. 2020;
Ouyang et al. 2022), with the details that published reproductions found to matter (Huang et al. 2022/2024, "The
N+ Implementation Details of RLHF with PPO").

The actors:
- the policy pi_theta: the SFT model (all weights trained, or through a PEFT method);
- a value head V: a Linear C -> 1 on the policy's own final hidden states. One forward pass gives both the logits
  and the values, at half the compute and memory of a separate critic, which matters on a CPU. The head reads the
  features through a stop-gradient: early in training the value loss is large and noisy, and letting it reshape the
  shared backbone degraded the policy in our runs (entropy and KL climbed while the true score fell);
- the reference pi_ref: the frozen SFT model; when the policy trains through a PEFT method, the same network with its
  adapters disabled (peft.disable_adapters), so no second copy sits in memory;
- the reward: the reward model's normalised score of the whole response (any reward_fn can stand in).

One PPO step:
1. rollout: sample a response to each (left-padded) prompt with temperature, the KV cache, stopping at the first eos;
2. log-probabilities of the sampled tokens under pi_theta and pi_ref, from the logits at the previous position,
   divided by the sampling temperature; values V(s_t) at the same positions;
3. per-token rewards: r_t = -beta * KL_t, plus the score at the last response token, where
   KL_t = log pi(a_t) - log pi_ref(a_t) (k1) or (rho - 1) - log rho with rho = pi_ref / pi (k3);
4. GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1};
   returns R_t = A_t + V_t; advantages whitened over the batch;
5. several epochs over shuffled minibatches of the clipped losses
   L_pi = E[max(-A rho_t, -A clip(rho_t, 1 - eps, 1 + eps))],  rho_t = pi_theta(a_t) / pi_old(a_t)
   L_V  = 1/2 E[max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)]
   minimising L_pi + vf_coef L_V with gradient clipping;
6. the adaptive KL controller (Ziegler et al. 2019, sec. 2.2): beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2)
   * n / horizon), with n the number of episodes in the step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from minigpt.model import disable_dropout
from minigpt.sft import left_pad
from minigpt.train import TrainConfig, configure_optimizer


@dataclass
class PPOConfig:
    steps: int = 60  # PPO steps (one rollout + optimisation each)
    batch_size: int = 64  # prompts per rollout
    minibatch_size: int = 16
    ppo_epochs: int = 4
    max_new_tokens: int = 24
    temperature: float = 1.0  # sampling temperature; log-probabilities use the same one
    lr: float = 1e-4
    vf_lr: float | None = None  # the value head's learning rate (None: lr); it is a fresh head, so it may move faster
    beta: float = 0.05  # initial KL coefficient
    adaptive_kl: bool = False
    target_kl: float = 1.0  # the adaptive controller's target for the per-sequence KL (nats)
    horizon: int = 10_000
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    missing_eos_penalty: float | None = None  # subtracted from the score of a response that never emits eos
    seed: int = 0

    def __post_init__(self):
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of minibatch_size "
                             f"({self.minibatch_size})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for PPO (it samples), got {self.temperature}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


# -- the pieces of the math, each checked against a hand computation in tests/test_ppo.py --------------------


def response_logprobs(logits, tokens, prompt_len: int, temperature: float = 1.0):
    """log pi(a_t | s_t) of each response token: the token at position P + t is predicted by the logits at position
    P + t - 1. logits (B, P + R, V), tokens (B, P + R) -> (B, R)."""
    logits = logits[:, prompt_len - 1 : -1].float() / temperature  # (B, R, V): positions P - 1 ... P + R - 2
    actions = tokens[:, prompt_len:]  # (B, R)
    return torch.log_softmax(logits, dim=-1).gather(-1, actions[..., None]).squeeze(-1)


def kl_penalty(logp, ref_logp, estimator: str = "k1"):
    """Per-token estimate of KL(pi || pi_ref) from a sample of pi: k1 = log pi - log pi_ref (unbiased, can be
    negative); k3 = (rho - 1) - log rho with rho = pi_ref / pi (unbiased and never negative; Schulman 2020)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio


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


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over the masked entries of the whole batch; masked-out entries become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def policy_loss(logp, old_logp, advantages, mask, cliprange: float):
    """Clipped surrogate: mean over tokens of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)). Returns the loss and
    the fraction of tokens where the clipped term was the larger one."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac, ratio


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """1/2 mean of max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


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

    def forward(self, idx, attention_mask):
        h = self.policy.hidden_states(idx, attention_mask=attention_mask)  # (B, T, C)
        logits = self.policy.output_layer(h)  # (B, T, V)
        # the value head reads the policy's features but sends no gradient into them (see the module docstring)
        values = self.value_head(self.policy.output_layer.ln_f(h).detach()).squeeze(-1)  # (B, T)
        return logits, values


@contextlib.contextmanager
def reference_of(policy, ref_model=None):
    """The reference model: ref_model if given, else the policy with its PEFT adapters disabled."""
    if ref_model is not None:
        yield ref_model
        return
    import peft

    with peft.disable_adapters(policy):
        yield policy


# -- rollouts -------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    tokens: torch.Tensor  # (B, P + R) prompt (left-padded) and response
    attention_mask: torch.Tensor  # (B, P + R)
    prompt_len: int  # P
    response_mask: torch.Tensor  # (B, R): 1 up to and including the first eos
    logprobs: torch.Tensor  # (B, R) under the policy that sampled
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,)
    rewards: torch.Tensor  # (B, R)
    kl: torch.Tensor  # (B, R) per-token KL estimate


def sample_responses(policy, prompts: list[list[int]], tokenizer, cfg: PPOConfig, generator=None):
    """Left-pad the prompts, sample responses, cut each at its first eos. Returns (tokens, attention_mask, P,
    response_mask)."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    device = next(policy.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    out = policy.generate(ids, cfg.max_new_tokens, temperature=cfg.temperature, attention_mask=mask,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          generator=generator)
    P = ids.size(1)
    response = out[:, P:]  # (B, R)
    is_eos = response == tokenizer.eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first eos
    response_mask = (~after_eos).long()
    return out, torch.cat([mask, response_mask], dim=1), P, response_mask


@torch.no_grad()
def rollout(actor: PolicyWithValue, prompts, tokenizer, reward_fn, cfg: PPOConfig, beta: float, ref_model=None,
            generator=None) -> Rollout:
    actor.eval()
    tokens, attn, P, rmask = sample_responses(actor.policy, prompts, tokenizer, cfg, generator)
    logits, values = actor(tokens, attn)
    logprobs = response_logprobs(logits, tokens, P, cfg.temperature)
    values = values[:, P - 1 : -1]  # V(s_t): the state before each response token
    with reference_of(actor.policy, ref_model) as ref:
        ref_logits, _ = ref(tokens, attention_mask=attn)
    ref_logprobs = response_logprobs(ref_logits, tokens, P, cfg.temperature)
    scores = reward_fn(tokens, attn, P, rmask).float()  # (B,)
    has_eos = ((tokens[:, P:] == tokenizer.eos_token_id) & rmask.bool()).any(-1)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~has_eos).float()
    rmask_f = rmask.float()
    kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * rmask_f
    rewards = -beta * kl
    last = rmask.sum(-1).clamp(min=1) - 1  # index of the last response token
    rewards[torch.arange(len(last)), last] += scores
    return Rollout(tokens, attn, P, rmask_f, logprobs * rmask_f, ref_logprobs * rmask_f, values * rmask_f, scores,
                   rewards, kl)


# -- the update -----------------------------------------------------------------------------------------------


def ppo_update(actor: PolicyWithValue, optimizer, ro: Rollout, cfg: PPOConfig, generator=None) -> dict:
    """Several epochs of clipped policy and value losses over shuffled minibatches of one rollout."""
    advantages, returns = gae(ro.rewards, ro.values, ro.response_mask, cfg.gamma, cfg.lam)
    advantages = whiten(advantages, ro.response_mask)
    B = ro.tokens.size(0)
    stats = {"policy_loss": [], "value_loss": [], "clipfrac": [], "approx_kl": [], "ratio": [], "entropy": []}
    actor.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, cfg.minibatch_size):
            i = order[start : start + cfg.minibatch_size].to(ro.tokens.device)
            m = ro.response_mask[i]
            logits, values = actor(ro.tokens[i], ro.attention_mask[i])
            logp = response_logprobs(logits, ro.tokens[i], ro.prompt_len, cfg.temperature)
            values = values[:, ro.prompt_len - 1 : -1]
            pg, clipfrac, ratio = policy_loss(logp, ro.logprobs[i], advantages[i], m, cfg.cliprange)
            vf = value_loss(values, ro.values[i], returns[i], m, cfg.cliprange_value)
            loss = pg + cfg.vf_coef * vf
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in actor.parameters() if p.requires_grad], cfg.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                resp_logits = logits[:, ro.prompt_len - 1 : -1].float() / cfg.temperature
                entropy = -(resp_logits.softmax(-1) * resp_logits.log_softmax(-1)).sum(-1)
                stats["policy_loss"].append(pg.item())
                stats["value_loss"].append(vf.item())
                stats["clipfrac"].append(clipfrac.item())
                stats["approx_kl"].append(masked_mean(0.5 * (logp - ro.logprobs[i]) ** 2, m).item())
                stats["ratio"].append(masked_mean(ratio, m).item())
                stats["entropy"].append(masked_mean(entropy, m).item())
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["first_ratio"] = stats["ratio"][0]
    var_returns = masked_mean((returns - masked_mean(returns, ro.response_mask)) ** 2, ro.response_mask)
    var_resid = masked_mean((returns - ro.values - masked_mean(returns - ro.values, ro.response_mask)) ** 2,
                            ro.response_mask)
    out["explained_variance"] = (1.0 - var_resid / var_returns.clamp(min=1e-8)).item()
    return out


# -- the loop -------------------------------------------------------------------------------------------------


def train_ppo(policy, tokenizer, prompts: list[list[int]], reward_fn, cfg: PPOConfig, ref_model=None,
              out_dir=None, extra_metrics=None, progress: bool = True) -> tuple[PolicyWithValue, list[dict]]:
    """Run cfg.steps PPO steps on prompts (token id lists, drawn in shuffled batches) and return the actor and one
    metrics row per step. ref_model None: the policy carries a PEFT method whose disabled adapters are the
    reference; otherwise pass the frozen SFT model (make_reference). extra_metrics(rollout) -> dict adds to each row
    (e.g. the ground-truth score of the responses)."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = next(policy.parameters()).device
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    actor = PolicyWithValue(policy)
    optimizer = configure_optimizer(policy, TrainConfig(lr=cfg.lr, min_lr=0.0, weight_decay=0.0), device.type)
    optimizer.add_param_group({"params": list(actor.value_head.parameters()), "weight_decay": 0.0,
                               "lr": cfg.lr if cfg.vf_lr is None else cfg.vf_lr})  # the value head, at its own rate
    controller = AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.horizon)
    rows, order, cursor = [], torch.randperm(len(prompts), generator=generator).tolist(), 0
    metrics_path = Path(out_dir) / "ppo_metrics.jsonl" if out_dir else None
    if metrics_path:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="ppo", dynamic_ncols=True)
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(prompts), generator=generator).tolist(), 0
        batch = [prompts[j] for j in order[cursor : cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        beta = controller.beta
        ro = rollout(actor, batch, tokenizer, reward_fn, cfg, beta, ref_model, sample_gen)
        stats = ppo_update(actor, optimizer, ro, cfg, generator)
        seq_kl = ro.kl.sum(-1).mean().item()
        if cfg.adaptive_kl:
            controller.update(seq_kl, cfg.batch_size)
        row = {"step": step, "score": ro.scores.mean().item(), "kl": seq_kl,
               "total_reward": ro.rewards.sum(-1).mean().item(), "beta": beta,
               "response_len": ro.response_mask.sum(-1).mean().item(), **stats}
        if extra_metrics is not None:
            row.update(extra_metrics(ro))
        if not all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
            raise FloatingPointError(f"PPO step {step} produced a non-finite metric: {row}")
        rows.append(row)
        if metrics_path:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(score=f"{row['score']:.2f}", kl=f"{seq_kl:.2f}", beta=f"{beta:.3f}")
    if bar is not None:
        bar.close()
    return actor, rows


def make_reference(policy):
    """A frozen copy of the SFT model (for a policy trained on all its weights)."""
    ref = copy.deepcopy(policy).eval()
    disable_dropout(ref)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def reward_model_fn(reward_model, eos_token_id: int):
    """reward_fn for train_ppo from a RewardModel: it scores prompt + response up to its first eos (the eos is part
    of the response, so the reward model reads it as it did in training)."""

    @torch.no_grad()
    def score(tokens, attention_mask, prompt_len, response_mask):
        return reward_model(tokens, attention_mask=attention_mask)

    return score


PANELS = [  # (title, [(metric, label)], y label): everything train_ppo logs, one panel each
    ("scores", [("score", "reward-model score"), ("true_score", "ground-truth score")], "mean over the batch"),
    ("KL to the reference", [("kl", "KL(pi || pi_ref) per response"), ("beta", "beta")], "nats"),
    ("total reward", [("total_reward", "score - beta * KL")], "per response"),
    ("entropy", [("entropy", "policy entropy")], "nats per token"),
    ("approx KL (old -> new)", [("approx_kl", "approx KL")], "nats per token"),
    ("clip fraction", [("clipfrac", "policy ratio clipped")], "share of tokens"),
    ("value loss", [("value_loss", "clipped value loss")], "loss"),
    ("explained variance", [("explained_variance", "1 - Var(returns - V) / Var(returns)")], ""),
    ("mean ratio", [("ratio", "pi / pi_old")], ""),
]


def plot_ppo(rows: list[dict], path, title: str = "PPO") -> None:
    """Every logged metric over PPO steps, one panel each (a metric not in the rows is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 3, figsize=(13, 9))
    for ax, (name, metrics, ylabel) in zip(axes.flat, PANELS):
        for key, label in metrics:
            if key in rows[0]:
                ax.plot(steps, [r[key] for r in rows], label=label)
        ax.set_title(name)
        ax.set_xlabel("PPO step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def config_dict(cfg: PPOConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_policy(path, policy, tokenizer, cfg: PPOConfig) -> None:
    """The trained policy as a checkpoint minigpt.sample and peft.train.load_base read, with the PPO settings."""
    from minigpt.train import save_checkpoint

    save_checkpoint(path, {"model": policy.state_dict(), "model_config": policy.config.to_dict(),
                           "tokenizer": tokenizer.to_dict(), "stage": "ppo", "ppo": config_dict(cfg)})


# -- CLI --------------------------------------------------------------------------------------------------------


def read_prompts(path) -> list[str]:
    """Prompts from a text file (one a line, blank lines skipped) or JSONL with a "prompt" field on every line."""
    from minigpt import tasks

    if str(path).endswith(".jsonl"):
        return [row["prompt"] for row in tasks.read_jsonl(path, required=("prompt",))]
    prompts = [line.rstrip("\n") for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf.ppo", description="PPO on a policy (the SFT model) against a "
                                "reward model: python -m rlhf.ppo --sft out/sft/full --reward out/reward/reward.pt",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sft", default="out/sft/full", help="the policy to start from and the reference: a peft.train "
                   "output directory or a .pt checkpoint")
    p.add_argument("--reward", default="out/reward/reward.pt", help="a reward model written by rlhf.reward_model")
    p.add_argument("--prompts", help="a text file (one prompt a line) or JSONL with a prompt field (default: the "
                   "built-in PPO prompts)")
    p.add_argument("--out-dir", default="out/ppo")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("PPO")
    for f in dataclasses.fields(PPOConfig):
        default = f.default
        if isinstance(default, bool):
            g.add_argument("--" + f.name.replace("_", "-"), action="store_true")
        else:
            g.add_argument("--" + f.name.replace("_", "-"), type=float if f.type in ("float", "float | None")
                           else type(default), default=default)
    return p


def main(argv=None) -> list[dict]:
    from minigpt import tasks
    from rlhf.reward_model import load_reward_model, load_sft

    args = build_parser().parse_args(argv)
    cfg = PPOConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PPOConfig)})
    policy, tokenizer = load_sft(args.sft)
    reward_model, rm_tokenizer = load_reward_model(args.reward)
    if rm_tokenizer.to_dict() != tokenizer.to_dict():
        raise SystemExit(f"the reward model {args.reward} uses tokenizer {rm_tokenizer.name!r}, the policy "
                         f"{args.sft} uses {tokenizer.name!r}: they must be the same")
    for p in reward_model.parameters():
        p.requires_grad_(False)
    texts = read_prompts(args.prompts) if args.prompts else [ex["prompt"] for ex in tasks.ppo_prompts()[0]]
    prompts = [tokenizer.encode(t) for t in texts]
    out_dir = Path(args.out_dir)
    ref = None if getattr(policy, "peft_config", None) is not None else make_reference(policy)
    actor, rows = train_ppo(policy, tokenizer, prompts, reward_model_fn(reward_model, tokenizer.eos_token_id), cfg,
                            ref_model=ref, out_dir=out_dir, progress=not args.no_progress)
    plot_ppo(rows, out_dir / "ppo.png")
    save_policy(out_dir / "policy.pt", policy, tokenizer, cfg)
    first, last = rows[0], rows[-1]
    print(f"PPO: reward-model score {first['score']:.3f} -> {last['score']:.3f}, KL {first['kl']:.3f} -> "
          f"{last['kl']:.3f} over {cfg.steps} steps; policy saved to {out_dir / 'policy.pt'}, plot {out_dir / 'ppo.png'}")
    return rows


if __name__ == "__main__":
    main()
