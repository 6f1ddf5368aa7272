"""Reward modelling: a scalar head on a GPT backbone, trained on preference pairs with the Bradley-Terry loss.

Bradley & Terry (1952) model the probability that a response y_c is preferred to y_r as

    P(y_c > y_r | x) = exp(r(x, y_c)) / (exp(r(x, y_c)) + exp(r(x, y_r))) = sigmoid(r(x, y_c) - r(x, y_r)).

Maximum likelihood on comparisons gives the reward-model loss of Stiennon et al. 2020 (eq. 1) and InstructGPT
(Ouyang et al. 2022, eq. 1, one pair per prompt):

    loss(theta) = -E_(x, y_c, y_r) [ log sigmoid(r_theta(x, y_c) - r_theta(x, y_r) - m) ] + c E[(r_c + r_r)^2]

with two optional extras: a margin m the chosen response must win by (Llama 2, Touvron et al. 2023, eq. 2) and a
centring term with coefficient c that keeps rewards near 0, since the first term sees only differences (Eisenstein
et al. 2023; TRL's center_rewards_coefficient).

The model: the GPT without its language-model head, and a Linear C -> 1 read at the last real token (the eos):

    h = LN_f(encoder(input_layer(prompt ; response ; eos)))    (B, T, C)
    r = gain * (w . h[last real token] + b) + bias             (B,)

w ~ N(0, 1 / (C + 1)) and b = 0 at the start (Ziegler et al. 2019's reward head). After training, gain and bias are
set so that the rewards of the SFT model's own responses to held-out prompts have mean 0 and std 1 (Ziegler et al.
2019 normalise on samples of the initial policy; Stiennon et al. 2020 shift reference summaries to mean 0), so PPO
starts from rewards of a known scale. Dropout is switched off in the backbone (every nn.Dropout and the attention
dropout get p = 0): with it, the two responses of a pair would see different masks, adding noise to exactly the
difference the loss reads, and PPO would read a random reward.

The built-in pairs (minigpt.tasks.preference_pairs) come in four kinds, and the evaluation reports the accuracy of
each (``accuracy_<kind>`` in metrics.jsonl, ``accuracy_by_kind`` in results.json). All four are decided by what the
response looks like next to the prompt (extra text after the answer; an answer of the wrong kind; a list not made of
the input's words). After training on the built-in set, the CLI also scores the probes of tasks.probe_pairs, kinds
left out of the set because this small reward model cannot learn them (``probe_accuracy``): ``near_miss`` needs the
task solved, ``list_edit`` a word-by-word copy check; it does not learn them (52% and 62% in the pipeline).

CLI: ``python -m rlhf.reward_model --sft out/sft/full --out-dir out/reward`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import numbers
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import peft
from minigpt import GPT, GPTConfig, tasks
from minigpt.model import disable_dropout
from minigpt.sft import left_pad
from minigpt.tokenizer import tokenizer_from_dict
from minigpt.train import TrainConfig, load_checkpoint, save_checkpoint, train

# ----------------------------------------------------------------------------------------------------------
# The model


def final_hidden_states(gpt: GPT, idx, attention_mask=None):
    """LN_f(h_n) at every real position: (B, T, C), the GPT's forward pass up to the language-model head. Through
    GPT.hidden_states, so methods that patch the input layer (prompt tuning) or the attention (prefix tuning) work."""
    return gpt.output_layer.ln_f(gpt.hidden_states(idx, attention_mask=attention_mask))


def last_real_index(attention_mask):
    """(B,) index of each row's last real token, wherever the padding is (left, right or none)."""
    mask = attention_mask.bool()  # (B, T)
    empty = (~mask.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} of attention_mask have no real token (all zeros)")
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask, positions, -1).amax(dim=-1)  # (B,)


def value_head(n_embd: int) -> nn.Linear:
    """Linear C -> 1 with w ~ N(0, 1 / (C + 1)) and b = 0: the reward starts with about unit scale."""
    head = nn.Linear(n_embd, 1)
    nn.init.normal_(head.weight, mean=0.0, std=1.0 / math.sqrt(n_embd + 1))
    nn.init.zeros_(head.bias)
    return head


