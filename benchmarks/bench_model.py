"""minigpt's model against transformers' GPT2LMHeadModel on the CPU, with the same weights, in one run.

    make bench          (sets up .venv-ref with tests/reference/setup.sh, then runs this with its python)

Four measurements, each reported as medians and a ratio:
  (a) training step: forward + cross-entropy + backward, minigpt vs transformers (goal: minigpt / HF <= 1.0);
  (b) KV cache: minigpt's generate with the cache vs without it, 256 new tokens (goal: >= 5x on 6/6/384);
  (c) generation, batch 1: greedy tokens/s of minigpt's generate vs transformers' generate, KV cache on both
      (goal: minigpt / HF >= 1.0);
  (d) batched generation as the RL rollouts run it: minigpt's engine.complete on 64 left-padded prompts of 8-40
      tokens against transformers' generate on the same padded batch, greedy, stopping rows at eos and filling
      them with pad on both sides (goal: minigpt / HF tokens/s >= 1.5);
  (e) with --trained PATH...: the same on models the project trained (make bench passes make demo's sft and ppo
      when they exist), with their tokenizer and the built-in PPO prompts, where most rows end early; the engine
      with DROP_FINISHED off is timed in the same rounds (goal as in (d)).
The two sides of a comparison are interleaved (ABAB..., who goes first alternating) so that load from other
processes falls on both alike. The markdown table goes to stdout and to benchmarks/results/model.md.

transformers lives only in .venv-ref, so this script runs with .venv-ref/bin/python and finds minigpt by adding
the repo root to the END of sys.path: Hugging Face's ``peft`` (installed there) must win over this repo's ``peft``
package, which nothing here imports (checked at the end).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after site-packages: see the module docstring
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally: never reach for the model hub

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, GPT2Config

from minigpt import GPT, engine

# nanoGPT's CPU "baby" run and its shakespeare-char model; vocabulary 65 (characters) unless --vocab says otherwise
SHAPES = {
    "baby 4/4/128": {"n_layer": 4, "n_head": 4, "n_embd": 128},
    "small 6/6/384": {"n_layer": 6, "n_head": 6, "n_embd": 384},
}


# ----------------------------------------------------------------------------------------------------------
# Models and timing


def make_pair(shape: dict, vocab_size: int, block_size: int, seed: int = 0):
    """The same random GPT-2 weights as a minigpt GPT and a transformers GPT2LMHeadModel (SDPA attention)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, **shape)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)  # GPT2LMHeadModel
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = GPT.from_pretrained(d)
    return ours, hf


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn (first one alternating) repeats times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    order = list(fns)
    for i in range(repeats):
        for name in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------------------------------------
# (a) training step


def bench_train(name, shape, args):
    """Forward + loss + backward on a (B, T) batch; the loss is computed the same way from both models' logits."""
    ours, hf = make_pair(shape, args.vocab, args.train_block)
    ours.train(), hf.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.train_block), generator=g)  # (B, T)
    y = torch.randint(0, args.vocab, (args.batch, args.train_block), generator=g)  # (B, T)

    def step(model, logits_of):
        model.zero_grad(set_to_none=True)
        logits = logits_of(model, x)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        return loss.item()

    def ours_logits(m, idx):
        return m(idx)[0]

    def hf_logits(m, idx):
        return m(idx).logits

    same = abs(step(ours, ours_logits) - step(hf, hf_logits)) < 1e-4  # same weights, same loss
    t = interleaved({"minigpt": lambda: step(ours, ours_logits), "hf": lambda: step(hf, hf_logits)},
                    args.repeats, warmup=2)
    return row(f"train step {name}, B={args.batch} T={args.train_block}", t["minigpt"], t["hf"],
               t["minigpt"] / t["hf"], "same loss" if same else "LOSS DIFFERS")


# ----------------------------------------------------------------------------------------------------------
# (b) KV cache and (c) generation


def prompt(args):
    return torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))  # (1, T)


def bench_cache(name, shape, args):
    """minigpt generate with and without its KV cache: speed-up = uncached time / cached time."""
    ours, _ = make_pair(shape, args.vocab, args.gen_block)
    ours.eval()
    idx = prompt(args)

    def run(use_cache):
        return ours.generate(idx, args.new_tokens, temperature=0, use_cache=use_cache)

    same = torch.equal(run(True), run(False))
    t = interleaved({"cached": lambda: run(True), "uncached": lambda: run(False)}, args.gen_repeats)
    return row(f"KV cache {name}, {args.new_tokens} new tokens", t["cached"], t["uncached"],
               t["uncached"] / t["cached"], "same tokens" if same else "tokens differ")


