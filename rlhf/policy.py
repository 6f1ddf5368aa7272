"""What PPO, GRPO and DPO share: the policy they train, the reference it is held to, log-probabilities of responses,
and the saved result.

The reference is the SFT model as it was when RL began, whatever the SFT stage trained:
- a full SFT model, trained on all weights: the reference is a frozen copy of it;
- an SFT model that is a base plus an adapter (LoRA, prompt tuning, ...), trained further through that adapter:
  the reference is a frozen copy of the base with the adapter as the SFT stage left it (disabling the adapter would
  give the pretrained base, not the SFT model);
- with ``peft`` set, a fresh adapter of that method on top of the SFT model (an SFT adapter is merged in first): the
  reference is the same network with its adapters disabled, so no second copy sits in memory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

import peft
from minigpt import checkpoint
from minigpt.model import disable_dropout
from minigpt.options import option


@dataclass
class RLRun:
    """Where an RL stage starts from and writes to (the algorithm's settings are PPOConfig, GRPOConfig, ...)."""

    sft: str = option("out/sft/full", "the policy to start from, and the reference it is held to: an SFT output "
                      "(full or PEFT) or any language model")
    reward: str | None = option("out/reward", "the reward model (rlhf.reward_model's output); used when the reward "
                                "includes it")
    prompts: str | None = option(None, "prompts to train on: a text file (one instruction a line) or JSONL with "
                                 "instruction (and input, output) or prompt fields; default: the built-in PPO prompts")
    peft: str = option("none", "train a fresh adapter of this PEFT method on top of the SFT model (the reference is "
                       "then the network with its adapters disabled); none: train what the SFT stage trained",
                       choices=["none", *sorted(peft.CONFIGS)])
    out_dir: str = option("out/ppo", "where the policy, metrics and plots go")
    eval_prompts: int = option(0, "held-out built-in prompts to evaluate the policy on before and after (0: none)")
    eval_samples: int = option(4, "samples per held-out prompt, for sampled accuracy and pass@k")
    eval_temperature: float = option(1.0, "the temperature of those samples (the same for every method compared)")
    resume: bool = option(False, "continue the run in OUT_DIR from its last saved step")
    overwrite: bool = option(False, "replace the run already in OUT_DIR (without it, an existing run is refused)")
    progress: bool = option(True, "show a progress bar")


@dataclass
class Policy:
    model: object  # the GPT being trained (dropout off)
    reference: object | None  # a frozen copy of the SFT model, or None: the model with its adapters disabled
    tokenizer: object
    info: dict  # the SFT model's description (model.json)
    base: str | None  # for saving: the base an adapter-only policy goes on (None: save every weight)


def rl_peft_config(method: str, options: dict):
    """The fresh adapter an RL command trains on top of the SFT model (--peft METHOD with its method options), or
    None for --peft none, where a method option given is an error rather than silently ignored."""
    from minigpt.sft import method_config

    if method == "none":
        if options:
            raise ValueError(f"options {sorted(options)} need --peft METHOD")
        return None
    return method_config(method, **options)


def make_reference(model):
    """A frozen copy of the model, in evaluation mode, dropout off."""
    ref = copy.deepcopy(model).eval()
    disable_dropout(ref)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def open_policy(path, peft_config=None) -> Policy:
    """The policy and its reference from an SFT output (see the module docstring)."""
    loaded = checkpoint.load(path, expect="gpt")
    model = loaded.model
    disable_dropout(model)
    carried = getattr(model, "peft_config", None)
    if peft_config is None:
        base = loaded.info["base"]["path"] if carried is not None and loaded.info.get("base") else None
        return Policy(model, make_reference(model), loaded.tokenizer, loaded.info, base)
    if carried is not None:
        if not peft.can_merge(model):
            raise ValueError(f"{path} carries a {carried.method!r} adapter that cannot be merged, so a "
                             f"{peft_config.method!r} adapter cannot go on top; train the SFT adapter (peft none)")
        peft.merge_and_unload(model)
    peft.get_peft_model(model, peft_config)
    disable_dropout(model)
    return Policy(model, None, loaded.tokenizer, loaded.info, None)


@contextlib.contextmanager
def reference_of(policy_model, reference=None):
    """The reference model: reference if given, else the policy with its PEFT adapters disabled."""
    if reference is not None:
        yield reference
        return
    with peft.disable_adapters(policy_model):
        yield policy_model


def response_logits(model, tokens, attention_mask, prompt_len: int):
    """(B, R, V): the logits that predict the response tokens, at positions P - 1 ... P + R - 2 of tokens (B, P + R).
    The output layer runs only there: the prompt's other positions predict tokens that no RL loss reads."""
    h = model.hidden_states(tokens, attention_mask=attention_mask)  # (B, P + R, C)
    return model.output_layer(h[:, prompt_len - 1 : -1])  # (B, R, V)


def response_logprobs(logits, tokens, prompt_len: int, temperature: float = 1.0):
    """log pi(a_t | s_t) of each response token: the token at position P + t is predicted by the logits at position
    P + t - 1, divided by the sampling temperature. logits (B, P + R, V) for every position, or (B, R, V) for those
    positions only (response_logits); tokens (B, P + R) -> (B, R)."""
    if logits.size(1) == tokens.size(1):
        logits = logits[:, prompt_len - 1 : -1]  # (B, R, V): positions P - 1 ... P + R - 2
    elif logits.size(1) != tokens.size(1) - prompt_len:
        raise ValueError(f"logits cover {logits.size(1)} positions; expected {tokens.size(1)} (every position) or "
                         f"{tokens.size(1) - prompt_len} (the response's, after a prompt of {prompt_len})")
    actions = tokens[:, prompt_len:]  # (B, R)
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, actions[..., None]).squeeze(-1)


