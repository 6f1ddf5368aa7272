"""Reference side of tests/test_parity_peft.py: Hugging Face peft on transformers' GPT2LMHeadModel.

Runs in .venv-ref (see bridge.py), where ``import peft`` is Hugging Face's package (checked first). One process
serves every case of the test module, so the imports are paid once.

args:
    model_dir   a Hugging Face-format GPT-2 directory (the same one minigpt loads)
    cases       a list of {name, config_class, config, positions, merge, generate, padded}:
                config_class  a config class of Hugging Face peft ("LoraConfig", "IA3Config", "PromptTuningConfig",
                              "PromptEncoderConfig", "PrefixTuningConfig"), built with config (task_type CAUSAL_LM)
                positions     prefix tuning only: "explicit" passes position_ids = arange(T) - n, which HF peft shifts
                              by n itself, so the real tokens get positions 0..T-1 (minigpt's convention);
                              "default" passes none, so the real tokens get positions n..n+T-1 (HF's own)
                merge         also run after model.merge_adapter() (LoRA, IA3)
                generate      also greedy-generate this many tokens (0: not), without HF's KV cache: with these
                              pins HF peft's cached generate is broken for prompt methods (see test_parity_peft.py)
                padded        also run the left-padded batch
inputs:
    idx (B, T); pad_idx, pad_mask (B', T')
    "<case>:<parameter name>"   the value of every trainable parameter of that case's HF peft model, by its name in
                                model.named_parameters(); a trainable parameter without a value is an error
outputs, for each case:
    <case>.logits (B, n + T, V) for prompt / p-tuning (virtual tokens included), (B, T, V) otherwise
    <case>.loss                 mean cross-entropy of the real tokens' next-token predictions
    <case>.grad.<parameter>     d loss / d parameter for every trainable parameter
    <case>.merged_logits, <case>.gen, <case>.pad_logits   when asked for
"""

import ref_io
import torch
import torch.nn.functional as F

ref_io.check_hf_peft()
import peft


def set_trainable(model, values):
    """Copy values into the trainable parameters by name; every trainable parameter must get one."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(values) != set(params):
        raise ValueError(f"adapter tensors given for {sorted(set(values) - set(params))}, "
                         f"missing for {sorted(set(params) - set(values))}")
    with torch.no_grad():
        for name, value in values.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{name}: HF shape {tuple(params[name].shape)}, given {tuple(value.shape)}")
            params[name].copy_(value)
    return params


def prefix_position_ids(mask, n):
    """Position ids for HF peft's prefix tuning such that, after it adds n, the real tokens count 0, 1, ... from
    their row's first real token (padding at 0), as minigpt counts them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0) - n  # (B, T)


def run_case(case, model_dir, inputs):
    name = case["name"]
    config = getattr(peft, case["config_class"])(task_type="CAUSAL_LM", **case["config"])
    torch.manual_seed(0)
    model = peft.get_peft_model(ref_io.load_gpt2(model_dir), config).eval()
    values = {k.split(":", 1)[1]: v for k, v in inputs.items() if k.startswith(name + ":")}
    params = set_trainable(model, values)

    idx = inputs["idx"]
    T = idx.size(1)
    kwargs = {}
    if case.get("positions") == "explicit":
        kwargs["position_ids"] = prefix_position_ids(torch.ones_like(idx), config.num_virtual_tokens)
    out = {}

    logits = model(input_ids=idx, **kwargs).logits  # (B, [n +] T, V)
    real = logits[:, -T:]  # the real tokens' logits
    loss = F.cross_entropy(real[:, :-1].reshape(-1, real.size(-1)), idx[:, 1:].reshape(-1))
    loss.backward()
    out[f"{name}.logits"] = logits.detach()
    out[f"{name}.loss"] = loss.detach()
    out.update({f"{name}.grad.{n}": p.grad for n, p in params.items()})

    with torch.no_grad():
        if case.get("padded"):
            pad_idx, pad_mask = inputs["pad_idx"], inputs["pad_mask"]
            pad_kwargs = {"attention_mask": pad_mask}
            if case.get("positions") == "explicit":
                pad_kwargs["position_ids"] = prefix_position_ids(pad_mask, config.num_virtual_tokens)
            out[f"{name}.pad_logits"] = model(input_ids=pad_idx, **pad_kwargs).logits
        if case.get("generate"):
            out[f"{name}.gen"] = model.generate(input_ids=idx, attention_mask=torch.ones_like(idx),
                                                max_new_tokens=case["generate"], do_sample=False, use_cache=False,
                                                pad_token_id=0, eos_token_id=None)
        if case.get("merge"):
            model.merge_adapter()
            out[f"{name}.merged_logits"] = model(input_ids=idx).logits
    return out


def main():
    inputs, args, work = ref_io.read()
    out = {}
    for case in args["cases"]:
        out.update(run_case(case, args["model_dir"], inputs))
    ref_io.write(work, out)


if __name__ == "__main__":
    main()
