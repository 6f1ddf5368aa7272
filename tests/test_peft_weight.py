"""The weight-side PEFT methods (BitFit, LoRA, IA3, Houlsby adapters) checked against their papers' equations written
out by hand, closed-form parameter counts on GPT-2 small, and the base model they must leave intact."""

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import peft
from minigpt import GPT, preset
from minigpt.model import MLP, CausalSelfAttention
from peft.bitfit import REDUCED_TARGETS

V = 64
ALL_LINEAR = ["query", "key", "value", "attn.proj", "fc", "mlp.proj"]


def tiny(seed=0, **overrides):
    """preset tiny: 2 layers, 2 heads, n_embd 32."""
    torch.manual_seed(seed)
    model = GPT(preset("tiny", vocab_size=V, **overrides))
    # GPT-2 init leaves biases at zero and LayerNorm at (1, 0); randomise them so the tests see every term
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def batch(seed=1, B=2, T=8):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def randomise(model, seed=123):
    """Move the method's tensors away from their identity init, so that they change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(model):
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def one_step(model, idx, lr=1e-2):
    """One AdamW step on a random next-token target."""
    targets = torch.randint(0, V, idx.shape, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(trainable(model), lr=lr)
    model.train()
    _, loss = model(idx, targets)
    loss.backward()
    opt.step()
    model.eval()


def method_configs():
    return [
        peft.BitFitConfig(),
        peft.LoraConfig(r=4, alpha=8),
        peft.IA3Config(),
        peft.AdapterConfig(reduction_factor=8),
    ]


# -- the equations by hand ------------------------------------------------------------------------------------


def linear(x, W, b):
    return x @ W.T + b


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def attention_by_hand(q, k, v, W_o, b_o, n_head):
    """softmax(q k^T / sqrt(d_k) + causal mask) v, one head at a time, heads side by side, then W_O."""
    T, C = q.shape[-2:]
    d = C // n_head
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    heads = []
    for h in range(n_head):
        qh, kh, vh = (t[..., h * d : (h + 1) * d] for t in (q, k, v))
        scores = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ vh)
    return linear(torch.cat(heads, dim=-1), W_o, b_o)


def plain_attention(x, attn: CausalSelfAttention):
    q, k, v = (linear(x, m.weight, m.bias) for m in (attn.query, attn.key, attn.value))
    return attention_by_hand(q, k, v, attn.proj.weight, attn.proj.bias, attn.n_head)


def plain_mlp(x, mlp: MLP):
    return linear(gelu_tanh(linear(x, mlp.fc.weight, mlp.fc.bias)), mlp.proj.weight, mlp.proj.bias)


# -- configs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    method_configs()
    + [
        peft.BitFitConfig(target_modules=REDUCED_TARGETS, include_layernorm=False),
        peft.LoraConfig(r=2, alpha=1.5, lora_dropout=0.1, target_modules=ALL_LINEAR, use_rslora=True),
        peft.IA3Config(target_modules=["key", "value"], feedforward_modules=[]),
        peft.AdapterConfig(reduction_factor=4, non_linearity="relu", placement="pfeiffer", init_scale=0.01),
    ],
)
def test_config_round_trips_through_json(config):
    d = json.loads(json.dumps(dataclasses.asdict(config)))
    assert type(config)(**d) == config
    assert peft.CONFIGS[config.method] is type(config)


# -- identity at the start, and only the method's tensors train -------------------------------------------------


@pytest.mark.parametrize("layout", ["pre_ln", "post_ln"])
@pytest.mark.parametrize(
    "config",
    [
        peft.LoraConfig(r=4, alpha=8, target_modules=ALL_LINEAR),
        peft.IA3Config(),
        peft.AdapterConfig(reduction_factor=8),
        peft.AdapterConfig(placement="pfeiffer"),
    ],
)
def test_at_init_the_outputs_are_unchanged(config, layout):
    model, idx = tiny(layout=layout), batch()
    before = logits(model, idx)
    peft.get_peft_model(model, config)
    assert torch.equal(logits(model, idx), before)  # B = 0, l = 1, W_up = 0: exactly the identity


@pytest.mark.parametrize(
    "config",
    method_configs()
    + [
        peft.BitFitConfig(target_modules=REDUCED_TARGETS),
        peft.BitFitConfig(include_layernorm=False),
        peft.AdapterConfig(placement="pfeiffer"),
    ],
)
def test_one_step_changes_only_the_methods_tensors(config):
    model, idx = tiny(), batch()
    base = [(name, p, p.detach().clone()) for name, p in model.named_parameters()]
    peft.get_peft_model(model, config)
    new = [p for p in model.parameters() if all(p is not q for _, q, _ in base)]
    new_before = [p.detach().clone() for p in new]
    one_step(model, idx)

    changed_base = {name for name, p, before in base if not torch.equal(p, before)}
    if isinstance(config, peft.BitFitConfig):
        # the biases the config names, listed from the parameter names (ln_f is the final LayerNorm)
        if config.target_modules is not None:
            expected = {n for n, _, _ in base if n.endswith(("attn.query.bias", "mlp.fc.bias"))}
        elif config.include_layernorm:
            expected = {n for n, _, _ in base if n.endswith(".bias")}
        else:
            expected = {n for n, _, _ in base if n.endswith(".bias") and ".ln_" not in n}
        assert new == []
        assert {n for n, p, _ in base if p.requires_grad} == expected
        assert changed_base == expected
    else:
        assert changed_base == set()  # every base tensor bit-identical
        assert all(not p.requires_grad for _, p, _ in base)
        assert all(p.requires_grad for p in new) and len(trainable(model)) == len(new)
        assert any(not torch.equal(p, before) for p, before in zip(new, new_before))


# -- trainable counts on GPT-2 small, in closed form ------------------------------------------------------------

C, L, F = 768, 12, 4 * 768  # n_embd, n_layer, MLP width of GPT-2 small
GPT2_TOTAL = 124_439_808


def houlsby(m):  # one adapter: W_down (m, C) + b_down (m) + W_up (C, m) + b_up (C)
    return 2 * m * C + m + C


@pytest.mark.parametrize(
    "config, expected",
    [
        (peft.BitFitConfig(), 102_144),
        # q, k, v, attn.proj biases; mlp.fc; mlp.proj; ln_1 and ln_2; then the final ln_f
        (peft.BitFitConfig(), L * (4 * C + F + C + 2 * C) + C),
        (peft.BitFitConfig(include_layernorm=False), L * (4 * C + F + C)),
        (peft.BitFitConfig(target_modules=REDUCED_TARGETS), L * (C + F)),  # b_q and b_m2 only
        (peft.LoraConfig(r=8, target_modules=["query", "value"]), 294_912),
        (peft.LoraConfig(r=8), L * 2 * (8 * C + C * 8)),  # A (r, in) + B (out, r) on W_q and W_v
        # r = 4 on every Linear of a block: four (C, C), then fc (C -> F) and mlp.proj (F -> C)
        (peft.LoraConfig(r=4, target_modules=ALL_LINEAR), L * (4 * 4 * (C + C) + 4 * (C + F) + 4 * (F + C))),
        (peft.IA3Config(), 55_296),
        (peft.IA3Config(), L * (C + C + F)),  # l_k, l_v, l_ff
        (peft.IA3Config(target_modules=["key", "value"], feedforward_modules=[]), L * 2 * C),
        (peft.AdapterConfig(reduction_factor=16), 1_789_056),
        (peft.AdapterConfig(reduction_factor=16), L * 2 * houlsby(C // 16)),
        (peft.AdapterConfig(reduction_factor=16, placement="pfeiffer"), L * houlsby(48)),
        (peft.AdapterConfig(reduction_factor=64), L * 2 * houlsby(12)),
    ],
)
def test_trainable_counts_on_gpt2_equal_the_closed_form(config, expected):
    with torch.device("meta"):
        model = GPT(preset("gpt2"))
    peft.get_peft_model(model, config)
    n_trainable, n_total = peft.count_parameters(model)
    assert n_trainable == expected
    assert n_total == GPT2_TOTAL + (0 if isinstance(config, peft.BitFitConfig) else expected)


# -- each method's equation written out by hand -----------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_layer_equals_its_equation(use_rslora):
    model = tiny()
    peft.get_peft_model(model, peft.LoraConfig(r=4, alpha=8, use_rslora=use_rslora))
    randomise(model)
    layer = model.encoder.blocks[1].attn.value
    W, b, A, B = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B
    scaling = 8 / math.sqrt(4) if use_rslora else 8 / 4
    x = torch.randn(2, 5, 32)
    expected = x @ W.T + b + scaling * (x @ A.T @ B.T)  # h = W x + b + (alpha / r) B A x
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), x @ (W + scaling * B @ A).T + b, atol=1e-6, rtol=0)


def test_lora_init_is_kaiming_uniform_a_and_zero_b():
    model = tiny()
    peft.get_peft_model(model, peft.LoraConfig(r=4, alpha=8))
    layer = model.encoder.blocks[0].attn.query
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (32, 4)
    assert torch.equal(layer.lora_B, torch.zeros(32, 4))
    # kaiming_uniform_(a=sqrt(5)): U(-bound, bound), bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(32) and layer.lora_A.std() > 0.5 / math.sqrt(3 * 32)


def test_ia3_attention_equals_softmax_attention_with_scaled_keys_and_values():
    model = tiny()
    peft.get_peft_model(model, peft.IA3Config())
    randomise(model)
    attn = model.encoder.blocks[0].attn
    l_k, l_v = attn.key.l_k, attn.value.l_v
    assert l_k.shape == l_v.shape == (32,)
    x = torch.randn(2, 6, 32)
    q = linear(x, attn.query.weight, attn.query.bias)
    k = l_k * linear(x, attn.key.base.weight, attn.key.base.bias)  # l_k ⊙ K
    v = l_v * linear(x, attn.value.base.weight, attn.value.base.bias)  # l_v ⊙ V
    expected = attention_by_hand(q, k, v, attn.proj.weight, attn.proj.bias, n_head=2)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=0)


def test_ia3_mlp_rescales_the_inner_activation():
    model = tiny()
    peft.get_peft_model(model, peft.IA3Config())
    randomise(model)
    mlp = model.encoder.blocks[1].mlp
    l_ff = mlp.proj.l_ff
    assert l_ff.shape == (4 * 32,)
    x = torch.randn(2, 6, 32)
    inner = gelu_tanh(linear(x, mlp.fc.weight, mlp.fc.bias))  # gamma(W_1 x)
    expected = linear(l_ff * inner, mlp.proj.base.weight, mlp.proj.base.bias)  # (l_ff ⊙ gamma(W_1 x)) W_2
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout, placement", [("pre_ln", "houlsby"), ("post_ln", "houlsby"), ("pre_ln", "pfeiffer")])
def test_adapter_block_equals_its_equation(layout, placement):
    model = tiny(layout=layout)
    peft.get_peft_model(model, peft.AdapterConfig(reduction_factor=8, placement=placement))
    randomise(model)
    block = model.encoder.blocks[0]
    assert isinstance(block.attn, peft.AdapterLayer) == (placement == "houlsby")
    attn = block.attn.base if placement == "houlsby" else block.attn

    def adapter(h, layer):  # h + W_up f(W_down h + b_down) + b_up, f = GELU
        down, up = layer.adapter_down, layer.adapter_up
        assert down.weight.shape == (32 // 8, 32) and up.weight.shape == (32, 32 // 8)
        return h + gelu_tanh(h @ down.weight.T + down.bias) @ up.weight.T + up.bias

    def attn_out(h):
        out = plain_attention(h, attn)
        return adapter(out, block.attn) if placement == "houlsby" else out

    def mlp_out(h):
        return adapter(plain_mlp(h, block.mlp.base), block.mlp)

    x = torch.randn(2, 6, 32)
    if layout == "pre_ln":
        x1 = x + attn_out(layer_norm(x, block.ln_1))
        expected = x1 + mlp_out(layer_norm(x1, block.ln_2))
    else:
        x1 = layer_norm(x + attn_out(x), block.ln_1)
        expected = layer_norm(x1 + mlp_out(x1), block.ln_2)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=0)


# -- merge / unmerge ------------------------------------------------------------------------------------------------


def base_name(name):
    return name.replace(".base.", ".")  # encoder.blocks.0.attn.query.base.weight -> ...attn.query.weight


@pytest.mark.parametrize("config", [peft.LoraConfig(r=4, alpha=8, target_modules=ALL_LINEAR), peft.IA3Config()])
def test_merge_gives_the_same_outputs_and_unmerge_restores_the_weights(config):
    model, idx = tiny(), batch()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_out = logits(model, idx)
    peft.get_peft_model(model, config)
    randomise(model)
    unmerged = logits(model, idx)
    assert not torch.allclose(unmerged, base_out, atol=1e-3)

    peft.merge(model)
    merged = logits(model, idx)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert any(not torch.equal(p, original[base_name(n)]) for n, p in model.named_parameters() if not p.requires_grad)
    # a merged layer does not run the method's tensors: poisoning them leaves the output as it was
    saved = [p.detach().clone() for p in trainable(model)]
    with torch.no_grad():
        for p in trainable(model):
            p.fill_(float("nan"))
    assert torch.equal(logits(model, idx), merged)
    with torch.no_grad():
        for p, s in zip(trainable(model), saved):
            p.copy_(s)

    peft.unmerge(model)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, original[base_name(n)]), n  # bit for bit
    assert torch.equal(logits(model, idx), unmerged)


def test_merged_weights_equal_the_folded_update_by_hand():
    model = tiny()
    q0, k0 = model.encoder.blocks[0].attn.query, model.encoder.blocks[0].attn.key
    Wq, Wk, bk = q0.weight.detach().clone(), k0.weight.detach().clone(), k0.bias.detach().clone()
    Wp = model.encoder.blocks[0].mlp.proj.weight.detach().clone()
    lora_model = copy.deepcopy(model)

    peft.get_peft_model(lora_model, peft.LoraConfig(r=4, alpha=6))
    randomise(lora_model)
    q = lora_model.encoder.blocks[0].attn.query
    peft.merge(lora_model)
    torch.testing.assert_close(q.base.weight, Wq + 6 / 4 * q.lora_B @ q.lora_A, atol=1e-6, rtol=0)

    peft.get_peft_model(model, peft.IA3Config())
    randomise(model)
    block = model.encoder.blocks[0]
    peft.merge(model)
    l_k, l_ff = block.attn.key.l_k, block.mlp.proj.l_ff
    for i in range(32):  # row i of W_k and entry i of b_k times l_k[i]
        torch.testing.assert_close(block.attn.key.base.weight[i], l_k[i] * Wk[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(block.attn.key.base.bias[i], l_k[i] * bk[i], atol=1e-6, rtol=0)
    for j in range(4 * 32):  # column j of W_2 times l_ff[j]
        torch.testing.assert_close(block.mlp.proj.base.weight[:, j], l_ff[j] * Wp[:, j], atol=1e-6, rtol=0)


def test_merge_errors():
    model = tiny()
    peft.get_peft_model(model, peft.LoraConfig(r=4, alpha=8))
    with pytest.raises(ValueError, match="not merged"):
        peft.unmerge(model)
    peft.merge(model)
    with pytest.raises(ValueError, match="already merged"):
        peft.merge(model)
    with pytest.raises(ValueError, match="unmerge"), peft.disable_adapters(model):
        pass
    for config in (peft.BitFitConfig(), peft.AdapterConfig(reduction_factor=8)):
        with pytest.raises(ValueError, match="cannot be merged"):
            peft.merge(peft.get_peft_model(tiny(), config))
    # the output head shares its weight with the token embedding: merging into it would change both
    tied = peft.get_peft_model(tiny(), peft.LoraConfig(r=4, alpha=8, target_modules=["query", "head"]))
    with pytest.raises(ValueError, match="tied"):
        peft.merge(tied)
    assert not any(layer.merged for layer in peft.adapter_layers(tied))


# -- disable, save / load, unload -----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", method_configs())
def test_disable_adapters_gives_the_base_models_outputs(config):
    model, idx = tiny(), batch()
    base = copy.deepcopy(model)
    peft.get_peft_model(model, config)
    randomise(model)
    adapted, expected = logits(model, idx), logits(base, idx)
    assert not torch.allclose(adapted, expected, atol=1e-3)
    with peft.disable_adapters(model):
        assert torch.equal(logits(model, idx), expected)
    assert torch.equal(logits(model, idx), adapted)


def test_bitfit_disable_leaves_an_earlier_graph_valid():
    """PPO's pattern: policy forward with grad, reference forward with adapters off, then backward."""
    model, idx = tiny(), batch()
    peft.get_peft_model(model, peft.BitFitConfig())
    _, loss = model(idx, torch.randint(0, V, idx.shape))
    with peft.disable_adapters(model):
        logits(model, idx)
    loss.backward()
    assert all(p.grad is not None for p in trainable(model))