class RewardModel(nn.Module):
    """r(x, y) = gain * (w . LN_f(h_n)[last real token] + b) + bias, one scalar per sequence."""

    def __init__(self, backbone: GPT):
        super().__init__()
        disable_dropout(backbone)
        backbone.config = backbone.config.replace(dropout=0.0)
        self.backbone = backbone
        self.head = value_head(backbone.config.n_embd).to(next(backbone.parameters()).device)
        self.register_buffer("gain", torch.tensor(1.0))  # set by normalize(); saved in the checkpoint
        self.register_buffer("bias", torch.tensor(0.0))

    @property
    def block_size(self) -> int:
        """The longest token sequence it scores (a prompt method's virtual tokens take some of the context)."""
        return self.backbone.config.block_size - getattr(self.backbone.input_layer, "num_virtual_tokens", 0)

    def score(self, idx, attention_mask=None):
        """The head's output before normalisation, w . h_last + b: (B,)."""
        h = final_hidden_states(self.backbone, idx, attention_mask)  # (B, T, C)
        if attention_mask is None:
            last = h[:, -1]  # (B, C)
        else:
            last = h[torch.arange(h.size(0), device=h.device), last_real_index(attention_mask.to(h.device))]
        return self.head(last).squeeze(-1)  # (B,)

    def forward(self, idx, attention_mask=None):
        """Rewards (B,) of the token sequences idx (B, T); attention_mask (B, T) marks real tokens with 1."""
        return self.gain * self.score(idx, attention_mask) + self.bias


# ----------------------------------------------------------------------------------------------------------
# The loss


def bradley_terry_loss(r_chosen, r_rejected, margin=None, center_coef: float = 0.0):
    """(loss, accuracy) for rewards (B,) of the chosen and rejected responses of B pairs.

    loss = mean(-log sigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2); accuracy = mean(r_c > r_r),
    detached, for logging. F.logsigmoid stays finite for any difference (-log sigmoid(-100) = 100, not inf).
    """
    if r_chosen.shape != r_rejected.shape or r_chosen.dim() != 1:
        raise ValueError(f"r_chosen and r_rejected must both have shape (B,), got {tuple(r_chosen.shape)} and "
                         f"{tuple(r_rejected.shape)}")
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    diff = r_chosen - r_rejected  # (B,)
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    accuracy = (r_chosen > r_rejected).float().mean().detach()
    return loss, accuracy


# ----------------------------------------------------------------------------------------------------------
# Data: {"prompt", "chosen", "rejected", optional "margin"} -> token ids -> (2B, T) batches


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


def encode_pairs(tokenizer, pairs: list[dict], block_size: int) -> list[tuple[list[int], list[int], float]]:
    """(chosen tokens, rejected tokens, margin) of each pair; margin 0.0 when the pair has none."""
    encoded = []
    for i, pair in enumerate(pairs):
        margin = pair.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not math.isfinite(margin):
            raise ValueError(f"pair {i}: margin must be a finite number, got {margin!r}")
        encoded.append((encode_response(tokenizer, pair["prompt"], pair["chosen"], block_size, i),
                        encode_response(tokenizer, pair["prompt"], pair["rejected"], block_size, i), float(margin)))
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


def pair_loss(rm, batch: dict, center_coef: float = 0.0):
    """(loss, accuracy) of a collate_pairs batch: both halves scored in one forward pass."""
    rewards = rm(batch["idx"], batch["attention_mask"]).float()  # (2B,)
    B = batch["margin"].size(0)
    return bradley_terry_loss(rewards[:B], rewards[B:], batch["margin"], center_coef)


