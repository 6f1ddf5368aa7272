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
left out of the set because a small reward model cannot learn them (``probe_accuracy``): ``near_miss`` needs the
task solved, ``list_edit`` a word-by-word copy check.

The data (pairs as token ids) is in rlhf.preferences; the stage, ``run_reward(RewardConfig(...), TrainConfig(...))``,
and its command line ``python -m rlhf.reward_model --sft out/sft/full --out-dir out/reward`` are at the bottom.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import peft
from minigpt import GPT, checkpoint, engine, tasks
from minigpt.data import by_length
from minigpt.files import write_json
from minigpt.model import disable_dropout
from minigpt.options import HelpFormatter, add_options, from_args, option, parse, run
from minigpt.runs import claim
from minigpt.train import TrainConfig, train, train_config_from
from rlhf.plots import plot_reward_histogram
from rlhf.preferences import collate_pairs, encode_pairs, fit_context, pad_right, random_pairs, read_pairs

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
# Scoring pairs


def pair_rewards(rm, batch: dict):
    """Rewards (2B,) of a collate_pairs batch, the same as rm(idx, attention_mask), in forward passes over rows of
    similar length, each cut after its longest row (minigpt.data.by_length): the rows are right-padded."""
    mask = batch["attention_mask"]  # (2B, T): the real tokens of a row come first
    return by_length(rm, mask.sum(-1), batch["idx"], mask)


def pair_loss(rm, batch: dict, center_coef: float = 0.0):
    """(loss, accuracy) of a collate_pairs batch: both halves scored together (pair_rewards)."""
    rewards = pair_rewards(rm, batch).float()  # (2B,)
    B = batch["margin"].size(0)
    return bradley_terry_loss(rewards[:B], rewards[B:], batch["margin"], center_coef)


@torch.no_grad()
def score_pairs(rm, encoded, pad_token_id: int, batch_size: int = 64):
    """(r_chosen, r_rejected, margin), each (N,), for the encoded pairs."""
    rm.eval()
    device = rm.gain.device
    chosen, rejected, margins = [], [], []
    for start in range(0, len(encoded), batch_size):
        batch = collate_pairs(encoded[start : start + batch_size], pad_token_id)
        rewards = pair_rewards(rm, {k: v.to(device) for k, v in batch.items()}).float().cpu()  # (2B,)
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


# ----------------------------------------------------------------------------------------------------------
# Normalisation on the policy's own samples


def reference_batches(tokenizer, prompts: list[str], responses: list[list[int]], block_size: int,
                      batch_size: int = 64):
    """[(idx (B, T), attention_mask (B, T)), ...] of prompt + response ids + eos, fitted as the pairs are."""
    rows = [fit_context(tokenizer.encode(p), r, tokenizer.eos_token_id, block_size, i)
            for i, (p, r) in enumerate(zip(prompts, responses))]
    return [pad_right(rows[start : start + batch_size], tokenizer.pad_token_id)
            for start in range(0, len(rows), batch_size)]


@torch.no_grad()
def normalize(rm, reference_batches) -> dict:
    """Set gain = 1 / std and bias = -mean / std of the head's outputs on the reference batches (pairs of token ids
    and attention mask), so that their rewards have mean 0 and (population) std 1. Returns the raw {"mean", "std",
    "n"}."""
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


