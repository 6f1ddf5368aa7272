"""GPT.from_pretrained on a Hugging Face-format GPT-2 directory that the test writes itself."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from minigpt import GPT

L, C, H, V, N = 2, 16, 2, 50, 24


def hf_state_dict(seed=0):
    """Random tensors with GPT-2's names and Conv1D (in, out) layout."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return 0.2 * torch.randn(*shape, generator=g)

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
            h + "attn.bias": torch.tril(torch.ones(1, 1, N, N)),  # old checkpoints carry the mask buffer
        })
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = 1 + r(C), r(C)
    return sd


def write_dir(path, sd, fmt="safetensors"):
    path.mkdir(exist_ok=True)
    config = dict(vocab_size=V, n_positions=N, n_embd=C, n_layer=L, n_head=H, activation_function="gelu_new",
                  layer_norm_epsilon=1e-5, model_type="gpt2")
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    else:
        torch.save(sd, path / "pytorch_model.bin")
    return path


def gpt2_forward_by_hand(sd, idx):
    """GPT-2's forward written directly on the Hugging Face tensors (Conv1D: x @ W + b)."""
    def ln(x, p):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[p + ".weight"] + sd[p + ".bias"]

    def conv1d(x, p):
        return x @ sd[p + ".weight"] + sd[p + ".bias"]

    T = idx.shape[1]
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    for i in range(L):
        h = f"transformer.h.{i}."
        q, k, v = conv1d(ln(x, h + "ln_1"), h + "attn.c_attn").split(C, dim=-1)
        q, k, v = (t.view(1, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(C // H)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        x = x + conv1d((att @ v).transpose(1, 2).reshape(1, T, C), h + "attn.c_proj")
        m = conv1d(ln(x, h + "ln_2"), h + "mlp.c_fc")
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m**3)))
        x = x + conv1d(m, h + "mlp.c_proj")
    return ln(x, "transformer.ln_f") @ sd["transformer.wte.weight"].T


@pytest.mark.parametrize("hf_name, ours", [("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
                                            ("gelu", "gelu")])
def test_activation_names_map_both_ways(hf_name, ours):
    from minigpt.pretrained import config_from_hf, hf_config

    config = config_from_hf(dict(vocab_size=V, n_positions=N, n_embd=C, n_layer=L, n_head=H,
                                 activation_function=hf_name))
    assert config.activation == ours
    written = hf_config(config)["activation_function"]
    assert written == ("gelu_new" if ours == "gelu_tanh" else "gelu")
    with pytest.raises(ValueError, match="relu"):
        config_from_hf(dict(vocab_size=V, n_positions=N, n_embd=C, n_layer=L, n_head=H, activation_function="relu"))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_reproduces_the_source_weights_and_forward(tmp_path, fmt):
    sd = hf_state_dict()
    model = GPT.from_pretrained(write_dir(tmp_path / "gpt2", sd, fmt)).eval()
    b = model.encoder.blocks[1]
    W = sd["transformer.h.1.attn.c_attn.weight"]
    assert torch.equal(b.attn.query.weight, W[:, :C].T)
    assert torch.equal(b.attn.key.weight, W[:, C : 2 * C].T)
    assert torch.equal(b.attn.value.bias, sd["transformer.h.1.attn.c_attn.bias"][2 * C :])
    assert torch.equal(b.mlp.fc.weight, sd["transformer.h.1.mlp.c_fc.weight"].T)
    assert model.output_layer.head.weight is model.input_layer.wte.weight  # still tied
    idx = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        logits, _ = model(idx)
    assert torch.allclose(logits, gpt2_forward_by_hand(sd, idx), atol=1e-5)


def test_explicit_lm_head_and_prefixless_names(tmp_path):
    sd = {k.removeprefix("transformer."): v for k, v in hf_state_dict().items()}  # GPT2Model saves no prefix
    sd["lm_head.weight"] = sd["wte.weight"].clone()
    model = GPT.from_pretrained(write_dir(tmp_path / "m", sd))
    assert torch.equal(model.output_layer.head.weight, sd["wte.weight"])


def test_shape_mismatch_names_the_tensor(tmp_path):
    sd = hf_state_dict()
    sd["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(C, 3 * C)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight.*\(16, 48\).*\(16, 64\)"):
        GPT.from_pretrained(write_dir(tmp_path / "m", sd))


def test_missing_tensor_and_missing_files(tmp_path):
    sd = hf_state_dict()
    del sd["transformer.ln_f.bias"]
    with pytest.raises(KeyError, match="ln_f.bias"):
        GPT.from_pretrained(write_dir(tmp_path / "m", sd))
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(dict(vocab_size=V, n_positions=N, n_embd=C,
                                                                    n_layer=L, n_head=H)))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        GPT.from_pretrained(tmp_path / "empty")