def read_pairs(path) -> list[dict]:
    """Preference pairs from JSONL: prompt, chosen, rejected (and optional margin) on every line."""
    return tasks.read_jsonl(path, required=("prompt", "chosen", "rejected"))


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def score_pairs(rm, encoded, pad_token_id: int, batch_size: int = 64):
    """(r_chosen, r_rejected, margin), each (N,), for the encoded pairs."""
    rm.eval()
    device = rm.gain.device
    chosen, rejected, margins = [], [], []
    for start in range(0, len(encoded), batch_size):
        batch = collate_pairs(encoded[start : start + batch_size], pad_token_id)
        rewards = rm(batch["idx"].to(device), batch["attention_mask"].to(device)).float().cpu()  # (2B,)
        B = batch["margin"].size(0)
        chosen.append(rewards[:B])
        rejected.append(rewards[B:])
        margins.append(batch["margin"])
    return torch.cat(chosen), torch.cat(rejected), torch.cat(margins)


def pair_metrics(r_chosen, r_rejected, margin=None, kinds=None) -> dict:
    """{"val_loss", "accuracy", "mean_margin"} (the Bradley-Terry loss with the pairs' margins, without centring;
    the share of pairs with r_c > r_r; the mean of r_c - r_r), plus "accuracy_by_kind" when kinds are given."""
    loss, accuracy = bradley_terry_loss(r_chosen, r_rejected, margin)
    metrics = {"val_loss": loss.item(), "accuracy": accuracy.item(),
               "mean_margin": (r_chosen - r_rejected).mean().item()}
    if kinds is not None:
        wins = (r_chosen > r_rejected).tolist()
        metrics["accuracy_by_kind"] = {k: sum(w for w, kk in zip(wins, kinds) if kk == k) / kinds.count(k)
                                       for k in sorted(set(kinds))}
    return metrics


def plot_reward_histogram(r_chosen, r_rejected, path, title: str = "Rewards of held-out pairs") -> None:
    """Overlaid histograms of the rewards of the chosen and the rejected responses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    both = torch.cat([r_chosen, r_rejected])
    bins = torch.linspace(both.min().item(), both.max().item() + 1e-6, 41).tolist()
    ax.hist(r_chosen.tolist(), bins=bins, alpha=0.6, label=f"chosen (mean {r_chosen.mean():.2f})")
    ax.hist(r_rejected.tolist(), bins=bins, alpha=0.6, label=f"rejected (mean {r_rejected.mean():.2f})")
    ax.set_xlabel("reward r(x, y)")
    ax.set_ylabel("number of responses")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Normalisation on the SFT model's own responses


@torch.no_grad()
def sft_responses(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0,
                  seed: int | None = None, batch_size: int = 64) -> list[list[int]]:
    """The token ids of the model's response to each prompt (greedy by default), cut before the first eos.
    Ids, not text: decoding and encoding again need not give back the tokens the model chose."""
    model.eval()
    device = next(model.parameters()).device
    responses = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad([tokenizer.encode(p) for p in prompts[start : start + batch_size]],
                             tokenizer.pad_token_id)
        out = model.generate(ids.to(device), max_new_tokens, temperature=temperature, attention_mask=mask.to(device),
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seed=seed)
        for row in out[:, ids.size(1) :].tolist():
            responses.append(row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
    return responses


def reference_batches(tokenizer, prompts: list[str], responses: list[list[int]], block_size: int,
                      batch_size: int = 64):
    """[(idx (B, T), attention_mask (B, T)), ...] of prompt + response ids + eos, fitted as the pairs are."""
    rows = [fit_context(tokenizer.encode(p), r, tokenizer.eos_token_id, block_size, i)
            for i, (p, r) in enumerate(zip(prompts, responses))]
    return [pad_right(rows[start : start + batch_size], tokenizer.pad_token_id)
            for start in range(0, len(rows), batch_size)]


@torch.no_grad()
def normalize(rm, reference_batches) -> dict:
    """Set gain = 1 / std and bias = -mean / std of the head's outputs on the reference batches, so that their
    rewards have mean 0 and (population) std 1. Returns the raw {"mean", "std", "n"}."""
    rm.eval()
    device = rm.gain.device
    raw = torch.cat([rm.score(idx.to(device), mask.to(device)).float() for idx, mask in reference_batches])  # (N,)
    if raw.numel() < 2:
        raise ValueError(f"normalisation needs at least 2 reference responses, got {raw.numel()}")
    mean, std = raw.mean().item(), raw.std(correction=0).item()
    if not std > 1e-8:
        raise ValueError(f"the reference rewards all equal {mean:.6g} (std {std:.3g}); cannot scale them to std 1")
    rm.gain.fill_(1.0 / std)
    rm.bias.fill_(-mean / std)
    return {"mean": mean, "std": std, "n": raw.numel()}


def normalize_on_sft(rm, sft_model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                     temperature: float = 0.0, seed: int | None = None) -> dict:
    """Generate the SFT model's responses to prompts, then normalize the reward model on them."""
    responses = sft_responses(sft_model, tokenizer, prompts, max_new_tokens, temperature, seed)
    return normalize(rm, reference_batches(tokenizer, prompts, responses, rm.block_size))


