"""Preference pairs as token ids: {"prompt", "chosen", "rejected", optional "margin"} -> (2B, T) batches.

The layout is that of the Anthropic HH and TRL examples: one JSON object a line with the prompt and two responses, the
preferred one first. A reward model reads each response after its prompt and before an end-of-text token:

    tokens = encode(prompt) + encode(response) + [eos]      (the prompt cut from the left to fit the context)

A user's prompt is wrapped in the prompt template the SFT model was trained with (its model.json records it), so that
the reward model, which starts from the SFT model, reads prompts as the SFT model saw them; a prompt already in the
template's form (the built-in pairs) is left as it is.
"""

from __future__ import annotations

import math
import numbers

import torch

from minigpt import tasks
from minigpt.files import read_jsonl


def fit_context(prompt_ids: list[int], response_ids: list[int], eos_token_id: int, block_size: int,
                index: int = 0) -> list[int]:
    """prompt_ids + response_ids + [eos], cut from the left of the prompt to fit block_size tokens. The response is
    never cut: one whose tokens and eos alone exceed block_size raises a ValueError naming the example."""
    answer = list(response_ids) + [eos_token_id]
    if len(answer) > block_size:
        raise ValueError(f"example {index}: the response and eos are {len(answer)} tokens, more than the reward "
                         f"model's context of {block_size} tokens (the prompt is {len(prompt_ids)} tokens)")
    keep = block_size - len(answer)  # prompt tokens that fit, the last ones
    return list(prompt_ids[max(0, len(prompt_ids) - keep):]) + answer


def encode_response(tokenizer, prompt: str, response: str, block_size: int, index: int = 0) -> list[int]:
    """encode(prompt) + encode(response) + [eos], the prompt cut from the left to fit (see fit_context)."""
    return fit_context(tokenizer.encode(prompt), tokenizer.encode(response), tokenizer.eos_token_id, block_size,
                       index)


def encode_pairs(tokenizer, pairs: list[dict], block_size: int,
                 template=None) -> list[tuple[list[int], list[int], float]]:
    """(chosen tokens, rejected tokens, margin) of each pair; margin 0.0 when the pair has none. template: the prompt
    template to wrap each prompt in (None: prompts as they are)."""
    encoded = []
    for i, pair in enumerate(pairs):
        margin = pair.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not math.isfinite(margin):
            raise ValueError(f"pair {i}: margin must be a finite number, got {margin!r}")
        prompt = tasks.format_prompt(pair["prompt"], template=template) if template else pair["prompt"]
        encoded.append((encode_response(tokenizer, prompt, pair["chosen"], block_size, i),
                        encode_response(tokenizer, prompt, pair["rejected"], block_size, i), float(margin)))
    return encoded


def pad_right(rows: list[list[int]], pad_token_id: int):
    """Token lists padded on the right to the longest: (idx (N, T), attention_mask (N, T), 1 on real tokens)."""
    T = max(map(len, rows))
    idx = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, tokens in enumerate(rows):
        idx[b, : len(tokens)] = torch.tensor(tokens)
        mask[b, : len(tokens)] = 1
    return idx, mask


def collate_pairs(encoded, pad_token_id: int) -> dict:
    """One right-padded batch of 2B sequences, the B chosen then the B rejected:
    {"idx": (2B, T), "attention_mask": (2B, T), "margin": (B,)}."""
    idx, mask = pad_right([c for c, _, _ in encoded] + [r for _, r, _ in encoded], pad_token_id)
    return {"idx": idx, "attention_mask": mask, "margin": torch.tensor([m for _, _, m in encoded])}


def random_pairs(encoded, batch_size: int, pad_token_id: int, generator: torch.Generator) -> dict:
    """batch_size pairs drawn uniformly (with replacement) with the given generator."""
    ix = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
    return collate_pairs([encoded[i] for i in ix], pad_token_id)


def read_pairs(path) -> list[dict]:
    """Preference pairs from JSONL: prompt, chosen, rejected (and optional margin) on every line. A pair whose two
    responses are the same teaches nothing (its loss is log 2 whatever the model does) and is refused."""
    pairs = read_jsonl(path, required=("prompt", "chosen", "rejected"))
    same = [i for i, p in enumerate(pairs) if p["chosen"] == p["rejected"]]
    if same:
        raise ValueError(f"{path}: {len(same)} pairs have chosen == rejected (the first is pair {same[0]}); a pair "
                         f"needs two different responses")
    return pairs
