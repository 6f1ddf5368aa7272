"""Generate text from a checkpoint: ``python -m minigpt.sample --ckpt out/pretrain/best.pt --prompt "Tom went"``."""

from __future__ import annotations

import argparse

import torch

from .tokenizer import tokenizer_from_dict
from .train import load_checkpoint, model_from_checkpoint, select_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigpt.sample", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by python -m minigpt.train (ckpt.pt or best.pt)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--num-samples", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--stop-at-eos", action="store_true", help="end each sample at <|endoftext|>")
    return p


def sample(ckpt_path, prompt="", num_samples=3, max_new_tokens=100, temperature=0.8, top_k=None, top_p=None,
           seed=1337, device="auto", stop_at_eos=False) -> list[str]:
    ckpt = load_checkpoint(ckpt_path)
    tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    device = select_device(device)
    model = model_from_checkpoint(ckpt).to(device).eval()
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_token_id]
    if len(ids) >= model.config.block_size:
        ids = ids[-(model.config.block_size - 1):]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         eos_token_id=tokenizer.eos_token_id if stop_at_eos else None)
    texts = []
    for row in out.tolist():
        new = row[len(ids):]
        if stop_at_eos and tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        texts.append(prompt + tokenizer.decode(new))
    return texts


def main(argv=None):
    args = build_parser().parse_args(argv)
    texts = sample(args.ckpt, args.prompt, args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                   args.top_p, args.seed, args.device, args.stop_at_eos)
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1} ---\n{text}")
    return texts


if __name__ == "__main__":
    main()