# ----------------------------------------------------------------------------------------------------------
# Saving and loading


def can_merge(gpt) -> bool:
    config = getattr(gpt, "peft_config", None)
    return config is not None and hasattr(peft.METHODS[type(config)], "merge")


def save_reward_model(rm: RewardModel, tokenizer, path) -> None:
    """Write the reward model atomically. A LoRA or IA3 backbone is saved merged, as a plain GPT; any other PEFT
    method is saved as the whole patched state plus its config, and load_reward_model applies the method again."""
    config = getattr(rm.backbone, "peft_config", None)
    if can_merge(rm.backbone):
        rm, config = copy.deepcopy(rm), None
        peft.merge_and_unload(rm.backbone)
    method = None if config is None else {"method": config.method, "config": dataclasses.asdict(config)}
    save_checkpoint(path, {"model": {k: v.cpu() for k, v in rm.state_dict().items()},
                           "model_config": rm.backbone.config.to_dict(), "tokenizer": tokenizer.to_dict(),
                           "stage": "reward", "reward_model": True, "peft": method})


def load_reward_model(path, map_location="cpu"):
    """(reward model in eval mode, tokenizer) from save_reward_model's file (loaded with weights_only=True)."""
    ckpt = load_checkpoint(path, map_location)
    if not ckpt.get("reward_model"):
        raise ValueError(f"{path} is not a reward-model checkpoint (stage {ckpt.get('stage')!r}); "
                         f"write one with python -m rlhf.reward_model")
    backbone = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    if ckpt.get("peft"):
        peft.get_peft_model(backbone, peft.CONFIGS[ckpt["peft"]["method"]](**ckpt["peft"]["config"]))
    rm = RewardModel(backbone)
    rm.load_state_dict(ckpt["model"])
    return rm.eval(), tokenizer_from_dict(ckpt["tokenizer"])


# ----------------------------------------------------------------------------------------------------------
# Training through the one loop


def make_reward_model(sft_model: GPT, peft_config=None) -> RewardModel:
    """A reward model whose backbone is a copy of the SFT model (an SFT adapter merged in when it can be), trained
    fully, or through peft_config (the value head always trains)."""
    backbone = copy.deepcopy(sft_model)
    if can_merge(backbone):
        peft.merge_and_unload(backbone)
    carried = getattr(backbone, "peft_config", None)
    if carried is not None and peft_config is not None:
        raise ValueError(f"the SFT model carries a {carried.method!r} adapter that cannot be merged, so a "
                         f"{peft_config.method!r} adapter cannot go on top; train the reward model fully instead")
    for p in backbone.parameters():
        p.requires_grad_(True)
    if peft_config is not None:
        peft.get_peft_model(backbone, peft_config)
    rm = RewardModel(backbone)  # after patching: disables the method's dropout too
    return rm


