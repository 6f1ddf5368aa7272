"""The GPU path, checked: bf16 autocast, torch.compile and fused attention, against the same runs in float32.

For each shape (6 layers x 384, nanoGPT's shakespeare-char GPU model; and GPT-2 small's 12 x 768 with a 1024
context) it pretrains a fixed number of steps three times from the same initial weights and the same batches, through
the library's own ``minigpt.train.pretrain``: in float32, with bf16 autocast, and with bf16 autocast and
``--compile``. It records the training throughput (tokens per second, measured after the first steps so that
compiling is left out; the compile time is reported on its own) and the training and validation losses, whose
differences from the float32 run say what bf16 costs in accuracy. Then it generates with the float32 model and with a
bf16 copy of it: tokens per second at batch 1 and at batch 64 (left-padded prompts, as the RL rollouts), and the
share of greedy tokens the two agree on. It also checks that SDPA's fused (flash) kernel accepts the model's
attention shapes in bf16.

    python benchmarks/bench_gpu.py --data ../shared/data/tinyshakespeare.txt     # on a CUDA GPU: results/gpu.md
    python benchmarks/bench_gpu.py --smoke                                       # CPU, tiny sizes, out/bench_gpu

--smoke runs the same code on the CPU at tiny sizes (CPU autocast in bf16, torch.compile when a C++ compiler is
there), so that the script is known to work before a GPU is at hand; its figures say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minigpt import engine  # noqa: E402
from minigpt.checkpoint import load  # noqa: E402
from minigpt.device import compiler_missing, select_device  # noqa: E402
from minigpt.train import PretrainConfig, TrainConfig, pretrain  # noqa: E402

# name -> (model shape, batch size, steps, learning rate)
SHAPES = {
    "small 6x6x384": ({"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256}, 64, 300, 1e-3),
    "gpt2 12x12x768": ({"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024}, 8, 100, 6e-4),
}
SMOKE_SHAPES = {
    "tiny 2x2x32": ({"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}, 8, 30, 3e-3),
    "tiny 2x2x64": ({"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64}, 4, 20, 3e-3),
}
VARIANTS = {"float32": ("float32", False), "bf16 autocast": ("bfloat16", False),
            "bf16 autocast + compile": ("bfloat16", True)}


# ----------------------------------------------------------------------------------------------------------
# Pretraining


def steady_tokens_per_s(metrics: Path, tokens_per_iter: int, skip: int) -> float:
    """Training throughput between the first logged iteration >= skip and the last one: compiling, warm-up and the
    evaluations (at the first and the last iteration only) are left out."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if r["iter"] >= skip]
    first, last = rows[0], rows[-1]
    return (last["iter"] - first["iter"]) * tokens_per_iter / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)


