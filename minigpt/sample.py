"""Generate text from any model the project writes.

    python -m minigpt.sample --ckpt out/pretrain --prompt "Tom went"

A pretrained model continues the prompt. An instruction-tuned model (an SFT, PPO, GRPO or DPO output, which records
its prompt template) gets the prompt as an instruction, wrapped in that template, and answers until its end-of-text
token; --raw feeds the prompt as it is. For a conversation, see ``python -m minigpt.chat``.
"""

from __future__ import annotations

import argparse

import torch

from . import checkpoint, engine
from .device import select_device
from .options import HelpFormatter, run
from .tasks import format_prompt


def sample(model, tokenizer, prompt: str = "", num_samples: int = 3, max_new_tokens: int = 100,
           temperature: float = 0.8, top_k=None, top_p=None, seed: int = 1337, template=None,
           stop_at_eos: bool = False) -> list[str]:
    """num_samples continuations of prompt (empty: start from <|endoftext|>), each with the prompt in front. With a
    template, prompt is an instruction: it is formatted with it, and each answer ends at eos (shown without it)."""
    engine.check_sampling(temperature, top_k, top_p)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    text = format_prompt(prompt, template=template) if template else prompt
    ids = tokenizer.encode(text) if text else [tokenizer.eos_token_id]
    stop = stop_at_eos or template is not None
    device = next(model.parameters()).device
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    out = engine.generate(model, idx, max_new_tokens, temperature, top_k, top_p, seed=seed,
                          eos_token_id=tokenizer.eos_token_id if stop else None)
    texts = []
    for row in out.tolist():
        new = row[len(ids):]
        if stop and tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        texts.append(text + tokenizer.decode(new))
    return texts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigpt.sample", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="the model: a pretraining run (out/pretrain), any stage's output "
                   "folder, a .pt checkpoint, or a Hugging Face GPT-2 folder")
    p.add_argument("--prompt", default="", help="text to continue, or the instruction for an instruction-tuned "
                   "model (empty: start from <|endoftext|>)")
    p.add_argument("--num-samples", type=int, default=3, help="how many samples")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens whose "
                   "probability reaches p (nucleus sampling)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--stop-at-eos", action="store_true", help="end each sample at <|endoftext|> (always so for an "
                   "instruction-tuned model)")
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's instruction template")
    return p


def main(argv=None) -> list[str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # the sampling options are checked before the model is read
        engine.check_sampling(args.temperature, args.top_k, args.top_p)
        if args.num_samples < 1 or args.max_new_tokens < 0:
            raise ValueError(f"--num-samples must be >= 1 and --max-new-tokens >= 0, got {args.num_samples} and "
                             f"{args.max_new_tokens}")
    except ValueError as e:
        parser.error(str(e))
    loaded = checkpoint.load(args.ckpt, expect="gpt")
    model = loaded.model.to(select_device(args.device))
    template = None if args.raw else loaded.info.get("template")
    texts = sample(model, loaded.tokenizer, args.prompt, args.num_samples, args.max_new_tokens, args.temperature,
                   args.top_k, args.top_p, args.seed, template, args.stop_at_eos)
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1} ---\n{text}")
    return texts


if __name__ == "__main__":
    run(main)