def expected_keys(config):
    """The tensor names a saved adapter of the tiny model (blocks 0 and 1) must hold, listed by hand."""
    blocks = [f"encoder.blocks.{i}" for i in range(2)]
    if isinstance(config, peft.BitFitConfig):
        parts = ["ln_1", "attn.query", "attn.key", "attn.value", "attn.proj", "ln_2", "mlp.fc", "mlp.proj"]
        return {f"{b}.{p}.bias" for b in blocks for p in parts} | {"output_layer.ln_f.bias"}
    if isinstance(config, peft.LoraConfig):
        return {f"{b}.attn.{m}.lora_{X}" for b in blocks for m in ("query", "value") for X in "AB"}
    if isinstance(config, peft.IA3Config):
        return {k for b in blocks for k in (f"{b}.attn.key.l_k", f"{b}.attn.value.l_v", f"{b}.mlp.proj.l_ff")}
    return {
        f"{b}.{s}.adapter_{d}.{w}"
        for b in blocks
        for s in ("attn", "mlp")
        for d in ("down", "up")
        for w in ("weight", "bias")
    }


@pytest.mark.parametrize("config", method_configs())
def test_save_then_load_into_a_fresh_base_reproduces_outputs(config, tmp_path):
    model, idx = tiny(), batch()
    fresh = copy.deepcopy(model)
    peft.get_peft_model(model, config)
    randomise(model)
    path = tmp_path / "adapter.safetensors"
    peft.save_adapter(model, path)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == expected_keys(config)
    peft.load_adapter(fresh, path)
    assert fresh.peft_config == config
    assert torch.equal(logits(fresh, idx), logits(model, idx))


