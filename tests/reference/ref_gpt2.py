"""Reference side of tests/test_parity_gpt2.py: transformers' GPT2LMHeadModel on a Hugging Face GPT-2 directory.

Runs in .venv-ref (see bridge.py). args: model_dir, max_new_tokens, attn_implementation.
inputs: idx (B, T); pad_idx, pad_mask (B', T'), a left-padded batch and its attention mask (1 real, 0 pad).
outputs:
    logits             (B, T, V)     forward on idx
    pad_logits         (B', T', V)   forward on the padded batch, position ids counted over real tokens only
    loss               ()            the mean next-token cross-entropy of idx (labels=idx: HF shifts them itself)
    grad.<hf name>                   d loss / d parameter, in HF's names and Conv1D (in, out) layout
    gen, pad_gen       (B, T + n)    greedy generate with the KV cache
    gen_logits, pad_gen_logits  (B, n, V)  the raw logits of every generated step
"""

import ref_io
import torch


def position_ids_from_mask(mask):
    """Real tokens count 0, 1, 2, ... from their row's first real token; padding gets 0 (generate's rule)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def greedy(model, idx, mask, n):
    out = model.generate(idx, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         use_cache=True, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True,
                         output_logits=True)
    return out.sequences, torch.stack(out.logits, dim=1)  # (B, T + n), (B, n, V)


def main():
    inputs, args, work = ref_io.read()
    torch.manual_seed(0)
    model = ref_io.load_gpt2(args["model_dir"], args.get("attn_implementation", "sdpa"))
    idx, pad_idx, pad_mask = inputs["idx"], inputs["pad_idx"], inputs["pad_mask"]
    out = {}

    with torch.no_grad():
        out["logits"] = model(idx).logits
        positions = position_ids_from_mask(pad_mask)
        out["pad_logits"] = model(pad_idx, attention_mask=pad_mask, position_ids=positions).logits

    loss = model(idx, labels=idx).loss
    loss.backward()
    out["loss"] = loss.detach()
    out.update({f"grad.{name}": p.grad for name, p in model.named_parameters()})

    n = args["max_new_tokens"]
    out["gen"], out["gen_logits"] = greedy(model, idx, torch.ones_like(idx), n)
    out["pad_gen"], out["pad_gen_logits"] = greedy(model, pad_idx, pad_mask, n)
    ref_io.write(work, out)


if __name__ == "__main__":
    main()
