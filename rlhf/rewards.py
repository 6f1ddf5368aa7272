"""What an RL method maximises: the learned reward model, the world's own checker (a verifiable reward), or both.

A reward function takes a sampled batch (minigpt.engine.Generation) and the examples its prompts came from, and
returns one score per response, (B,):

    reward_model_reward(rm)          r_phi(x, y): the reward model's score of prompt and response, the tokens exactly as
                                     sampled (a response cut off at max_new_tokens is scored without an eos, as sampled)
    checker_reward(tokenizer)        the world's rubric, tasks.ground_truth_score: 1 for the correct answer alone, 0.5
                                     for it followed by more text, 0.25 for a wrong answer of the right form, else 0;
                                     with exact=True tasks.check_answer instead: 1 or 0
    summed(f, g)                     f + g
    make_reward(kind, ...)           "reward_model", "checker", "exact" (check_answer) or "both"

The checker is a verifiable reward in the sense of DeepSeekMath (Shao et al. 2024) and Tulu 3 (Lambert et al. 2024):
it needs no learned model and cannot be gamed the way a reward model can, but it needs each prompt's reference answer
(the example's "output").
"""

from __future__ import annotations

import torch

from minigpt import tasks

KINDS = ("reward_model", "checker", "exact", "both")


def reward_model_reward(rm):
    """r_phi of each sampled sequence (left-padded prompt + response up to its eos), read at its last real token."""

    @torch.no_grad()
    def reward(gen, examples):
        return rm(gen.tokens, attention_mask=gen.attention_mask).float()

    return reward


def checker_reward(tokenizer, exact: bool = False):
    """The world's checker on each decoded response: ground_truth_score, or with exact check_answer (1 or 0)."""

    def reward(gen, examples):
        missing = [i for i, ex in enumerate(examples) if "output" not in ex]
        if missing:
            raise ValueError(f"the checker needs each prompt's reference answer (an 'output' field); prompt "
                             f"{missing[0]} has none")
        texts = [tokenizer.decode(r) for r in gen.responses()]
        score = tasks.check_answer if exact else tasks.ground_truth_score
        values = [float(score(ex, text)) for ex, text in zip(examples, texts)]
        return torch.tensor(values, device=gen.tokens.device)

    return reward


def summed(*fns):
    """The sum of several reward functions."""

    def reward(gen, examples):
        return sum(fn(gen, examples) for fn in fns)

    return reward


def make_reward(kind: str, tokenizer, rm=None):
    """The reward function of kind "reward_model", "checker" (the graded rubric), "exact" (the checker's exact match,
    1 or 0) or "both" (the reward model plus the graded rubric)."""
    if kind not in KINDS:
        raise ValueError(f"reward must be one of {KINDS}, got {kind!r}")
    if kind in ("reward_model", "both") and rm is None:
        raise ValueError(f"reward {kind!r} needs a reward model")
    if kind == "reward_model":
        return reward_model_reward(rm)
    if kind in ("checker", "exact"):
        return checker_reward(tokenizer, exact=kind == "exact")
    return summed(reward_model_reward(rm), checker_reward(tokenizer))


def open_reward_model(path, kind: str, tokenizer, device):
    """The reward model at path, frozen and on device, when the reward of kind uses it, or when a reward model is
    there anyway (its scores are then reported beside the checker's); None otherwise. It must share the policy's
    tokenizer."""
    from pathlib import Path

    from rlhf.reward_model import load_reward_model

    if kind not in ("reward_model", "both") and not (path and Path(path).exists()):
        return None
    if not path:
        raise ValueError(f"the reward {kind!r} needs a reward model, and none was given: pass --reward (a folder "
                         f"written by python -m rlhf.reward_model), or --reward-fn checker")
    rm, rm_tokenizer = load_reward_model(path)
    if rm_tokenizer.to_dict() != tokenizer.to_dict():
        raise ValueError(f"the reward model {path} uses tokenizer {rm_tokenizer.name!r}, the policy uses "
                         f"{tokenizer.name!r}: they must be the same")
    return rm.to(device)