def train_reward_model(rm: RewardModel, tokenizer, train_pairs, test_pairs, cfg: TrainConfig,
                       center_coef: float = 0.0, eval_pairs: int = 200) -> list[dict]:
    """Train rm in place with minigpt.train.train on the pairs; evaluates on the first eval_pairs test pairs."""
    rm.backbone.check_tokenizer(tokenizer)
    if getattr(rm.backbone, "peft_config", None) is not None:
        cfg = dataclasses.replace(cfg, save_trainable_only=True)
    train_set = encode_pairs(tokenizer, train_pairs, rm.block_size)
    test_set = encode_pairs(tokenizer, test_pairs[:eval_pairs], rm.block_size)
    kinds = [p.get("kind") for p in test_pairs[:eval_pairs]]
    pad = tokenizer.pad_token_id

    def get_batch(generator):
        return random_pairs(train_set, cfg.batch_size, pad, generator)

    def loss_fn(m, batch):
        return pair_loss(m, batch, center_coef)[0]

    def evaluate(m):  # the accuracy of each kind of pair too, as flat "accuracy_<kind>" entries of the row
        metrics = pair_metrics(*score_pairs(m, test_set, pad), kinds=None if None in kinds else kinds)
        by_kind = metrics.pop("accuracy_by_kind", {})
        return metrics | {f"accuracy_{k}": v for k, v in by_kind.items()}

    method = getattr(rm.backbone, "peft_config", None)
    meta = {"model_config": rm.backbone.config.to_dict(), "tokenizer": tokenizer.to_dict(), "stage": "reward",
            "reward_model": True, "method": "full" if method is None else method.method}
    return train(rm, get_batch, loss_fn, cfg, evaluate, meta=meta)


# ----------------------------------------------------------------------------------------------------------
# CLI


LORA_ABOVE = 20_000_000  # parameters: by default a larger backbone trains through LoRA, a smaller one fully


def load_sft(path):
    """(model, tokenizer): a directory written by peft.train.save_finetuned, or a .pt checkpoint."""
    from peft.train import load_base, load_finetuned

    path = Path(path)
    if path.is_dir():
        return load_finetuned(path)
    if path.is_file():
        return load_base(path)
    raise SystemExit(f"SFT model {str(path)!r} not found; fine-tune one first: python -m peft.train --method full")