def normalize_on_samples(rm, policy, tokenizer, prompts: list[str], max_new_tokens: int = 24,
                         temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> dict:
    """Normalise rm on one response the policy samples to each prompt, drawn as PPO draws its rollouts (the
    engine at this temperature and length; a response cut off at max_new_tokens is scored without an eos, as PPO
    scores it), the way lm-human-preferences normalises on samples of the initial policy."""
    ids = [tokenizer.encode(p) for p in prompts]
    generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    batches = []
    for start in range(0, len(ids), batch_size):
        gen = engine.complete(policy, ids[start : start + batch_size], max_new_tokens, tokenizer.eos_token_id,
                              tokenizer.pad_token_id, temperature=temperature, generator=generator)
        batches.append((gen.tokens, gen.attention_mask))
    return normalize(rm, batches) | {"temperature": temperature, "max_new_tokens": max_new_tokens}


# ----------------------------------------------------------------------------------------------------------
# Saving and opening: a model folder (minigpt.checkpoint) of kind "reward"


def save_reward_model(rm: RewardModel, tokenizer, folder, template=None, made_from=None, settings=None) -> Path:
    """Write the reward model as a model folder. A LoRA or IA3 backbone is folded in, so the folder holds a plain
    GPT; any other PEFT method is saved as the whole patched state plus its config, applied again on loading."""
    if peft.can_merge(rm.backbone):
        rm = copy.deepcopy(rm)
        peft.merge_and_unload(rm.backbone)
    return checkpoint.save_model(folder, rm, tokenizer, "reward", template, made_from, settings)


def load_reward_model(path):
    """(reward model in eval mode and frozen, tokenizer) from a reward model's folder or checkpoint."""
    loaded = checkpoint.load(path, expect="reward")
    rm = RewardModel(loaded.model)  # the backbone's weights are loaded; the head's come from loaded.head
    missing, unexpected = rm.load_state_dict(loaded.head, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(f"{path}: the reward head does not fit (missing {missing}, unexpected {unexpected})")
    for p in rm.parameters():
        p.requires_grad_(False)
    return rm.eval(), loaded.tokenizer


# ----------------------------------------------------------------------------------------------------------
# Training through the one loop


def make_reward_model(sft_model: GPT, peft_config=None) -> RewardModel:
    """A reward model whose backbone is a copy of the SFT model (an SFT adapter merged in when it can be), trained
    fully, or through peft_config (the value head always trains)."""
    backbone = copy.deepcopy(sft_model)
    if peft.can_merge(backbone):
        peft.merge_and_unload(backbone)
    carried = getattr(backbone, "peft_config", None)
    if carried is not None and peft_config is not None:
        raise ValueError(f"the SFT model carries a {carried.method!r} adapter that cannot be merged, so a "
                         f"{peft_config.method!r} adapter cannot go on top; train the reward model fully instead")
    for p in backbone.parameters():
        p.requires_grad_(True)
    if peft_config is not None:
        peft.get_peft_model(backbone, peft_config)
    return RewardModel(backbone)  # after patching: disables the method's dropout too


def train_reward_model(rm: RewardModel, tokenizer, train_pairs, test_pairs, cfg: TrainConfig,
                       center_coef: float = 0.0, eval_pairs: int = 200, template=None, meta=None,
                       resume=None) -> list[dict]:
    """Train rm in place with minigpt.train.train on the pairs; evaluates on the first eval_pairs test pairs."""
    rm.backbone.check_tokenizer(tokenizer)
    if getattr(rm.backbone, "peft_config", None) is not None:
        cfg = dataclasses.replace(cfg, save_trainable_only=True)
    train_set = encode_pairs(tokenizer, train_pairs, rm.block_size, template)
    test_set = encode_pairs(tokenizer, test_pairs[:eval_pairs], rm.block_size, template)
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

    meta = meta or checkpoint.describe(rm, "reward", template)
    return train(rm, get_batch, loss_fn, cfg, evaluate, meta=dict(meta, tokenizer=tokenizer.to_dict()), resume=resume)


# ----------------------------------------------------------------------------------------------------------
# The stage and its command line


LORA_ABOVE = 20_000_000  # parameters: by default a larger backbone trains through LoRA, a smaller one fully


@dataclass
class RewardConfig:
    """What the reward model starts from and learns from (the optimisation is a TrainConfig)."""

    sft: str = option("out/sft/full", "the SFT model the reward model starts from: an SFT output folder (full or "
                      "PEFT) or any language model")
    peft: str = option("auto", "train the backbone through this PEFT method, or 'full' for all weights; 'auto': "
                       f"all weights up to {LORA_ABOVE:,} parameters, LoRA above")
    train_file: str | None = option(None, "JSONL with prompt, chosen, rejected (default: the built-in pairs)")
    test_file: str | None = option(None, "JSONL of held-out pairs (default: the built-in held-out pairs, or the "
                                   "last --eval-pairs pairs of --train-file, then left out of training)")
    n_pairs: int = option(20_000, "built-in training pairs (unused with --train-file)")
    eval_pairs: int = option(200, "held-out pairs scored at each evaluation")
    center_coef: float = option(0.0, "coefficient of the (r_c + r_r)^2 centring term")
    n_normalize: int = option(256, "responses the SFT model samples to the built-in PPO training prompts, to "
                              "normalise the rewards on (0: skip; PPO normalises again on its own samples)")
    max_new_tokens: int = option(24, "the longest of those responses, as PPO's max_new_tokens")
    temperature: float = option(1.0, "the temperature they are sampled at, as PPO's")

    def __post_init__(self):
        if self.peft not in ("auto", "full", *peft.CONFIGS):
            raise ValueError(f"peft must be auto, full or one of {sorted(peft.CONFIGS)}, got {self.peft!r}")


def reward_data(rcfg: RewardConfig) -> tuple[list[dict], list[dict]]:
    if rcfg.train_file:
        train_pairs = read_pairs(rcfg.train_file)
        if rcfg.test_file:
            return train_pairs, read_pairs(rcfg.test_file)
        if len(train_pairs) <= rcfg.eval_pairs:
            raise ValueError(f"{rcfg.train_file} has {len(train_pairs)} pairs: too few to hold out --eval-pairs "
                             f"{rcfg.eval_pairs} for testing; give --test-file or lower --eval-pairs")
        return train_pairs[: -rcfg.eval_pairs], train_pairs[-rcfg.eval_pairs:]  # the last ones held out
    return tasks.preference_pairs(n_train=rcfg.n_pairs)


def run_reward(rcfg: RewardConfig, cfg: TrainConfig, peft_config=None) -> dict:
    """Train a reward model from rcfg.sft, normalise it, score the held-out pairs (and the probes of the built-in
    set) and write its folder, histogram and results.json to cfg.out_dir. peft_config: the method for rcfg.peft
    (None: all weights). cfg.resume continues the run in cfg.out_dir; another run there is refused unless
    cfg.overwrite."""
    with claim(cfg.out_dir, cfg.resume, cfg.overwrite):
        return _run_reward(rcfg, cfg, peft_config)


def _run_reward(rcfg: RewardConfig, cfg: TrainConfig, peft_config) -> dict:
    from minigpt.sft import check_same_settings
    loaded = checkpoint.load(rcfg.sft, expect="gpt")
    sft_model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.info.get("template")
    train_pairs, test_pairs = reward_data(rcfg)
    torch.manual_seed(cfg.seed)
    rm = make_reward_model(sft_model, peft_config)
    out = Path(cfg.out_dir)
    made_from = {"sft": str(rcfg.sft), "data": rcfg.train_file or f"built-in preference pairs ({rcfg.n_pairs:,})"}
    settings = {"reward": dataclasses.asdict(rcfg), "train": dataclasses.asdict(cfg)}
    state = checkpoint.load_resume_checkpoint(out) if cfg.resume else None
    if state is not None:
        check_same_settings(state, settings, out, ("reward",))
    meta = checkpoint.describe(rm, "reward", template, made_from, settings)
    rows = train_reward_model(rm, tokenizer, train_pairs, test_pairs, cfg, rcfg.center_coef, rcfg.eval_pairs,
                              template, meta, state)
    results = {"method": "full" if peft_config is None else peft_config.method, "iters": rows[-1]["iter"] + 1,
               "train_s": rows[-1]["elapsed_s"], "held_out_pairs": len(test_pairs)}
    results["trainable_params"], results["total_params"] = peft.count_parameters(rm)
    if rcfg.n_normalize > 0:  # first, so that the metrics below describe the saved, normalised model
        train_prompts = tasks.ppo_prompts(n_train=rcfg.n_normalize, n_test=0)[0]  # never an evaluation prompt
        results["normalization"] = normalize_on_samples(rm, sft_model.to(rm.gain.device), tokenizer,
                                                        [ex["prompt"] for ex in train_prompts], rcfg.max_new_tokens,
                                                        rcfg.temperature, seed=cfg.seed)
    encoded = encode_pairs(tokenizer, test_pairs, rm.block_size, template)
    r_c, r_r, margin = score_pairs(rm, encoded, tokenizer.pad_token_id)
    results.update(pair_metrics(r_c, r_r, margin, [p.get("kind", "all") for p in test_pairs]))
    if not rcfg.train_file:  # the built-in set's blind spots (tasks.probe_pairs), kinds it never trains on
        probes = tasks.probe_pairs()
        p_c, p_r, _ = score_pairs(rm, encode_pairs(tokenizer, probes, rm.block_size), tokenizer.pad_token_id)
        results["probe_accuracy"] = pair_metrics(p_c, p_r, kinds=[p["kind"] for p in probes])["accuracy_by_kind"]
    plot_reward_histogram(r_c, r_r, out / "reward_hist.png",
                          f"Held-out rewards: accuracy {results['accuracy']:.1%} on {len(test_pairs)} pairs")
    save_reward_model(rm.cpu(), tokenizer, out, template, made_from, settings)
    write_json(out / "results.json", results)
    return results


def build_parser() -> argparse.ArgumentParser:
    from peft.train import add_method_options

    p = argparse.ArgumentParser(prog="python -m rlhf.reward_model", description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("what the reward model starts from and learns from")
    add_options(g, RewardConfig, skip=("peft",))
    g.add_argument("--peft", nargs="?", const="lora", default="auto", choices=["auto", "full", *sorted(peft.CONFIGS)],
                   help="train the backbone through this PEFT method (lora when the flag has no value), or 'full' "
                        f"for all weights; 'auto': all weights up to {LORA_ABOVE:,} parameters, LoRA above")
    add_method_options(p.add_argument_group("PEFT method options (with --peft)"))
    add_options(p.add_argument_group("training (--lr by default: 1e-3 for all weights, 1e-2 for PEFT; --min-lr lr / "
                                     "10)"), TrainConfig, skip=("save_trainable_only",),
                defaults={"max_iters": 300, "batch_size": 32, "lr": None, "min_lr": None, "warmup_iters": 20,
                          "weight_decay": 0.0, "eval_interval": 100, "eval_iters": 1, "out_dir": "out/reward"})
    return p


def main(argv=None) -> dict:
    from minigpt.sft import method_config
    from peft.train import given_method_options

    parser = build_parser()
    args = parse(parser, argv)
    rcfg = from_args(RewardConfig, args)
    method = rcfg.peft
    if method == "auto":  # a GPT-2-sized backbone trains through LoRA, the course's small models fully
        n_params = checkpoint.load(rcfg.sft, expect="gpt").model.num_parameters()
        method = "lora" if n_params > LORA_ABOVE else "full"
    try:
        config = method_config(method, **given_method_options(args))
    except ValueError as e:
        parser.error(str(e))
    lr = args.lr or (1e-3 if config is None else 1e-2)
    cfg = train_config_from(parser, args, lr=lr, min_lr=args.min_lr if args.min_lr is not None else lr / 10)
    results = run_reward(rcfg, cfg, config)
    by_kind = ", ".join(f"{k} {v:.1%}" for k, v in results["accuracy_by_kind"].items())
    print(f"reward model ({results['method']}): held-out pairwise accuracy {results['accuracy']:.1%} ({by_kind}), "
          f"mean margin {results['mean_margin']:.3f}, {results['iters']} iterations in {results['train_s']:.1f} s; "
          f"saved in {cfg.out_dir}")
    if "probe_accuracy" in results:
        print("probes, kinds left out of the set: " + ", ".join(f"{k} {v:.1%}"
                                                               for k, v in results["probe_accuracy"].items()))
    return results


if __name__ == "__main__":
    run(main)