def kl_penalty(logp, ref_logp, estimator: str = "k1"):
    """Per-token estimate of KL(pi || pi_ref) from a sample of pi: k1 = log pi - log pi_ref (unbiased, can be
    negative); k3 = (rho - 1) - log rho with rho = pi_ref / pi (unbiased and never negative; Schulman 2020)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def entropy_of(logits, mask, temperature: float = 1.0):
    """Mean entropy (nats) of the sampling distributions softmax(logits / temperature) over the masked positions."""
    logits = logits.float() / temperature
    return masked_mean(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1), mask)


class StepLog:
    """One metrics row per step: appended to a JSONL file, shown on a progress bar, and kept in ``rows`` (a resumed
    loop starts from the rows it had written)."""

    def __init__(self, path, total: int, desc: str, progress: bool = True, rows=None):
        self.path, self.rows = (Path(path) if path else None), list(rows or [])
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=len(self.rows), desc=desc, dynamic_ncols=True)

    def write(self, row: dict, **shown) -> None:
        bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"step {row.get('step')} produced non-finite metrics {bad}; stopping")
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- continuing an RL loop exactly where it stopped -------------------------------------------------------------


def loop_state(step: int, modules: dict, optimizers: dict, generators: dict, rows: list, **extra) -> dict:
    """Everything an RL loop needs to go on after `step` as if never stopped: the trained tensors of each module,
    the optimizers, the random generators (and torch's), the metrics rows and the loop's own values (extra)."""
    return {"step": step, "rows": rows, "extra": extra, "rng": torch.get_rng_state(),
            "modules": {k: {n: p.detach().cpu() for n, p in m.named_parameters() if p.requires_grad}
                        for k, m in modules.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "generators": {k: g.get_state() for k, g in generators.items()}}


def restore_loop_state(state: dict, modules: dict, optimizers: dict, generators: dict) -> dict:
    """Put a loop_state back into the same modules, optimizers and generators; returns its extra values."""
    with torch.no_grad():
        for k, m in modules.items():
            params = dict(m.named_parameters())
            trained = {n for n, p in params.items() if p.requires_grad}
            if set(state["modules"][k]) != trained:
                raise ValueError(f"the saved {k} does not fit this one (it was trained through other tensors); "
                                 f"resume with the settings the run started with")
            for n, t in state["modules"][k].items():
                params[n].copy_(t)
    for k, o in optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    for k, g in generators.items():
        g.set_state(state["generators"][k])
    torch.set_rng_state(state["rng"])
    return state["extra"]


def save_policy(folder, pol: Policy, stage: str, made_from=None, settings=None):
    """The trained policy as a model folder that every command opens: an adapter on its base when the policy
    trained an SFT adapter, otherwise every weight (a fresh LoRA or IA3 adapter folded in)."""
    model = pol.model
    if pol.base is None and peft.can_merge(model):
        model = copy.deepcopy(model)
        peft.merge_and_unload(model)
    return checkpoint.save_model(folder, model, pol.tokenizer, stage, pol.info.get("template"), made_from, settings,
                                 base=pol.base)
