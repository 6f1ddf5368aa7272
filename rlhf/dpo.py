"""DPO: Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", eq. 7), trained through the one training loop.

The KL-regularised RL objective that PPO maximises has a closed-form optimum, pi*(y|x) = pi_ref(y|x) exp(r(x, y) /
beta) / Z(x). Read backwards, a policy defines an implicit reward r(x, y) = beta log(pi(y|x) / pi_ref(y|x)) (+ beta
log Z(x), the same for both responses of a pair), and the Bradley-Terry likelihood of the preferences in terms of that
reward is the loss; no reward model, no sampling:

    L = -log sigmoid( beta [ (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x)) ] )

where log pi(y|x) is the sum of the log-probabilities of the response's tokens (its eos included) after the prompt,
the prompt itself masked out. pi_ref is the SFT model; its log-probabilities of every pair are computed once, before
training. Logged as trl logs them: rewards/chosen and rewards/rejected (the implicit rewards beta (log pi - log
pi_ref)), their accuracy (chosen above rejected) and margin, and the log-likelihoods logps/chosen and logps/rejected,
so a learner sees that both can fall while the margin grows.

Two sources of pairs: preference pairs (the built-in ones, or a JSONL file of prompt, chosen, rejected), and
on-policy pairs: k responses sampled from the SFT model for each prompt, scored by the world's checker, the best over
the worst where their scores differ (a correct answer over a wrong one).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minigpt import checkpoint, engine, tasks
from minigpt.data import by_length, labelled_lengths
from minigpt.files import write_json
from minigpt.options import HelpFormatter, add_options, from_args, option, parse
from minigpt.options import run as run_cli
from minigpt.runs import claim
from minigpt.train import TrainConfig, train, train_config_from
from rlhf.plots import plot_metrics
from rlhf.policy import RLRun, open_policy, reference_of, rl_peft_config, save_policy

SOURCES = ("builtin", "on_policy", "file")


@dataclass
class DPOConfig:
    beta: float = option(0.1, "beta: how far the policy may move from the reference (the paper and trl: 0.1)")
    pairs: str = option("builtin", "builtin: the built-in preference pairs; on_policy: SFT samples ordered by the "
                        "checker; file: --train-file", choices=SOURCES)
    train_file: str | None = option(None, "JSONL of prompt, chosen, rejected (with --pairs file)")
    n_pairs: int = option(4000, "built-in training pairs")
    eval_pairs: int = option(200, "held-out pairs scored at each evaluation")
    on_policy_prompts: int = option(480, "on-policy pairs: prompts to sample for")
    samples_per_prompt: int = option(4, "on-policy pairs: responses sampled per prompt")
    max_new_tokens: int = option(24, "on-policy pairs: the longest sampled response")
    temperature: float = option(1.0, "on-policy pairs: the sampling temperature")

    def __post_init__(self):
        if self.pairs not in SOURCES:
            raise ValueError(f"pairs must be one of {SOURCES}, got {self.pairs!r}")
        if self.pairs == "file" and not self.train_file:
            raise ValueError("pairs 'file' needs --train-file")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 to make a pair, got {self.samples_per_prompt}")


# -- the loss --------------------------------------------------------------------------------------------------


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    """(loss, metrics) from summed response log-probabilities (B,) under the policy and the reference."""
    reward_c = beta * (pi_chosen - ref_chosen)  # the implicit rewards
    reward_r = beta * (pi_rejected - ref_rejected)
    loss = -F.logsigmoid(reward_c - reward_r).mean()
    reward_c, reward_r = reward_c.detach(), reward_r.detach()
    return loss, {"rewards_chosen": reward_c.mean(), "rewards_rejected": reward_r.mean(),
                  "rewards_accuracy": (reward_c > reward_r).float().mean(),
                  "rewards_margin": (reward_c - reward_r).mean(),
                  "logps_chosen": pi_chosen.detach().mean(), "logps_rejected": pi_rejected.detach().mean()}


def sequence_logprobs(model, idx, labels):
    """Sum over each row of log p(label_t | tokens before it) where label_t != -100: (B,). idx, labels (B, T):
    labels are the next tokens (-100 on the prompt and on padding). The rows are right-padded, so they go through
    the model in groups of similar length, each cut after its longest row (minigpt.data.by_length)."""

    def row_logprobs(idx, labels):  # (rows,)
        logits, _ = model(idx)  # (rows, T, vocab)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (logp * (labels != -100)).sum(-1)

    return by_length(row_logprobs, labelled_lengths(labels), idx, labels)


# -- the data: pairs of token ids ------------------------------------------------------------------------------


def encode_pair(prompt_ids, chosen_ids, rejected_ids, block_size: int, index: int = 0):
    """(chosen tokens, chosen labels, rejected tokens, rejected labels): prompt + response, the labels -100 on the
    prompt. The prompt is cut from the left when a sequence would not fit; a response that alone does not fit is
    refused, naming the pair."""
    out = []
    for response in (chosen_ids, rejected_ids):
        if len(response) >= block_size:
            raise ValueError(f"pair {index}: a response of {len(response)} tokens does not fit the context of "
                             f"{block_size} tokens")
        prompt = prompt_ids[-(block_size + 1 - len(response)):]
        tokens = list(prompt) + list(response)
        out += [tokens[:-1], [-100] * (len(prompt) - 1) + list(response)]
    return tuple(out)


def encode_text_pairs(tokenizer, pairs, block_size: int, template=None):
    """Preference pairs of text ({"prompt", "chosen", "rejected"}) as token ids, each response followed by eos."""
    eos = tokenizer.eos_token_id
    encoded = []
    for i, p in enumerate(pairs):
        prompt = tasks.format_prompt(p["prompt"], template=template) if template else p["prompt"]
        encoded.append(encode_pair(tokenizer.encode(prompt), tokenizer.encode(p["chosen"]) + [eos],
                                   tokenizer.encode(p["rejected"]) + [eos], block_size, i))
    return encoded


def collate(encoded, pad_token_id: int, ref=None):
    """One right-padded batch of 2B rows (the B chosen, then the B rejected): {"idx", "labels"} (2B, T), and the
    reference's log-probabilities {"ref"} (2B,) when given (ref: (chosen (N,), rejected (N,)) for these rows)."""
    rows = [(e[0], e[1]) for e in encoded] + [(e[2], e[3]) for e in encoded]
    T = max(len(t) for t, _ in rows)
    idx = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, (t, lab) in enumerate(rows):
        idx[b, : len(t)] = torch.tensor(t)
        labels[b, : len(lab)] = torch.tensor(lab)
    batch = {"idx": idx, "labels": labels}
    if ref is not None:
        batch["ref"] = torch.cat(ref)
    return batch


