"""Reference side of the file-travel parity tests (tests/test_peft_hf.py, tests/test_parity_gpt2.py): a GPT-2 folder
written by minigpt.pretrained.save_gpt2 and adapter folders written by peft.save_hf_adapter, opened by transformers
and huggingface peft; and adapters made and saved by huggingface peft, for minigpt to open.

Runs in .venv-ref (see bridge.py), where ``import peft`` is Hugging Face's package (checked first).

args:
    model_dir   the GPT-2 folder (config.json + model.safetensors) that save_gpt2 wrote
    load        a list of {name, folder}: PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(model_dir), folder)
    make        a list of {name, folder, config_class, config, seed}: a huggingface peft adapter of that config on
                the same base, every trainable tensor drawn from a seeded generator (see draw), saved with
                save_pretrained to folder
inputs: idx (B, T)
outputs:
    base.logits (B, T, V)            the GPT-2 folder alone
    load.<name>.logits (B, T, V)     the real tokens' logits (prompt methods' virtual tokens cut off)
    make.<name>.logits (B, T, V)     the adapter made here, before saving
"""

import ref_io
import torch

ref_io.check_hf_peft()
import peft


def draw(name, p, g):
    """A seeded value away from the initialisation: IA3 vectors and DoRA magnitudes around their start, the rest
    around zero (LoRA's B included, so the update is not zero)."""
    noise = torch.randn(p.shape, generator=g)
    if "ia3_l" in name:
        return 1.0 + 0.3 * noise
    if "lora_magnitude_vector" in name:
        return p.detach() * (1.0 + 0.2 * noise)
    if "embedding" in name:
        return 0.5 * noise
    return 0.1 * noise


def real_logits(model, idx):
    with torch.no_grad():
        logits = model(input_ids=idx).logits
    return logits[:, -idx.size(1) :]  # prompt tuning prepends its virtual tokens' logits


def main():
    inputs, args, work = ref_io.read()
    idx = inputs["idx"]
    out = {"base.logits": real_logits(ref_io.load_gpt2(args["model_dir"]), idx)}
    for case in args.get("load", []):
        model = peft.PeftModel.from_pretrained(ref_io.load_gpt2(args["model_dir"]), case["folder"]).eval()
        out[f"load.{case['name']}.logits"] = real_logits(model, idx)
    for case in args.get("make", []):
        config = getattr(peft, case["config_class"])(task_type="CAUSAL_LM", **case["config"])
        torch.manual_seed(case["seed"])
        model = peft.get_peft_model(ref_io.load_gpt2(args["model_dir"]), config)
        g = torch.Generator().manual_seed(case["seed"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(draw(name, p, g))
        model.eval()
        out[f"make.{case['name']}.logits"] = real_logits(model, idx)
        model.save_pretrained(case["folder"])
    ref_io.write(work, out)


if __name__ == "__main__":
    main()
