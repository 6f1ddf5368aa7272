"""Parity with transformers' GPT2LMHeadModel: the same Hugging Face-format GPT-2 directory loaded on both sides.

The test writes a small random GPT-2 (config.json + model.safetensors with HF's names and Conv1D (in, out) layout);
minigpt loads it with GPT.from_pretrained here, transformers loads it in .venv-ref, in another process
(tests/reference/ref_gpt2.py, through tests/reference/bridge.py). Float32, eval mode, dropout 0.

Conventions:
- Left padding. minigpt's forward counts position ids over the real tokens of each row when given an
  attention_mask; transformers' forward does not, so the reference passes position_ids = cumsum(mask) - 1, padding
  at 0 (the rule of transformers' generate). Logits at padding positions are meaningless on both sides (minigpt
  lets a padding query see itself, transformers masks the whole row) and are not compared.
- Loss. transformers shifts labels itself (labels=idx); minigpt takes shifted targets: model(idx[:, :-1], idx[:, 1:]).

Run with `make parity`; without .venv-ref these tests skip.
"""

import json

import pytest
import torch
from reference.bridge import run_reference, skip_without_reference
from safetensors.torch import save_file

from minigpt import GPT, KVCache

pytestmark = pytest.mark.parity

L, H, C, V, N = 3, 4, 96, 1000, 64  # layers, heads, width, vocabulary, positions
NEW = 20  # tokens generated greedily


def random_hf_gpt2(seed=0):
    """A GPT-2 state dict in Hugging Face's names and layout: Conv1D weights are (in, out)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1):
        return std * torch.randn(*shape, generator=g)

    sd = {"transformer.wte.weight": r(V, C), "transformer.wpe.weight": r(N, C)}
    for i in range(L):
        h = f"transformer.h.{i}."
        sd.update({
            h + "ln_1.weight": 1 + r(C), h + "ln_1.bias": r(C),
            h + "attn.c_attn.weight": r(C, 3 * C), h + "attn.c_attn.bias": r(3 * C),
            h + "attn.c_proj.weight": r(C, C), h + "attn.c_proj.bias": r(C),
            h + "ln_2.weight": 1 + r(C), h + "ln_2.bias": r(C),
            h + "mlp.c_fc.weight": r(C, 4 * C), h + "mlp.c_fc.bias": r(4 * C),
            h + "mlp.c_proj.weight": r(4 * C, C), h + "mlp.c_proj.bias": r(C),
        })
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = 1 + r(C), r(C)
    return sd


def write_hf_dir(path, sd):
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": V, "n_positions": N, "n_embd": C,
        "n_layer": L, "n_head": H, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": None, "eos_token_id": None,
        "tie_word_embeddings": True,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return path


def left_padded_batch(g):
    """Three prompts of 11, 6 and 2 tokens, left-padded with id 0 to 11; mask 1 for real tokens."""
    lengths, T = [11, 6, 2], 11
    idx = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        idx[row, T - n :] = torch.randint(1, V, (n,), generator=g)
        mask[row, T - n :] = 1
    return idx, mask


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The model directory, the inputs, and what transformers computed on them (one reference process)."""
    skip_without_reference()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (2, 16), generator=g)
    pad_idx, pad_mask = left_padded_batch(g)
    model_dir = write_hf_dir(tmp_path_factory.mktemp("gpt2") / "hf", random_hf_gpt2())
    ref = run_reference("ref_gpt2", {"idx": idx, "pad_idx": pad_idx, "pad_mask": pad_mask},
                        {"model_dir": str(model_dir), "max_new_tokens": NEW})
    return {"model_dir": model_dir, "idx": idx, "pad_idx": pad_idx, "pad_mask": pad_mask, "ref": ref}


def load_minigpt(case):
    return GPT.from_pretrained(case["model_dir"]).eval()


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_logits_match(case):
    with torch.no_grad():
        logits, _ = load_minigpt(case)(case["idx"])
    assert logits.shape == case["ref"]["logits"].shape == (2, 16, V)
    assert max_diff(logits, case["ref"]["logits"]) <= 1e-5


def test_left_padded_logits_match_on_real_tokens(case):
    mask = case["pad_mask"].bool()
    with torch.no_grad():
        logits, _ = load_minigpt(case)(case["pad_idx"], attention_mask=case["pad_mask"])
    assert max_diff(logits[mask], case["ref"]["pad_logits"][mask]) <= 1e-5  # (n_real, V) each


