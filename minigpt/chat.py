"""Talk to an instruction-tuned model: ``python -m minigpt.chat --model out/sft/full`` (or a PPO, GRPO, DPO output).

Each line you type is wrapped in the prompt template the model was fine-tuned with and answered token by token as the
engine samples it, until the model's end-of-text token. Each message is answered on its own: the models here were
tuned on single instructions, not on conversations. An empty line or Ctrl-D ends the chat.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import checkpoint, engine
from .device import select_device
from .options import HelpFormatter, run
from .tasks import format_prompt


def reply(model, tokenizer, message: str, template, max_new_tokens: int = 64, temperature: float = 0.0,
          top_k=None, top_p=None, generator=None):
    """Yield the answer to message as text pieces, as the tokens come (a piece is held back while it ends inside a
    multi-byte character, so what is printed is never a broken character)."""
    prompt = tokenizer.encode(format_prompt(message, template=template))
    idx = torch.tensor([prompt[-engine.context_window(model):]], device=next(model.parameters()).device)
    tokens, shown = [], ""
    for token in engine.stream(model, idx, max_new_tokens, temperature, top_k, top_p,
                               eos_token_id=tokenizer.eos_token_id, generator=generator):
        if int(token) == tokenizer.eos_token_id:
            break
        tokens.append(int(token))
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigpt.chat", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="out/sft/full", help="an instruction-tuned model: an SFT, PPO, GRPO or DPO "
                   "output folder")
    p.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set reaching p")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    return p


def main(argv=None, stdin=None, stdout=None) -> list[str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        engine.check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        parser.error(str(e))
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    loaded = checkpoint.load(args.model, expect="gpt")
    template = loaded.info.get("template")
    if template is None:
        raise ValueError(f"{args.model} is {loaded.info['stage']!r} model without an instruction template: chat needs "
                         f"an instruction-tuned model (python -m peft.train); to continue text, use minigpt.sample")
    model = loaded.model.to(select_device(args.device))
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    interactive = stdin.isatty()
    answers = []
    print(f"chatting with {args.model} ({loaded.info['stage']}); an empty line ends", file=stdout)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        message = stdin.readline()
        if not message.strip():
            break
        print("model> ", end="", file=stdout, flush=True)
        pieces = []
        for piece in reply(model, loaded.tokenizer, message.strip(), template, args.max_new_tokens,
                           args.temperature, args.top_k, args.top_p, generator):
            print(piece, end="", file=stdout, flush=True)
            pieces.append(piece)
        print(file=stdout)
        answers.append("".join(pieces))
    return answers


if __name__ == "__main__":
    run(main)