def build_parser() -> argparse.ArgumentParser:
    from peft.train import METHOD_FLAGS

    p = argparse.ArgumentParser(prog="python -m rlhf.reward_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="out/sft/full", help="SFT model: a peft.train output directory or a .pt file")
    p.add_argument("--peft", nargs="?", const="lora", default="auto", choices=["auto", "full", *sorted(peft.CONFIGS)],
                   help="train the backbone through this PEFT method (lora when the flag has no value), or 'full' "
                        f"for all weights; default 'auto': all weights up to {LORA_ABOVE:,} parameters, LoRA above")
    p.add_argument("--out-dir", default="out/reward")
    p.add_argument("--train-file", help="JSONL with prompt, chosen, rejected (default: the built-in pairs)")
    p.add_argument("--test-file", help="JSONL of held-out pairs (default: the built-in held-out pairs, or the last "
                                       "--eval-pairs pairs of --train-file, then left out of training)")
    p.add_argument("--n-pairs", type=int, default=20_000,
                   help="built-in training pairs (default 20000; unused with --train-file)")
    p.add_argument("--eval-pairs", type=int, default=200, help="held-out pairs scored at each evaluation")
    p.add_argument("--center-coef", type=float, default=0.0, help="coefficient of the (r_c + r_r)^2 centring term")
    p.add_argument("--n-normalize", type=int, default=100, help="held-out PPO prompts used to normalise (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="length of the SFT responses for normalisation")
    g = p.add_argument_group("PEFT method options (used by the methods that have them)")
    for name, typ in METHOD_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ)
    g = p.add_argument_group("training")
    g.add_argument("--max-iters", type=int, default=300)
    g.add_argument("--batch-size", type=int, default=32, help="pairs per batch (2x sequences)")
    g.add_argument("--lr", type=float, default=None, help="default: 1e-3 for all weights, 1e-2 for PEFT")
    g.add_argument("--warmup-iters", type=int, default=20)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--device", default="auto")
    g.add_argument("--no-progress", action="store_true")
    return p


def load_data(args) -> tuple[list[dict], list[dict]]:
    if args.train_file:
        train_pairs = read_pairs(args.train_file)
        if args.test_file:
            return train_pairs, read_pairs(args.test_file)
        if len(train_pairs) <= args.eval_pairs:
            raise SystemExit(f"{args.train_file} has {len(train_pairs)} pairs: too few to hold out --eval-pairs "
                             f"{args.eval_pairs} for testing; give --test-file or lower --eval-pairs")
        return train_pairs[: -args.eval_pairs], train_pairs[-args.eval_pairs:]  # the last ones held out
    return tasks.preference_pairs(n_train=args.n_pairs)


def main(argv=None) -> dict:
    from peft.train import METHOD_FLAGS, method_config

    args = build_parser().parse_args(argv)
    out_dir = Path(args.out_dir)
    sft_model, tokenizer = load_sft(args.sft)
    method = args.peft
    if method == "auto":  # a GPT-2-sized backbone trains through LoRA, the course's small models fully
        method = "lora" if sft_model.num_parameters() > LORA_ABOVE else "full"
    flags = {k: getattr(args, k) for k in METHOD_FLAGS}
    config = None if method == "full" else method_config(method, **flags)
    train_pairs, test_pairs = load_data(args)
    torch.manual_seed(args.seed)
    rm = make_reward_model(sft_model, config)
    lr = args.lr or (1e-3 if config is None else 1e-2)
    cfg = TrainConfig(max_iters=args.max_iters, batch_size=args.batch_size, lr=lr, min_lr=lr / 10,
                      warmup_iters=args.warmup_iters, weight_decay=args.weight_decay, eval_interval=args.eval_interval,
                      eval_iters=1, out_dir=str(out_dir), seed=args.seed, device=args.device,
                      progress=not args.no_progress)
    rows = train_reward_model(rm, tokenizer, train_pairs, test_pairs, cfg, args.center_coef, args.eval_pairs)

    results = {"method": "full" if config is None else config.method, "iters": rows[-1]["iter"] + 1,
               "train_s": rows[-1]["elapsed_s"], "held_out_pairs": len(test_pairs)}
    results["trainable_params"], results["total_params"] = peft.count_parameters(rm)
    if args.n_normalize > 0:  # first, so that the metrics below describe the saved, normalised model
        prompts = [ex["prompt"] for ex in tasks.ppo_prompts(n_train=0, n_test=args.n_normalize)[1]]
        results["normalization"] = normalize_on_sft(rm, sft_model.to(rm.gain.device), tokenizer, prompts,
                                                    args.max_new_tokens)
    r_c, r_r, margin = score_pairs(rm, encode_pairs(tokenizer, test_pairs, rm.block_size), tokenizer.pad_token_id)
    results.update(pair_metrics(r_c, r_r, margin, [p.get("kind", "all") for p in test_pairs]))
    if not args.train_file:  # the built-in set's blind spots (tasks.probe_pairs), kinds it never trains on
        probes = tasks.probe_pairs()
        p_c, p_r, _ = score_pairs(rm, encode_pairs(tokenizer, probes, rm.block_size), tokenizer.pad_token_id)
        results["probe_accuracy"] = pair_metrics(p_c, p_r, kinds=[p["kind"] for p in probes])["accuracy_by_kind"]
    plot_reward_histogram(r_c, r_r, out_dir / "reward_hist.png",
                          f"Held-out rewards: accuracy {results['accuracy']:.1%} on {len(test_pairs)} pairs")
    save_reward_model(rm, tokenizer, out_dir / "reward.pt")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    by_kind = ", ".join(f"{k} {v:.1%}" for k, v in results["accuracy_by_kind"].items())
    print(f"reward model ({results['method']}): held-out pairwise accuracy {results['accuracy']:.1%} ({by_kind}), "
          f"mean margin {results['mean_margin']:.3f}, {results['iters']} iterations in {results['train_s']:.1f} s; "
          f"saved {out_dir / 'reward.pt'}")
    if "probe_accuracy" in results:
        print("probes, kinds left out of the set: " + ", ".join(f"{k} {v:.1%}"
                                                               for k, v in results["probe_accuracy"].items()))
    return results


if __name__ == "__main__":
    main()