@torch.no_grad()
def reference_logprobs(model, encoded, pad_token_id: int, reference=None, batch_size: int = 64):
    """The reference's summed log-probabilities of every pair, once: (chosen (N,), rejected (N,)). reference None:
    the model with its adapters disabled."""
    was_training = model.training
    chosen, rejected = [], []
    with reference_of(model, reference) as ref:
        ref.eval()
        device = next(ref.parameters()).device
        for start in range(0, len(encoded), batch_size):
            b = collate(encoded[start : start + batch_size], pad_token_id)
            lp = sequence_logprobs(ref, b["idx"].to(device), b["labels"].to(device)).cpu()
            n = lp.size(0) // 2
            chosen.append(lp[:n])
            rejected.append(lp[n:])
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def on_policy_pairs(model, tokenizer, examples, k: int, max_new_tokens: int, temperature: float, seed: int = 0,
                    batch_size: int = 64):
    """(pairs of token ids (prompt, chosen, rejected), stats): k samples of the model per example, scored by
    tasks.ground_truth_score; the best over the worst wherever they differ (ties: the first sampled). Responses keep
    the tokens sampled (their eos, when they ended)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    rows = [ex for ex in examples for _ in range(k)]
    prompts = [tokenizer.encode(ex["prompt"]) for ex in rows]
    responses, scores = [], []
    for start in range(0, len(rows), batch_size):
        gen = engine.complete(model, prompts[start : start + batch_size], max_new_tokens, tokenizer.eos_token_id,
                              tokenizer.pad_token_id, temperature=temperature, generator=generator)
        for r, eos in zip(gen.responses(), gen.has_eos.tolist()):
            responses.append(r + ([tokenizer.eos_token_id] if eos else []))
            scores.append(tasks.ground_truth_score(rows[len(scores)], tokenizer.decode(r)))
    pairs = []
    for i in range(len(examples)):
        s, r = scores[i * k : (i + 1) * k], responses[i * k : (i + 1) * k]
        best, worst = max(range(k), key=lambda j: s[j]), min(range(k), key=lambda j: s[j])
        if s[best] > s[worst]:
            pairs.append((prompts[i * k], r[best], r[worst]))
    return pairs, {"prompts": len(examples), "samples": len(rows), "pairs": len(pairs),
                   "mean_score": sum(scores) / len(scores)}


# -- the stage and its command line ----------------------------------------------------------------------------


DPO_PANELS = [
    ("DPO loss", [("train_loss", "training batches"), ("val_loss", "held-out pairs")], "loss"),
    ("implicit rewards", [("train_rewards_chosen", "chosen"), ("train_rewards_rejected", "rejected")],
     "beta log(pi / pi_ref)"),
    ("reward accuracy and margin", [("train_rewards_accuracy", "accuracy"), ("train_rewards_margin", "margin")], ""),
    ("log-likelihoods", [("train_logps_chosen", "log pi(chosen)"), ("train_logps_rejected", "log pi(rejected)")],
     "nats per response"),
]


def dpo_data(dcfg: DPOConfig, pol, block_size: int, seed: int, prompts_file=None):
    """(training pairs of ids, held-out pairs of ids, a description): the source dcfg.pairs names; on-policy pairs
    are sampled for the prompts of prompts_file (with reference answers) or the built-in training prompts."""
    tokenizer, template = pol.tokenizer, pol.info.get("template")
    if dcfg.pairs == "on_policy":
        from rlhf.prompts import builtin_prompts, read_prompts

        train_ex = (read_prompts(prompts_file, template) if prompts_file else
                    builtin_prompts(n_train=dcfg.on_policy_prompts, n_test=0)[0])[: dcfg.on_policy_prompts]
        pairs, stats = on_policy_pairs(pol.model, tokenizer, train_ex, dcfg.samples_per_prompt, dcfg.max_new_tokens,
                                       dcfg.temperature, seed)
        if len(pairs) < 2:
            raise ValueError(f"only {len(pairs)} of {len(train_ex)} prompts got samples of different scores: no "
                             f"preferences to learn from; sample more (--samples-per-prompt) or a higher temperature")
        encoded = [encode_pair(p, c, r, block_size, i) for i, (p, c, r) in enumerate(pairs)]
        held = max(1, min(dcfg.eval_pairs, len(encoded) // 5))  # the last pairs held out for the loss curve
        return encoded[:-held], encoded[-held:], f"on-policy pairs: {stats}"
    if dcfg.pairs == "file":
        from rlhf.preferences import read_pairs

        pairs = read_pairs(dcfg.train_file)
        if len(pairs) <= dcfg.eval_pairs:
            raise ValueError(f"{dcfg.train_file} has {len(pairs)} pairs: too few to hold out --eval-pairs "
                             f"{dcfg.eval_pairs}")
        train_p, test_p, source = pairs[: -dcfg.eval_pairs], pairs[-dcfg.eval_pairs:], dcfg.train_file
    else:
        train_p, test_p = tasks.preference_pairs(n_train=dcfg.n_pairs)
        test_p, source = test_p[: dcfg.eval_pairs], f"built-in preference pairs ({dcfg.n_pairs:,})"
    return (encode_text_pairs(tokenizer, train_p, block_size, template),
            encode_text_pairs(tokenizer, test_p, block_size, template), source)


def run_dpo(run: RLRun, dcfg: DPOConfig, cfg: TrainConfig, peft_config=None) -> dict:
    """DPO from run.sft on the pairs dcfg names, through minigpt.train.train; the policy, metrics.jsonl, dpo.png and
    results.json go to cfg.out_dir, with the evaluation before and after when run.eval_prompts > 0. cfg.resume
    continues the run in cfg.out_dir; another run there is refused unless cfg.overwrite."""
    with claim(cfg.out_dir, cfg.resume, cfg.overwrite):
        return _run_dpo(run, dcfg, cfg, peft_config)


def _run_dpo(run: RLRun, dcfg: DPOConfig, cfg: TrainConfig, peft_config) -> dict:
    from minigpt.sft import check_same_settings
    from rlhf.evaluate import held_out

    pol = open_policy(run.sft, peft_config)
    model, tokenizer = pol.model, pol.tokenizer
    block = engine.context_window(model)
    train_set, test_set, source = dpo_data(dcfg, pol, block, cfg.seed, run.prompts)
    pad = tokenizer.pad_token_id
    ref_train = reference_logprobs(model, train_set, pad, pol.reference)
    ref_test = reference_logprobs(model, test_set, pad, pol.reference)
    results = {"pairs": source, "n_train_pairs": len(train_set)}
    evaluate = held_out(run, pol, max_new_tokens=dcfg.max_new_tokens)
    if evaluate:
        results["before"] = evaluate()

    def get_batch(generator):
        ix = torch.randint(len(train_set), (cfg.batch_size,), generator=generator)
        return collate([train_set[i] for i in ix.tolist()], pad, (ref_train[0][ix], ref_train[1][ix]))

    def loss_fn(m, batch):
        lp = sequence_logprobs(m, batch["idx"], batch["labels"])
        n = lp.size(0) // 2
        return dpo_loss(lp[:n], lp[n:], batch["ref"][:n], batch["ref"][n:], dcfg.beta)

    @torch.no_grad()
    def evaluation(m):
        m.eval()
        device = next(m.parameters()).device
        b = collate(test_set, pad, ref_test)
        lp = sequence_logprobs(m, b["idx"].to(device), b["labels"].to(device))
        n = lp.size(0) // 2
        ref = b["ref"].to(device)
        loss, metrics = dpo_loss(lp[:n], lp[n:], ref[:n], ref[n:], dcfg.beta)
        return {"val_loss": loss.item(), **{f"val_{k}": v.item() for k, v in metrics.items()}}

    made_from = {"sft": run.sft, "pairs": source}
    settings = {"dpo": dataclasses.asdict(dcfg), "train": dataclasses.asdict(cfg), "run": dataclasses.asdict(run)}
    if getattr(model, "peft_config", None) is not None:
        cfg = dataclasses.replace(cfg, save_trainable_only=True)
    state = checkpoint.load_resume_checkpoint(cfg.out_dir) if cfg.resume else None
    if state is not None:
        check_same_settings(state, settings, cfg.out_dir, ("dpo",))
    meta = checkpoint.describe(model, "dpo", pol.info.get("template"), made_from, settings)
    rows = train(model, get_batch, loss_fn, cfg, evaluation, meta=dict(meta, tokenizer=tokenizer.to_dict()),
                 resume=state)
    if evaluate:
        results["after"] = evaluate()
    out_dir = Path(cfg.out_dir)
    plot_metrics([dict(r, step=r["iter"]) for r in rows], out_dir / "dpo.png", DPO_PANELS,
                 f"DPO ({dcfg.pairs} pairs, beta = {dcfg.beta:g})", "iteration")
    save_policy(out_dir, pol, "dpo", made_from, settings)
    results.update(first_row=rows[0], last_row=rows[-1])
    write_json(out_dir / "results.json", results)
    results["rows"] = rows
    return results


DPO_TRAIN_DEFAULTS = {"max_iters": 200, "batch_size": 16, "lr": 1e-5, "min_lr": 1e-6, "warmup_iters": 10,
                      "weight_decay": 0.0, "eval_interval": 50, "eval_iters": 1, "log_interval": 5,
                      "out_dir": "out/dpo"}


def build_parser() -> argparse.ArgumentParser:
    from peft.train import add_method_options

    p = argparse.ArgumentParser(prog="python -m rlhf.dpo", description="DPO on a policy (the SFT model) from "
                                "preference pairs: python -m rlhf.dpo --sft out/sft/full --pairs on_policy",
                                formatter_class=HelpFormatter)
    add_options(p.add_argument_group("what DPO starts from"), RLRun, skip=("reward", "out_dir", "resume", "overwrite"))
    add_options(p.add_argument_group("DPO"), DPOConfig)
    add_method_options(p.add_argument_group("PEFT method options (with --peft)"))
    add_options(p.add_argument_group("training (--batch-size counts pairs)"), TrainConfig,
                defaults=DPO_TRAIN_DEFAULTS, skip=("save_trainable_only", "progress"))
    return p


def main(argv=None) -> dict:
    from peft.train import given_method_options

    parser = build_parser()
    args = parse(parser, argv)
    try:
        run = from_args(RLRun, args, out_dir=args.out_dir)
        peft_config = rl_peft_config(run.peft, given_method_options(args))
        dcfg = from_args(DPOConfig, args)
        cfg = train_config_from(parser, args, progress=run.progress)
    except ValueError as e:
        parser.error(str(e))
    results = run_dpo(run, dcfg, cfg, peft_config)
    last = results["last_row"]
    print(f"DPO ({dcfg.pairs} pairs, {results['n_train_pairs']} to train on): held-out loss "
          f"{results['first_row']['val_loss']:.3f} -> {last['val_loss']:.3f}, reward accuracy "
          f"{last['val_rewards_accuracy']:.1%}; policy saved in {cfg.out_dir}, plot {cfg.out_dir}/dpo.png")
    return results


if __name__ == "__main__":
    run_cli(main)