@pytest.mark.parametrize("config", method_configs())
def test_loading_an_adapter_saved_for_another_base_shape_is_refused(config, tmp_path):
    model = peft.get_peft_model(tiny(), config)
    path = tmp_path / "adapter.safetensors"
    peft.save_adapter(model, path)
    with pytest.raises(ValueError, match="n_embd"):
        peft.load_adapter(tiny(n_embd=48), path)


@pytest.mark.parametrize(
    "config, merge",
    [(c, False) for c in method_configs()] + [(peft.LoraConfig(r=4, alpha=8), True), (peft.IA3Config(), True)],
)
def test_unload_restores_the_original_modules_and_outputs(config, merge):
    model, idx = tiny(), batch()
    base = copy.deepcopy(model)
    types = {n: type(m) for n, m in model.named_modules()}
    peft.get_peft_model(model, config)
    one_step(model, idx)
    if merge:
        peft.merge(model)
    peft.unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert isinstance(model.encoder.blocks[0].attn.query, nn.Linear)
    assert isinstance(model.encoder.blocks[0].attn, CausalSelfAttention)
    assert isinstance(model.encoder.blocks[0].mlp, MLP)
    state, base_state = model.state_dict(), base.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)
    assert dict(model.named_buffers()).keys() == dict(base.named_buffers()).keys()  # no leftover copies
    assert torch.equal(logits(model, idx), logits(base, idx))
    assert model.peft_config is None and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("config", [peft.LoraConfig(r=4, alpha=8), peft.IA3Config()])