def bench_generate(name, shape, args):
    """Greedy tokens/s of minigpt's generate vs transformers' generate, both with their KV cache."""
    ours, hf = make_pair(shape, args.vocab, args.gen_block)
    ours.eval(), hf.eval()
    idx = prompt(args)
    n = args.new_tokens

    def run_ours():
        return ours.generate(idx, n, temperature=0, use_cache=True)

    def run_hf():
        return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False,
                           use_cache=True, pad_token_id=0, eos_token_id=None)

    same = torch.equal(run_ours(), run_hf())
    t = interleaved({"minigpt": run_ours, "hf": run_hf}, args.gen_repeats)
    speeds = f"{n / t['minigpt']:.0f} vs {n / t['hf']:.0f} tokens/s"
    return row(f"generate {name}, {n} new tokens", t["minigpt"], t["hf"], t["hf"] / t["minigpt"],
               speeds + (", same tokens" if same else ", tokens differ"))


def padded_prompts(args):
    """args.batch_prompts prompts of 8 to 40 random tokens (never pad or eos), as token id lists."""
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(8, 41, (args.batch_prompts,), generator=g).tolist()
    return [torch.randint(2, args.vocab, (n,), generator=g).tolist() for n in lengths]


def bench_batched(name, shape, args):
    """Greedy tokens/s on a left-padded batch: minigpt's engine.complete vs transformers' generate."""
    ours, hf = make_pair(shape, args.vocab, args.batch_block)
    ours.eval(), hf.eval()
    prompts, n, pad, eos = padded_prompts(args), args.batch_new_tokens, 0, 1
    ids, mask = engine.left_pad(prompts, pad)  # (B, P) each

    def run_ours():
        return engine.complete(ours, prompts, n, eos_token_id=eos, pad_token_id=pad).response

    def run_hf():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=True,
                          pad_token_id=pad, eos_token_id=eos)[:, ids.size(1) :]
        return F.pad(out, (0, n - out.size(1)), value=pad)  # HF stops once every row is done; ours too

    a, b = run_ours(), run_hf()
    same = a.shape == b.shape and torch.equal(a, b)
    t = interleaved({"minigpt": run_ours, "hf": run_hf}, args.gen_repeats)
    tokens = len(prompts) * n  # the work both sides are asked for (rows that stopped early included)
    speeds = f"{tokens / t['minigpt']:.0f} vs {tokens / t['hf']:.0f} tokens/s"
    return row(f"batched generate {name}, {len(prompts)} prompts x {n} new tokens", t["minigpt"], t["hf"],
               t["hf"] / t["minigpt"], speeds + (", same tokens" if same else ", tokens differ"))


def bench_trained(path, args):
    """Greedy rollouts of a model the project trained (path, e.g. out/pipeline/ppo): its own tokenizer, 64 of
    the built-in PPO training prompts, eos and pad as the RL methods use them; the same weights written as a GPT-2
    folder (minigpt.pretrained.save_gpt2) for transformers. A trained model ends most responses early: the engine
    drops finished rows from its batch, transformers' generate keeps computing them until the last row ends."""
    from minigpt import checkpoint, tasks
    from minigpt.pretrained import save_gpt2

    loaded = checkpoint.load(path, expect="gpt")
    ours, tok = loaded.model.eval(), loaded.tokenizer
    with tempfile.TemporaryDirectory() as d:
        save_gpt2(ours, d, eos_token_id=tok.eos_token_id)
        hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32).eval()
    prompts = [tok.encode(ex["prompt"]) for ex in tasks.ppo_prompts(seed=0)[0][: args.batch_prompts]]
    n, pad, eos = args.batch_new_tokens, tok.pad_token_id, tok.eos_token_id
    ids, mask = engine.left_pad(prompts, pad)

    def run_ours():
        return engine.complete(ours, prompts, n, eos_token_id=eos, pad_token_id=pad).response

    def run_ours_keeping_rows():  # the engine before it dropped finished rows
        engine.DROP_FINISHED = False
        try:
            return run_ours()
        finally:
            engine.DROP_FINISHED = True

    def run_hf():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=True,
                          pad_token_id=pad, eos_token_id=eos)[:, ids.size(1) :]
        return F.pad(out, (0, n - out.size(1)), value=pad)

    a, b, c = (F.pad(r, (0, n - r.size(1)), value=pad) for r in (run_ours(), run_hf(), run_ours_keeping_rows()))
    same = torch.equal(a, b) and torch.equal(a, c)  # (B, n) each, pad after the last row's end
    lengths = engine.response_mask_of(a, eos).sum(-1).float()
    t = interleaved({"minigpt": run_ours, "hf": run_hf, "keeping": run_ours_keeping_rows}, args.gen_repeats)
    note = (f"responses {float(lengths.mean()):.1f} tokens on average (eos included), the longest "
            f"{int(lengths.max())} of {n}; dropping finished rows {t['keeping'] / t['minigpt']:.2f}x faster than "
            f"keeping them ({1e3 * t['keeping']:.1f} ms)" + (", same tokens" if same else ", tokens differ"))
    return row(f"batched generate, trained model {path}, {len(prompts)} prompts x {n} new tokens",
               t["minigpt"], t["hf"], t["hf"] / t["minigpt"], note)


# ----------------------------------------------------------------------------------------------------------
# Report