def test_loss_and_gradients_match(case):
    model = load_minigpt(case)
    idx = case["idx"]
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    ref = case["ref"]
    assert abs(loss.item() - ref["loss"].item()) <= 1e-5
    # wte's gradient has two parts on both sides (input embedding and the tied head)
    assert max_diff(model.input_layer.wte.weight.grad, ref["grad.transformer.wte.weight"]) <= 1e-5
    assert max_diff(model.input_layer.wpe.weight.grad, ref["grad.transformer.wpe.weight"]) <= 1e-5
    for i, block in enumerate(model.encoder.blocks):
        h = f"grad.transformer.h.{i}."
        qkv = torch.cat([block.attn.query.weight.grad, block.attn.key.weight.grad, block.attn.value.weight.grad])
        assert max_diff(qkv.T, ref[h + "attn.c_attn.weight"]) <= 1e-5  # Linear (out, in) vs Conv1D (in, out)
        assert max_diff(block.attn.proj.weight.grad.T, ref[h + "attn.c_proj.weight"]) <= 1e-5
        assert max_diff(block.mlp.fc.weight.grad.T, ref[h + "mlp.c_fc.weight"]) <= 1e-5
        assert max_diff(block.mlp.proj.bias.grad, ref[h + "mlp.c_proj.bias"]) <= 1e-5
        assert max_diff(block.ln_1.weight.grad, ref[h + "ln_1.weight"]) <= 1e-5
    assert max_diff(model.output_layer.ln_f.bias.grad, ref["grad.transformer.ln_f.bias"]) <= 1e-5


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_greedy_generation_matches(case, padded):
    idx, mask = (case["pad_idx"], case["pad_mask"]) if padded else (case["idx"], None)
    out = load_minigpt(case).generate(idx, max_new_tokens=NEW, temperature=0, attention_mask=mask, use_cache=True)
    expected = case["ref"]["pad_gen" if padded else "gen"]
    assert out.shape == expected.shape == (idx.size(0), idx.size(1) + NEW)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "left-padded"])
def test_cached_decoding_logits_match(case, padded):
    """Prefill the prompt into a KVCache, then feed transformers' generated tokens one at a time: the logits of
    every step match the ones transformers' generate computed with its own cache."""
    idx, mask = (case["pad_idx"], case["pad_mask"]) if padded else (case["idx"], None)
    ref_tokens = case["ref"]["pad_gen" if padded else "gen"][:, idx.size(1) :]  # (B, NEW)
    model = load_minigpt(case)
    cache = KVCache(model.config.n_layer)
    steps = []
    with torch.no_grad():
        logits, _ = model(idx, attention_mask=mask, cache=cache)
        steps.append(logits[:, -1])
        for t in range(NEW - 1):
            step_mask = None if mask is None else torch.ones(idx.size(0), 1, dtype=torch.long)
            logits, _ = model(ref_tokens[:, t : t + 1], attention_mask=step_mask, cache=cache)
            steps.append(logits[:, -1])
    assert max_diff(torch.stack(steps, dim=1), case["ref"]["pad_gen_logits" if padded else "gen_logits"]) <= 1e-5


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])  # config.json's gelu_new and gelu
def test_a_model_saved_with_save_gpt2_opens_in_transformers_with_the_same_logits(tmp_path, activation):
    """The other direction: a minigpt GPT of GPT-2's shape (every weight, bias and LayerNorm random) written by
    minigpt.pretrained.save_gpt2 is a folder GPT2LMHeadModel.from_pretrained loads cleanly (ref_io.load_gpt2 in
    tests/reference checks the load report and the tied head) and runs with our logits."""
    from minigpt import GPTConfig
    from minigpt.pretrained import save_gpt2

    skip_without_reference()
    torch.manual_seed(5)
    model = GPT(GPTConfig(vocab_size=V, block_size=N, n_layer=L, n_head=H, n_embd=C, activation=activation)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = save_gpt2(model, tmp_path / "gpt2")
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(6))
    ref = run_reference("ref_hf_adapters", {"idx": idx}, {"model_dir": str(folder)})
    with torch.no_grad():
        logits, _ = model(idx)
    assert logits.abs().max() > 1.0  # not a degenerate model
    assert max_diff(logits, ref["base.logits"]) <= 1e-5