def test_merge_and_unload_leaves_a_plain_gpt_with_the_adapted_outputs(config):
    model, idx = tiny(), batch()
    types = {n: type(m) for n, m in model.named_modules()}
    peft.get_peft_model(model, config)
    randomise(model)
    query = model.encoder.blocks[0].attn.query
    if isinstance(config, peft.LoraConfig):  # W + (alpha / r) B A, written out
        expected_query = query.base.weight + (8 / 4) * query.lora_B @ query.lora_A
    else:  # IA3 does not touch the query
        expected_query = query.weight.clone()
    adapted = logits(model, idx)
    peft.merge_and_unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert model.peft_config is None and all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model.encoder.blocks[0].attn.query.weight, expected_query.detach())
    torch.testing.assert_close(logits(model, idx), adapted, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_refuses_a_method_that_cannot_merge():
    model = peft.get_peft_model(tiny(), peft.AdapterConfig())
    with pytest.raises(ValueError, match="cannot be merged"):
        peft.merge_and_unload(model)


@pytest.mark.parametrize("config", method_configs()[1:])
def test_generation_with_the_kv_cache_matches_without(config):
    model = peft.get_peft_model(tiny(), config)
    randomise(model)
    idx = batch(B=1, T=4)
    with_cache = model.generate(idx, max_new_tokens=6, temperature=0)
    assert torch.equal(with_cache, model.generate(idx, max_new_tokens=6, temperature=0, use_cache=False))


# -- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", method_configs())
def test_applying_a_method_twice_is_refused(config):
    model = peft.get_peft_model(tiny(), config)
    with pytest.raises(ValueError, match="already carries"):
        peft.get_peft_model(model, config)
    with pytest.raises(ValueError, match="already carries"):  # the method's own apply refuses too
        peft.METHODS[type(config)].apply(model, config)


@pytest.mark.parametrize(
    "config, error, match",
    [
        (peft.LoraConfig(target_modules=["qkv"]), ValueError, "'qkv' matches no"),
        (peft.IA3Config(target_modules=["attn.c_attn"]), ValueError, "'attn.c_attn' matches no"),
        (peft.BitFitConfig(target_modules=["c_fc"]), ValueError, "'c_fc' matches no"),
        (peft.LoraConfig(target_modules=["ln_1"]), TypeError, "nn.Linear.*'encoder.blocks.0.ln_1' is a LayerNorm"),
        (peft.IA3Config(target_modules=["attn"], feedforward_modules=[]), TypeError, "is a CausalSelfAttention"),
        (peft.LoraConfig(r=64), ValueError, "r=64 exceeds min"),
        (peft.IA3Config(target_modules=["key"], feedforward_modules=["mlp.proj"]), ValueError, "feedforward_modules"),
        (peft.AdapterConfig(reduction_factor=64), ValueError, "reduction_factor=64 leaves no bottleneck"),
        (peft.BitFitConfig(target_modules=["head"]), ValueError, "no bias"),
        (peft.BitFitConfig(target_modules=["ln_1"], include_layernorm=False), ValueError, "include_layernorm"),
    ],
)
def test_bad_targets_are_refused_before_the_model_is_changed(config, error, match):
    model = tiny()
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(error, match=match):
        peft.get_peft_model(model, config)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not any(hasattr(m, peft.bitfit.ORIGINAL) for m in model.modules())


def test_bitfit_refuses_a_model_without_biases():
    with pytest.raises(ValueError, match="no bias terms"):
        peft.get_peft_model(tiny(bias=False), peft.BitFitConfig())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: peft.LoraConfig(r=0), "LoraConfig.r must be a positive integer.*got 0"),
        (lambda: peft.LoraConfig(r=2.5), "LoraConfig.r must be a positive integer.*got 2.5"),
        (lambda: peft.LoraConfig(alpha=0), "LoraConfig.alpha must be a positive number.*got 0"),
        (lambda: peft.LoraConfig(lora_dropout=1.0), r"LoraConfig.lora_dropout must be in \[0, 1\).*got 1.0"),
        (lambda: peft.LoraConfig(target_modules="query"), "LoraConfig.target_modules must be a non-empty list"),
        (lambda: peft.LoraConfig(target_modules=[]), "LoraConfig.target_modules must be a non-empty list"),
        (lambda: peft.IA3Config(target_modules=["key", ""]), "IA3Config.target_modules must hold non-empty"),
        (lambda: peft.IA3Config(feedforward_modules="mlp.proj"), "IA3Config.feedforward_modules must be"),
        (lambda: peft.AdapterConfig(reduction_factor=0), "AdapterConfig.reduction_factor must be an integer.*got 0"),
        (lambda: peft.AdapterConfig(placement="middle"), "AdapterConfig.placement must be one of.*'middle'"),
        (lambda: peft.AdapterConfig(non_linearity="sigmoid"), "AdapterConfig.non_linearity must be one of"),
        (lambda: peft.AdapterConfig(init_scale=0.0), "AdapterConfig.init_scale must be a positive number"),
        (lambda: peft.BitFitConfig(target_modules="mlp.fc"), "BitFitConfig.target_modules must be a non-empty"),
        (lambda: peft.BitFitConfig(include_layernorm="yes"), "BitFitConfig.include_layernorm must be True or False"),
    ],
)
def test_bad_config_values_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()