def row(what: str, ours_s: float, ref_s: float, ratio: float, note: str) -> dict:
    return {"what": what, "ours_ms": 1e3 * ours_s, "ref_ms": 1e3 * ref_s, "ratio": ratio, "note": note}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_text(load) -> str:
    return "unknown" if load is None else f"{load[0]:.2f}"


def table(rows, args) -> str:
    head = [
        "# minigpt vs transformers GPT-2 on the CPU",
        "",
        (
            f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s) "
            f"(torch.set_num_threads), {cpu_name()}, Python {platform.python_version()}; float32, vocabulary "
            f"{args.vocab}, SDPA attention on both sides; medians of interleaved runs ({args.repeats} training "
            f"steps, {args.gen_repeats} generations per side)."
        ),
        "",
        "| measurement | minigpt ms | reference ms | ratio | goal | note |",
        "|---|---:|---:|---:|---|---|",
    ]
    goals = {"train": "minigpt / HF <= 1.0", "KV cache": "uncached / cached >= 5 (6/6/384)",
             "generate": "HF time / minigpt time >= 1.0", "batched": "HF time / minigpt time >= 1.5"}
    lines = []
    for r in rows:
        goal = next(v for k, v in goals.items() if r["what"].startswith(k))
        lines.append(f"| {r['what']} | {r['ours_ms']:.1f} | {r['ref_ms']:.1f} | {r['ratio']:.2f} | {goal} | "
                     f"{r['note']} |")
    foot = [
        "",
        (
            "Reference column: transformers' GPT2LMHeadModel for the training step and generate; minigpt without "
            f"its KV cache for the KV-cache rows. Generation: batch 1, greedy, {args.prompt}-token prompt, "
            f"block_size {args.gen_block}. Batched: {args.batch_prompts} prompts of 8-40 tokens left-padded, greedy, "
            f"eos and pad as the RL rollouts use them, block_size {args.batch_block}; tokens/s counts "
            f"{args.batch_prompts} x {args.batch_new_tokens} tokens on both sides."
            + (" Trained models (--trained): their own vocabulary and tokenizer, the first "
               f"{args.batch_prompts} built-in PPO training prompts, greedy, the same tokens checked on all three "
               "sides; the engine keeping finished rows is timed in the same interleaved rounds."
               if args.trained else "")
        ),
        "",
        f"Load average (1 min) at the start and the end of the run: {load_text(args.load_start)} and "
        f"{load_text(os.getloadavg() if hasattr(os, 'getloadavg') else None)}, on {os.cpu_count()} CPUs (each side "
        "of a ratio saw the same load: the timings are interleaved).",
    ]
    return "\n".join(head + lines + foot) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: steadier on a shared CPU)")
    p.add_argument("--vocab", type=int, default=65, help="vocabulary size (65: shakespeare-char)")
    p.add_argument("--batch", type=int, default=8, help="training batch size")
    p.add_argument("--train-block", type=int, default=256, help="training sequence length")
    p.add_argument("--repeats", type=int, default=20, help="training steps timed per side")
    p.add_argument("--gen-block", type=int, default=512, help="block_size of the generation models")
    p.add_argument("--prompt", type=int, default=16, help="prompt length")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated")
    p.add_argument("--gen-repeats", type=int, default=5, help="generations timed per side")
    p.add_argument("--batch-prompts", type=int, default=64, help="prompts in the batched generation")
    p.add_argument("--batch-new-tokens", type=int, default=24, help="new tokens per prompt, batched (PPO's default)")
    p.add_argument("--batch-block", type=int, default=128, help="block_size of the batched-generation models")
    p.add_argument("--only", choices=["train", "cache", "generate", "batched", "trained"], nargs="+",
                   help="run only these measurements")
    p.add_argument("--trained", nargs="+", default=[], help="also time greedy rollouts of these trained model folders "
                   "against transformers (e.g. out/pipeline/sft out/pipeline/ppo after make demo; default: none)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "model.md")
    args = p.parse_args(argv)
    args.load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar

    rows = []
    benches = {"train": bench_train, "cache": bench_cache, "generate": bench_generate, "batched": bench_batched}
    for key, bench in benches.items():
        if args.only and key not in args.only:
            continue
        for name, shape in SHAPES.items():
            rows.append(bench(name, shape, args))
            print(f"  {rows[-1]['what']}: ratio {rows[-1]['ratio']:.2f} ({rows[-1]['note']})", file=sys.stderr)
    for path in args.trained if not args.only or "trained" in args.only else []:
        rows.append(bench_trained(path, args))
        print(f"  {rows[-1]['what']}: ratio {rows[-1]['ratio']:.2f} ({rows[-1]['note']})", file=sys.stderr)

    peft = sys.modules.get("peft")
    if peft is not None and Path(getattr(peft, "__file__", "/")).resolve().parent == REPO / "peft":
        raise RuntimeError(f"this repo's peft was imported ({peft.__file__}); minigpt must not import peft")
    report = table(rows, args)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
