"""The prompts an RL stage trains on: the built-in ones, or a user's file, in the SFT model's prompt template.

A file is either text, one instruction a line (blank lines skipped), or JSONL with on every line an ``instruction``
(and optional ``input``), or a ``prompt``; an ``output`` field, when present, is the reference answer that the
world's checker (the verifiable reward) compares with. Each prompt is wrapped in the template the SFT model was
trained with (recorded in its model.json), so the policy is asked as it was taught; a prompt already in that form is
left as it is, and a model without a template gets the text unchanged.
"""

from __future__ import annotations

from pathlib import Path

from minigpt import tasks
from minigpt.files import read_jsonl, read_text


def read_prompts(path, template=None) -> list[dict]:
    """[{"prompt": formatted prompt, optional "output", "task", ...}] from a text or JSONL file."""
    if str(path).endswith(".jsonl"):
        rows = read_jsonl(path, required=())
        for n, row in enumerate(rows):
            if "instruction" not in row and "prompt" not in row:
                raise ValueError(f"{path}: row {n + 1} has neither an 'instruction' nor a 'prompt' field")
    else:
        rows = [{"instruction": line.strip()} for line in read_text(path, "prompts file").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return [dict(row, prompt=format_for(row, template)) for row in rows]


def format_for(row: dict, template) -> str:
    text = row.get("prompt", row.get("instruction"))
    if template is None:
        return text if not row.get("input") else f"{text}\n{row['input']}"
    return tasks.format_prompt(text, row.get("input", ""), template)


def builtin_prompts(n_train: int = 1000, n_test: int = 250, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The built-in PPO prompts (tasks.ppo_prompts): (train, held-out), each with its reference answer."""
    return tasks.ppo_prompts(seed=seed, n_train=n_train, n_test=n_test)


def load_prompts(path, template=None) -> tuple[list[dict], str]:
    """(prompts to train on, where they came from): path's, or the built-in training prompts."""
    if path:
        return read_prompts(Path(path), template), str(path)
    return builtin_prompts()[0], "built-in PPO prompts"