def train_variant(args, name, shape, batch, steps, lr, variant, out: Path) -> dict:
    dtype, compile_ = VARIANTS[variant]
    pcfg = PretrainConfig(data=[args.data] if args.data else None, tokenizer="char", corpus_chars=args.corpus_chars,
                          data_dir=str(out / "data"), preset="small", **shape)
    run_dir = out / name.split()[0] / variant.replace(" ", "_").replace("+", "and")
    cfg = TrainConfig(max_iters=steps, lr_decay_iters=steps, batch_size=batch, lr=lr, min_lr=lr / 10,
                      warmup_iters=max(1, steps // 10), eval_interval=steps, eval_iters=args.eval_iters,
                      log_interval=max(1, steps // 20), out_dir=str(run_dir), device=args.device, dtype=dtype,
                      compile=compile_, progress=False, plot=False, overwrite=True, seed=args.seed)
    t0 = time.perf_counter()
    r = pretrain(pcfg, cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    skip = max(1, steps // 10)
    return {"shape": name, "variant": variant, "steps": steps, "batch": batch, "block": shape["block_size"],
            "params": r["params"], "train_loss": rows[-1]["train_loss"], "val_loss": r["val_loss"],
            "tokens_per_s": steady_tokens_per_s(run_dir / "metrics.jsonl", batch * shape["block_size"], skip),
            "first_steps_s": next(x["elapsed_s"] for x in rows if x["iter"] >= skip), "wall_s": wall,
            "out_dir": str(run_dir)}


# ----------------------------------------------------------------------------------------------------------
# Generation and fused attention


def timed(fn, repeats: int) -> float:
    """Median seconds of fn over repeats calls, after one call to warm up."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def generation(model_dir: str, device, args) -> dict:
    """Tokens/s at batch 1 and at batch 64 (left-padded), float32 and a bf16 copy; greedy tokens agreed on."""
    fp32 = load(model_dir).model.to(device).eval()
    bf16 = load(model_dir).model.to(device=device, dtype=torch.bfloat16).eval()
    window = engine.context_window(fp32)
    g = torch.Generator().manual_seed(0)
    vocab = fp32.config.vocab_size
    prompt = torch.randint(0, vocab, (1, min(16, window // 2)), generator=g).to(device)
    n1 = min(args.new_tokens, window - prompt.size(1))
    n_batch = min(24, window // 3)
    lengths = torch.randint(2, min(41, window - n_batch), (64,), generator=g).tolist()  # 2 to 40 tokens, as RL
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    out = {}
    tokens = {}
    for dtype, model in (("float32", fp32), ("bfloat16", bf16)):
        def one(model=model):
            return engine.generate(model, prompt, n1, temperature=0)[0, prompt.size(1) :]

        def batched(model=model):
            return engine.complete(model, prompts, n_batch, eos_token_id=vocab, pad_token_id=0).response

        tokens[dtype] = (one(), batched())
        out[f"{dtype} batch 1 tokens/s"] = n1 / timed(one, args.repeats)
        out[f"{dtype} batch 64 tokens/s"] = 64 * n_batch / timed(batched, args.repeats)
    out["greedy tokens the same, batch 1"] = (tokens["float32"][0] == tokens["bfloat16"][0]).float().mean().item()
    out["greedy tokens the same, batch 64"] = (tokens["float32"][1] == tokens["bfloat16"][1]).float().mean().item()
    return out


def fused_attention_check(shape: dict, device) -> str:
    """Whether SDPA's flash kernel runs the model's attention shape in bf16 on this device (forward and backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    nh, hs = shape["n_head"], shape["n_embd"] // shape["n_head"]
    q, k, v = (torch.randn(2, nh, shape["block_size"], hs, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    except RuntimeError as e:
        return f"no ({str(e).splitlines()[0][:120]})"
    return "yes"


# ----------------------------------------------------------------------------------------------------------
# Report


def report(results: list[dict], generations: dict, attention: dict, device, args) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# The GPU path: bf16 autocast and torch.compile against float32 ({name})", "",
             f"torch {torch.__version__}; {'SMOKE RUN on tiny sizes: the figures check the script, not the speed; ' if args.smoke else ''}"
             "the same initial weights and batches in every variant of a shape; tokens/s of training after the "
             "first tenth of the steps (compiling excluded; the 'first tenth' column holds it); char tokenizer.", "",
             "| shape | variant | steps x batch x block | train tokens/s | vs float32 | first tenth (s) | train loss | "
             "val loss | val loss - float32 |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        base = next(b for b in results if b["shape"] == r["shape"] and b["variant"] == "float32")
        lines.append(f"| {r['shape']} | {r['variant']} | {r['steps']} x {r['batch']} x {r['block']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                     f"{r['first_steps_s']:.1f} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | "
                     f"{r['val_loss'] - base['val_loss']:+.4f} |")
    lines += ["", "| shape | fused (flash) attention in bf16 | generation (float32 model, bf16 copy) |", "|---|---|---|"]
    for shape, g in generations.items():
        text = "; ".join(f"{k} {v:,.0f}" if "tokens/s" in k else f"{k} {v:.1%}" for k, v in g.items())
        lines.append(f"| {shape} | {attention[shape]} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check that the script runs")
    p.add_argument("--data", default=None, help="a text file to pretrain on (default: the built-in corpus)")
    p.add_argument("--corpus-chars", type=int, default=1_500_000, help="size of the built-in corpus")
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-iters", type=int, default=20, help="validation batches at the end of each run")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated at batch 1")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per setting")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default=None, help="run folders (default: out/bench_gpu)")
    args = p.parse_args(argv)
    shapes = SHAPES
    if args.smoke:
        shapes, args.corpus_chars, args.eval_iters, args.new_tokens, args.repeats = SMOKE_SHAPES, 60_000, 2, 16, 1
        args.device = "cpu" if args.device == "auto" else args.device
    device = select_device(args.device)
    if device.type != "cuda" and not args.smoke:
        raise SystemExit(f"no CUDA GPU here ({device}); run with --smoke to check the script on the CPU")
    out = Path(args.out or REPO / "out" / "bench_gpu")
    variants = [v for v in VARIANTS if not (args.no_compile and "compile" in v)]
    if "bf16 autocast + compile" in variants and compiler_missing(device):
        print(f"{compiler_missing(device)}: leaving out the compile variant")
        variants.remove("bf16 autocast + compile")
    results, generations, attention = [], {}, {}
    for name, (shape, batch, steps, lr) in shapes.items():
        for variant in variants:
            results.append(train_variant(args, name, shape, batch, steps, lr, variant, out))
            r = results[-1]
            print(f"  {name}, {variant}: {r['tokens_per_s']:,.0f} tokens/s, val {r['val_loss']:.4f}", flush=True)
        generations[name] = generation(results[-len(variants)]["out_dir"], device, args)
        attention[name] = fused_attention_check(shape, device)
    text = report(results, generations, attention, device, args)
    print(text)
    results_dir = out if args.smoke else REPO / "benchmarks" / "results"  # a smoke run keeps the real results
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "gpu.md").write_text(text)
    (results_dir / "gpu.json").write_text(json.dumps({"train": results, "generation": generations,
                                                      "fused_attention": attention}, indent=1))
    print(f"written to {results_dir}")


if __name__ == "__main__":
    main()
