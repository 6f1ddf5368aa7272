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
from minigpt import GPT, KVCache, preset
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
    """One AdamW step on a random next-token target, without weight decay (which would move every tensor, whether
    or not its gradient reached it)."""
    targets = torch.randint(0, V, idx.shape, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.0)
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
        peft.LoraConfig(r=4, alpha=8, target_modules=["query", "value", "fc"], use_dora=True),
        peft.AdapterConfig(reduction_factor=8, train_layernorm=True),
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
    """Every tensor the method trains moves in one step (from a start where every gradient is non-zero: B = 0 or
    W_up = 0 would leave A or W_down without a gradient in the first step), and nothing else moves."""
    model, idx = tiny(), batch()
    base = [(name, p, p.detach().clone()) for name, p in model.named_parameters()]
    peft.get_peft_model(model, config)
    new = [p for p in model.parameters() if all(p is not q for _, q, _ in base)]
    if not isinstance(config, peft.BitFitConfig):
        randomise(model)
    new_before = [p.detach().clone() for p in new]
    base = [(name, p, p.detach().clone()) for name, p, _ in base]  # after randomise: what the step itself changes
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
        assert changed_base == expected  # every selected bias moved, nothing else did
    elif getattr(config, "train_layernorm", False):  # the adapters and every LayerNorm's gain and bias
        expected = {n for n, _, _ in base if ".ln_" in n}
        assert {n for n, p, _ in base if p.requires_grad} == expected and changed_base == expected
        assert all(not torch.equal(p, before) for p, before in zip(new, new_before))
    else:
        assert changed_base == set()  # every base tensor bit-identical
        assert all(not p.requires_grad for _, p, _ in base)
        assert all(p.requires_grad for p in new) and len(trainable(model)) == len(new)
        assert all(not torch.equal(p, before) for p, before in zip(new, new_before))  # every one moved


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


@pytest.mark.parametrize("config", [peft.LoraConfig(r=4, alpha=8, target_modules=ALL_LINEAR), peft.IA3Config()])
def test_merge_holds_the_pre_merge_copies_only_while_merged_and_outside_the_state_dict(config):
    """MergeableLayer's docstring: the pre-merge weight (and, for IA3's output scaling, bias) is kept as a
    non-persistent buffer while merged, and dropped by unmerge: a copy of every adapted weight must neither stay in
    memory after unmerging nor land in a checkpoint written while merged."""
    model = tiny()
    peft.get_peft_model(model, config)
    randomise(model)
    layers = [m for m in model.modules() if isinstance(m, peft.base.MergeableLayer)]
    originals = [(m.base.weight.detach().clone(), m.base.bias.detach().clone()) for m in layers]
    keys, buffers = set(model.state_dict()), set(dict(model.named_buffers()))
    peft.merge(model)
    assert set(model.state_dict()) == keys
    for layer, (W, b) in zip(layers, originals):
        assert torch.equal(layer.weight_before_merge, W)
        bias_scaled = isinstance(layer, peft.ia3.IA3Linear) and not layer.scale_input  # l ⊙ (W x + b)
        assert (layer.bias_before_merge is not None) == bias_scaled
        if bias_scaled:
            assert torch.equal(layer.bias_before_merge, b)
    peft.unmerge(model)
    assert all(m.weight_before_merge is None and m.bias_before_merge is None for m in layers)
    assert set(dict(model.named_buffers())) == buffers


def test_merge_and_unmerge_refuse_a_partly_merged_model_and_change_nothing():
    """One layer merged by hand (layer.merge()): peft.merge must refuse before merging the others, and peft.unmerge
    must refuse before unmerging the merged one, so the model is never left in a third, mixed state."""
    model = tiny()
    peft.get_peft_model(model, peft.LoraConfig(r=4, alpha=8))
    randomise(model)
    layers = peft.adapter_layers(model)  # blocks.0 query, value, blocks.1 query, value
    assert len(layers) == 4
    layers[3].merge()  # the last one: a merge that went ahead would merge the three before it first
    with pytest.raises(ValueError, match="already merged"):
        peft.merge(model)
    assert [layer.merged for layer in layers] == [False, False, False, True]
    layers[0].merge()  # the first one: an unmerge that went ahead would unmerge it first
    with pytest.raises(ValueError, match="not merged"):
        peft.unmerge(model)
    assert [layer.merged for layer in layers] == [True, False, False, True]


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
    if isinstance(config, peft.LoraConfig) and config.use_dora:  # q, v and fc: A, B and the magnitude m
        return {f"{b}.{m}.lora_{X}" for b in blocks for m in ("attn.query", "attn.value", "mlp.fc")
                for X in ("A", "B", "magnitude")}
    if isinstance(config, peft.LoraConfig):
        return {f"{b}.attn.{m}.lora_{X}" for b in blocks for m in ("query", "value") for X in "AB"}
    if isinstance(config, peft.IA3Config):
        return {k for b in blocks for k in (f"{b}.attn.key.l_k", f"{b}.attn.value.l_v", f"{b}.mlp.proj.l_ff")}
    adapters = {
        f"{b}.{s}.adapter_{d}.{w}"
        for b in blocks
        for s in ("attn", "mlp")
        for d in ("down", "up")
        for w in ("weight", "bias")
    }
    if not config.train_layernorm:
        return adapters
    layernorms = {f"{b}.{ln}.{w}" for b in blocks for ln in ("ln_1", "ln_2") for w in ("weight", "bias")}
    return adapters | layernorms | {"output_layer.ln_f.weight", "output_layer.ln_f.bias"}


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


def test_an_adapter_is_refused_by_a_base_with_the_other_gelu_and_an_older_file_counts_as_tanh(tmp_path):
    from safetensors.torch import load_file, save_file

    config = peft.LoraConfig(r=2, alpha=4)
    path = tmp_path / "adapter.safetensors"
    peft.save_adapter(peft.get_peft_model(tiny(activation="gelu"), config), path)
    with pytest.raises(ValueError, match="activation"):
        peft.load_adapter(tiny(activation="gelu_tanh"), path)
    # a file written before the base's activation was recorded: its base had GPT-2's tanh GELU
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    base = {k: v for k, v in json.loads(meta["base"]).items() if k != "activation"}
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={**meta, "base": json.dumps(base)})
    assert peft.load_adapter(tiny(activation="gelu_tanh"), old).peft_config == config
    with pytest.raises(ValueError, match="activation"):
        peft.load_adapter(tiny(activation="gelu"), old)


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
    attn = model.encoder.blocks[0].attn
    W_q, W_k, b_k = (t.detach().clone() for t in (attn.query.weight, attn.key.weight, attn.key.bias))
    peft.get_peft_model(model, config)
    randomise(model)
    query, key = attn.query, attn.key
    if isinstance(config, peft.LoraConfig):  # W + (alpha / r) B A, written out; the key untouched
        expected = {"query.weight": W_q + (8 / 4) * query.lora_B @ query.lora_A, "key.weight": W_k, "key.bias": b_k}
    else:  # IA3 leaves the query alone and scales row i of W_k and entry i of b_k by l_k[i]
        expected = {"query.weight": W_q, "key.weight": key.l_k[:, None] * W_k, "key.bias": key.l_k * b_k}
    expected = {k: v.detach().clone() for k, v in expected.items()}
    adapted = logits(model, idx)
    peft.merge_and_unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert model.peft_config is None and all(p.requires_grad for p in model.parameters())
    merged = dict(model.encoder.blocks[0].attn.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, idx), adapted, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_refuses_a_method_that_cannot_merge():
    model = peft.get_peft_model(tiny(), peft.AdapterConfig())
    with pytest.raises(ValueError, match="cannot be merged"):
        peft.merge_and_unload(model)


def folded_by_hand(plain, model, config):
    """plain with the adapted model's update written into its weights by hand (LoRA, DoRA, IA3, BitFit): a GPT
    that must compute what the adapted model computes, without any peft code."""
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, peft.lora.LoraLinear):
                W = params[name + ".weight"]
                V_ = W + config.scaling * layer.lora_B @ layer.lora_A
                if config.use_dora:  # m ⊙ V / ||V||_c, row by row
                    V_ = layer.lora_magnitude[:, None] * V_ / torch.sqrt((V_**2).sum(1, keepdim=True))
                W.copy_(V_)
            elif isinstance(layer, peft.ia3.IA3Linear):
                l, W = layer.vector, params[name + ".weight"]
                if layer.scale_input:
                    W.mul_(l[None, :])
                else:
                    W.mul_(l[:, None])
                    params[name + ".bias"].mul_(l)
        if isinstance(config, peft.BitFitConfig):
            for name, p in model.named_parameters():
                if p.requires_grad:
                    params[name].copy_(p)
    return plain


@pytest.mark.parametrize("config", method_configs()[:3] + method_configs()[4:5])
def test_generation_with_the_kv_cache_equals_the_update_folded_in_by_hand(config):
    """Cached greedy generation of the adapted model equals a plain GPT holding the update written in by hand (so
    a wrong update fails it, not only a cache that disagrees with the uncached pass)."""
    plain = tiny()
    model = peft.get_peft_model(copy.deepcopy(plain), config)
    randomise(model)
    folded = folded_by_hand(copy.deepcopy(plain), model, config)
    idx = batch(B=2, T=4)
    tokens = model.generate(idx, max_new_tokens=20, temperature=1.0, seed=3)  # 24 of block 32: cached all the way
    assert torch.equal(tokens, folded.generate(idx, max_new_tokens=20, temperature=1.0, seed=3, use_cache=False))
    cache, steps = KVCache(model.config.n_layer), []  # and the logits of every cached step
    with torch.no_grad():
        steps.append(model(tokens[:, :4], cache=cache)[0])
        steps += [model(tokens[:, t : t + 1], cache=cache)[0] for t in range(4, 24)]
    expected = logits(folded, tokens)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=1e-5)
    assert (expected - logits(plain, tokens)).abs().max() > 1e-3  # the update does change the outputs


@pytest.mark.parametrize("config", [peft.AdapterConfig(reduction_factor=8),
                                    peft.AdapterConfig(reduction_factor=8, train_layernorm=True)])
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
    assert not peft.base.trained_in_place(model)


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


# -- the adapter API: what is saved, nesting, BitFit folded in (issue 18) -------------------------------------------


@pytest.mark.parametrize("config", method_configs())
def test_save_adapter_picks_the_methods_tensors_whatever_requires_grad_says(config, tmp_path):
    """After model.requires_grad_(False) (a frozen copy, PPO's reference) the file still holds the method's tensors,
    and after requires_grad_(True) it still holds only those."""
    model, idx = tiny(), batch()
    fresh = copy.deepcopy(model)
    peft.get_peft_model(model, config)
    randomise(model)
    for flag in (False, True):
        model.requires_grad_(flag)
        path = tmp_path / f"adapter-{flag}.safetensors"
        peft.save_adapter(model, path)
        with safe_open(str(path), framework="pt") as f:
            assert set(f.keys()) == expected_keys(config)
    peft.load_adapter(fresh, tmp_path / "adapter-False.safetensors")
    assert torch.equal(logits(fresh, idx), logits(model, idx))


@pytest.mark.parametrize("config", method_configs())
def test_disable_adapters_nests(config):
    model, idx = tiny(), batch()
    base = copy.deepcopy(model)
    peft.get_peft_model(model, config)
    randomise(model)
    adapted, expected = logits(model, idx), logits(base, idx)
    with peft.disable_adapters(model):
        with peft.disable_adapters(model):
            assert torch.equal(logits(model, idx), expected)
        assert torch.equal(logits(model, idx), expected)  # still the base after the inner block ends
    assert torch.equal(logits(model, idx), adapted)
    with pytest.raises(RuntimeError), peft.disable_adapters(model):  # an error inside still restores the adapter
        raise RuntimeError("inside")
    assert torch.equal(logits(model, idx), adapted)


def test_bitfit_merge_and_unload_keeps_the_trained_biases_in_a_plain_gpt():
    model, idx = tiny(), batch()
    types = {n: type(m) for n, m in model.named_modules()}
    buffers = set(dict(model.named_buffers()))
    peft.get_peft_model(model, peft.BitFitConfig())
    randomise(model)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    adapted = logits(model, idx)
    peft.merge_and_unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert set(dict(model.named_buffers())) == buffers  # the saved originals are gone
    assert model.peft_config is None and all(p.requires_grad for p in model.parameters())
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in trained.items())  # the trained biases, now the model's own
    assert torch.equal(logits(model, idx), adapted)


# -- Houlsby adapters with their LayerNorms trained ------------------------------------------------------------------


def test_adapters_with_layernorms_train_them_in_place_and_give_them_back():
    model, idx = tiny(), batch()
    base = copy.deepcopy(model)
    peft.get_peft_model(model, peft.AdapterConfig(reduction_factor=8, train_layernorm=True))
    m = 32 // 8
    assert peft.count_parameters(model)[0] == 2 * 2 * (2 * m * 32 + m + 32) + (2 * 2 + 1) * 2 * 32
    randomise(model)
    block, base_block = model.encoder.blocks[0], base.encoder.blocks[0]
    assert not torch.equal(block.ln_1.weight, base_block.ln_1.weight)
    x = torch.randn(2, 6, 32)  # the block by hand, with the trained LayerNorms

    def adapter(h, layer):
        down, up = layer.adapter_down, layer.adapter_up
        return h + gelu_tanh(h @ down.weight.T + down.bias) @ up.weight.T + up.bias

    x1 = x + adapter(plain_attention(layer_norm(x, block.ln_1), base_block.attn), block.attn)
    expected = x1 + adapter(plain_mlp(layer_norm(x1, block.ln_2), base_block.mlp), block.mlp)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=0)
    with peft.disable_adapters(model):  # the original LayerNorms swapped in
        assert torch.equal(logits(model, idx), logits(base, idx))
    peft.unload(model)
    state, base_state = model.state_dict(), base.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)


def test_trainable_counts_on_gpt2_with_dora_and_layernorms():
    def count(config):
        with torch.device("meta"):
            model = GPT(preset("gpt2"))
        return peft.count_parameters(peft.get_peft_model(model, config))[0]

    assert count(peft.LoraConfig(r=8, use_dora=True)) == L * 2 * (8 * C + C * 8 + C)  # A, B and m (out,)
    assert count(peft.AdapterConfig(reduction_factor=16, train_layernorm=True)) == \
        L * 2 * houlsby(48) + (2 * L + 1) * 2 * C  # ln_1, ln_2 per block and ln_f: gain and bias


# -- DoRA -------------------------------------------------------------------------------------------------------------


def dora_by_hand(x, W, b, A, B, m, scaling):
    """DoRA eq. 5: W' = m (W_0 + s B A) / ||W_0 + s B A||_c, the norm of each output's weight vector; h = W' x + b."""
    V_ = W + scaling * B @ A  # (out, in)
    norm = torch.sqrt((V_**2).sum(dim=1))  # (out,)
    return x @ ((m / norm)[:, None] * V_).T + b


def test_dora_starts_as_the_base_with_m_the_row_norms():
    model, idx = tiny(), batch()
    before = logits(model, idx)
    W = model.encoder.blocks[0].attn.query.weight.detach().clone()
    peft.get_peft_model(model, peft.LoraConfig(r=4, alpha=8, use_dora=True))
    layer = model.encoder.blocks[0].attn.query
    assert layer.lora_magnitude.shape == (32,)
    torch.testing.assert_close(layer.lora_magnitude, torch.sqrt((W**2).sum(dim=1)), atol=1e-7, rtol=1e-6)
    assert torch.equal(logits(model, idx), before)


def test_dora_layer_equals_the_papers_equation():
    model = tiny()
    peft.get_peft_model(model, peft.LoraConfig(r=4, alpha=8, target_modules=["query", "fc"], use_dora=True))
    randomise(model)
    for layer in (model.encoder.blocks[1].attn.query, model.encoder.blocks[0].mlp.fc):
        x = torch.randn(2, 5, 32)
        expected = dora_by_hand(x, layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B,
                                layer.lora_magnitude, 8 / 4)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_dora_gradients_treat_the_norm_as_a_constant():
    """The paper's Section 4.3 (and huggingface peft): ||W_0 + s B A||_c gets no gradient. By hand on leaf copies,
    with the norm detached; without detaching the gradients of A, B and m would differ."""
    model = tiny()
    peft.get_peft_model(model, peft.LoraConfig(r=4, alpha=8, use_dora=True))
    randomise(model)
    layer = model.encoder.blocks[0].attn.value
    x, G = torch.randn(3, 7, 32), torch.randn(3, 7, 32)
    (layer(x) * G).sum().backward()

    def by_hand(detach):
        A, B, m = (t.detach().clone().requires_grad_(True) for t in (layer.lora_A, layer.lora_B, layer.lora_magnitude))
        V_ = layer.base.weight + 2.0 * B @ A
        norm = torch.sqrt((V_**2).sum(dim=1))
        norm = norm.detach() if detach else norm
        ((x @ ((m / norm)[:, None] * V_).T + layer.base.bias) * G).sum().backward()
        return A.grad, B.grad, m.grad

    ours = (layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad)
    for g, expected in zip(ours, by_hand(detach=True)):
        torch.testing.assert_close(g, expected, atol=1e-4, rtol=1e-4)
    assert any(not torch.allclose(g, e, atol=1e-4, rtol=1e-4) for g, e in zip(ours, by_hand(detach=False)))
    assert layer.base.weight.grad is None


def test_dora_merge_folds_the_magnitude_and_direction_in_and_unmerge_restores_w0():
    model, idx = tiny(), batch()
    peft.get_peft_model(model, peft.LoraConfig(r=4, alpha=8, use_dora=True))
    randomise(model)
    layer = model.encoder.blocks[1].attn.query
    W0 = layer.base.weight.detach().clone()
    V_ = W0 + 2.0 * layer.lora_B @ layer.lora_A
    expected_W = (layer.lora_magnitude[:, None] * V_ / torch.sqrt((V_**2).sum(1, keepdim=True))).detach()
    unmerged = logits(model, idx)
    peft.merge(model)
    torch.testing.assert_close(layer.base.weight, expected_W, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, idx), unmerged, atol=1e-5, rtol=0)
    peft.unmerge(model)
    assert torch.equal(layer.base.weight, W0)
    assert torch.equal(logits(model, idx), unmerged)


def test_dora_with_dropout_drops_the_input_of_both_added_terms():
    """In training with lora_dropout p: h = W x + b + (m/n - 1) W d(x) + (m/n) s B A d(x), d(x) = dropout(x) (as
    huggingface peft computes it). With one-hot inputs a row's addition is all there or all gone (times 1/(1-p))."""
    model = tiny()
    peft.get_peft_model(model, peft.LoraConfig(r=4, alpha=8, lora_dropout=0.5, use_dora=True))
    randomise(model)
    layer = model.encoder.blocks[0].attn.query.train()
    x = torch.eye(32).repeat(4, 1)  # 128 rows, one input feature each
    torch.manual_seed(0)
    added = (layer(x) - layer.base(x)).detach()
    full = (dora_by_hand(x, layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude, 2.0)
            - layer.base(x)).detach()  # the whole addition without dropout
    kept = [torch.allclose(a, f / 0.5, atol=1e-5) for a, f in zip(added, full)]
    dropped = [torch.equal(a, torch.zeros_like(a)) for a in added]
    assert all(k or d for k, d in zip(kept, dropped)) and 20 < sum(dropped) < 108


# -- training-time behaviour: gradients by hand, dropout, initialisation ----------------------------------------------


def test_lora_gradients_by_hand():
    """y = W x + b + s B A x with upstream gradient G: dL/dB = s G^T (A x), dL/dA = s (B^T G)^T x."""
    model = tiny()
    peft.get_peft_model(model, peft.LoraConfig(r=4, alpha=8))
    randomise(model)
    layer = model.encoder.blocks[0].attn.query
    x, G = torch.randn(9, 32), torch.randn(9, 32)
    (layer(x) * G).sum().backward()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    torch.testing.assert_close(layer.lora_B.grad, 2.0 * G.T @ (x @ A.T), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, 2.0 * (G @ B).T @ x, atol=1e-5, rtol=1e-5)
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


def test_ia3_gradients_by_hand():
    """l ⊙ (W x + b): dL/dl = sum over tokens of G ⊙ (W x + b); W (l ⊙ x) + b: dL/dl = sum of (G W) ⊙ x."""
    model = tiny()
    peft.get_peft_model(model, peft.IA3Config())
    randomise(model)
    key, proj = model.encoder.blocks[0].attn.key, model.encoder.blocks[1].mlp.proj
    x, G = torch.randn(9, 32), torch.randn(9, 32)
    (key(x) * G).sum().backward()
    torch.testing.assert_close(key.l_k.grad, (G * (x @ key.base.weight.T + key.base.bias)).sum(0), atol=1e-5,
                               rtol=1e-5)
    x = torch.randn(9, 128)
    (proj(x) * G).sum().backward()
    torch.testing.assert_close(proj.l_ff.grad, ((G @ proj.base.weight) * x).sum(0), atol=1e-5, rtol=1e-5)
    assert key.base.weight.grad is None and proj.base.weight.grad is None


def gelu_tanh_grad(x):
    """d/dx of GPT-2's tanh GELU, 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)."""
    k = math.sqrt(2 / math.pi)
    t = torch.tanh(k * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * k * (1 + 3 * 0.044715 * x**2)


def test_adapter_gradients_by_hand():
    """y = h + W_up f(z) + b_up, z = W_down h + b_down, h the MLP's output: dW_up = G^T f(z), db_up = sum G,
    dz = (G W_up) ⊙ f'(z), dW_down = dz^T h, db_down = sum dz."""
    model = tiny()
    peft.get_peft_model(model, peft.AdapterConfig(reduction_factor=8))
    randomise(model)
    layer = model.encoder.blocks[0].mlp
    x, G = torch.randn(9, 32), torch.randn(9, 32)
    (layer(x) * G).sum().backward()
    down, up = layer.adapter_down, layer.adapter_up
    h = plain_mlp(x, layer.base).detach()
    z = h @ down.weight.detach().T + down.bias.detach()
    dz = (G @ up.weight.detach()) * gelu_tanh_grad(z)
    for got, expected in ((up.weight.grad, G.T @ gelu_tanh(z)), (up.bias.grad, G.sum(0)),
                          (down.weight.grad, dz.T @ h), (down.bias.grad, dz.sum(0))):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in layer.base.parameters())


def randomised_layer(layer, seed=5):
    """Every own tensor of a standalone PEFT layer (and its base) moved to random values, so each term counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return layer


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_input_gradient_is_g_times_the_adapted_weight(use_dora):
    """h = W' x + b, so dL/dx = G W' with W' = W_0 + s B A (LoRA) or (m / n) ⊙ (W_0 + s B A) row by row (DoRA; n
    depends on the weights only). The gradient reaching the layers below must cross the low-rank branch and, for
    DoRA, the (m / n - 1) W_0 x term: detaching either would train the adapters underneath on the wrong gradient."""
    torch.manual_seed(0)
    layer = randomised_layer(peft.lora.LoraLinear(nn.Linear(16, 12), r=3, scaling=1.5, dropout=0.0,
                                                  use_dora=use_dora))
    x, G = torch.randn(5, 16, requires_grad=True), torch.randn(5, 12)
    (layer(x) * G).sum().backward()
    W, A, B = (t.detach() for t in (layer.base.weight, layer.lora_A, layer.lora_B))
    W_adapted = W + 1.5 * B @ A
    if use_dora:
        m = layer.lora_magnitude.detach()
        W_adapted = (m / torch.sqrt((W_adapted**2).sum(dim=1)))[:, None] * W_adapted
    torch.testing.assert_close(x.grad, G @ W_adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale_input", [False, True])
def test_ia3_input_gradient_by_hand(scale_input):
    """l ⊙ (W x + b): dL/dx = (G ⊙ l) W; W (l ⊙ x) + b: dL/dx = (G W) ⊙ l. The vector must scale the gradient that
    flows on to the layers below, not only the forward pass."""
    torch.manual_seed(0)
    layer = randomised_layer(peft.ia3.IA3Linear(nn.Linear(16, 12), "l", scale_input=scale_input))
    x, G = torch.randn(5, 16, requires_grad=True), torch.randn(5, 12)
    (layer(x) * G).sum().backward()
    W, l = layer.base.weight.detach(), layer.l.detach()
    expected = (G @ W) * l if scale_input else (G * l) @ W
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-5)


def test_adapter_input_gradient_by_hand():
    """y = h + W_up f(W_down h + b_down) + b_up, h = W_0 x + b_0: dL/dh = G + ((G W_up) ⊙ f'(z)) W_down, dL/dx =
    (dL/dh) W_0. Both the skip connection and the bottleneck carry gradient back; a detached bottleneck input would
    leave only G."""
    torch.manual_seed(0)
    layer = randomised_layer(peft.adapter.BottleneckAdapter(nn.Linear(12, 12), 12, 3, "gelu", 1e-3))
    x, G = torch.randn(5, 12, requires_grad=True), torch.randn(5, 12)
    (layer(x) * G).sum().backward()
    W0, b0 = layer.base.weight.detach(), layer.base.bias.detach()
    down, up = layer.adapter_down, layer.adapter_up
    h = x.detach() @ W0.T + b0
    z = h @ down.weight.detach().T + down.bias.detach()
    dh = G + ((G @ up.weight.detach()) * gelu_tanh_grad(z)) @ down.weight.detach()
    torch.testing.assert_close(x.grad, dh @ W0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name, f",
    [
        ("gelu", gelu_tanh),  # BERT's tanh form, 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))
        ("relu", lambda z: torch.where(z > 0, z, torch.zeros_like(z))),
        ("swish", lambda z: z / (1 + torch.exp(-z))),  # z sigmoid(z)
        ("tanh", lambda z: (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z))),
    ],
)
def test_adapter_non_linearity_is_the_named_function(name, f):
    """AdapterConfig.non_linearity reaches the bottleneck as the function it names, written out by hand. The
    pre-activations span several units (where GELU's tanh form and its erf form differ by ~1e-4, and Mish, Hardtanh
    or SiLU differ from swish, tanh and ReLU by far more), and W_up is O(1), so a swapped function shows."""
    model = tiny()
    peft.get_peft_model(model, peft.AdapterConfig(reduction_factor=8, non_linearity=name))
    mlp = model.encoder.blocks[0].mlp
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 5, 32, generator=g)
    h = plain_mlp(x, mlp.base).detach()
    mean = h.mean(dim=(0, 1))  # the MLP's output varies little around its bias: W_down sized so that z is O(2)
    with torch.no_grad():
        W_down = 2 * torch.randn(mlp.adapter_down.weight.shape, generator=g) / ((h - mean).std() * math.sqrt(32))
        mlp.adapter_down.weight.copy_(W_down)
        mlp.adapter_down.bias.copy_(0.5 * torch.randn(mlp.adapter_down.bias.shape, generator=g) - W_down @ mean)
        mlp.adapter_up.weight.copy_(torch.randn(mlp.adapter_up.weight.shape, generator=g))
    z = h @ mlp.adapter_down.weight.T + mlp.adapter_down.bias  # (3, 5, m)
    assert z.abs().max() > 3 and ((z.abs() > 0.5) & (z.abs() < 3)).float().mean() > 0.4
    expected = h + f(z) @ mlp.adapter_up.weight.T + mlp.adapter_up.bias
    torch.testing.assert_close(mlp(x), expected, atol=2e-6, rtol=0)


def test_bitfit_gradients_by_hand():
    """The final LayerNorm's bias, through the real loss: logits = LN_f(h) W_e^T, so dL/db = sum over tokens of
    (softmax(logits) - onehot(target)) W_e / N. And mlp.fc's bias in one MLP: dL/db_1 = sum (G W_2) ⊙
    gelu'(W_1 x + b_1)."""
    model, idx = tiny(), batch()
    peft.get_peft_model(model, peft.BitFitConfig())
    randomise(model)
    targets = torch.randint(0, V, idx.shape, generator=torch.Generator().manual_seed(3))
    _, loss = model(idx, targets)
    loss.backward()
    with torch.no_grad():
        lg = model(idx)[0].reshape(-1, V)
        d_logits = (torch.softmax(lg, -1) - nn.functional.one_hot(targets.reshape(-1), V)) / lg.size(0)
        expected = (d_logits @ model.input_layer.wte.weight).sum(0)
    torch.testing.assert_close(model.output_layer.ln_f.bias.grad, expected, atol=1e-6, rtol=1e-5)
    assert model.output_layer.ln_f.weight.grad is None and model.input_layer.wte.weight.grad is None

    mlp = model.encoder.blocks[0].mlp
    mlp.fc.bias.grad = None
    x, G = torch.randn(9, 32), torch.randn(9, 32)
    (mlp(x) * G).sum().backward()
    z = (x @ mlp.fc.weight.T + mlp.fc.bias).detach()
    torch.testing.assert_close(mlp.fc.bias.grad, ((G @ mlp.proj.weight.detach()) * gelu_tanh_grad(z)).sum(0),
                               atol=1e-5, rtol=1e-4)


def test_lora_dropout_acts_on_the_input_of_the_low_rank_branch_only():
    """h = W x + b + s B A dropout(x): with one-hot inputs each row's update is all there (times 1 / (1 - p)) or all
    gone; dropout on the update itself would zero single entries. Evaluation mode: no dropout."""
    model = tiny()
    peft.get_peft_model(model, peft.LoraConfig(r=4, alpha=8, lora_dropout=0.5))
    randomise(model)
    layer = model.encoder.blocks[0].attn.query.train()
    x = torch.eye(32).repeat(4, 1)  # 128 rows
    full = (2.0 * x @ layer.lora_A.T @ layer.lora_B.T).detach()  # the update without dropout
    torch.manual_seed(0)
    update = (layer(x) - layer.base(x)).detach()
    kept = [torch.allclose(u, f / 0.5, atol=1e-5) for u, f in zip(update, full)]
    dropped = [torch.equal(u, torch.zeros_like(u)) for u in update]
    assert all(k or d for k, d in zip(kept, dropped)) and 20 < sum(dropped) < 108
    layer.eval()
    torch.testing.assert_close(layer(x) - layer.base(x), full, atol=1e-6, rtol=0)


def test_lora_a_is_kaiming_uniform_over_its_fan_in():
    """nn.Linear's default (kaiming_uniform_, a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), std 1/sqrt(3 in). B = 0."""
    torch.manual_seed(0)
    for n_in in (64, 512):
        layer = peft.lora.LoraLinear(nn.Linear(n_in, 256), r=64, scaling=1.0, dropout=0.0)
        bound = 1 / math.sqrt(n_in)
        A = layer.lora_A.detach()
        assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
        assert abs(A.std().item() / (bound / math.sqrt(3)) - 1) < 0.03 and abs(A.mean().item()) < 0.01 * bound
        assert torch.equal(layer.lora_B, torch.zeros(256, 64))


@pytest.mark.parametrize("scale", [1e-3, 1e-2])
def test_adapter_w_down_is_a_truncated_normal_of_std_init_scale(scale):
    """Houlsby's near-identity init: N(0, init_scale) truncated at two standard deviations, whose standard deviation
    is 0.8796 init_scale; W_up and both biases zero."""
    torch.manual_seed(0)
    layer = peft.adapter.BottleneckAdapter(nn.Linear(512, 512), 512, 128, "gelu", scale)
    W = layer.adapter_down.weight.detach()
    assert W.abs().max() <= 2 * scale and W.abs().max() > 1.9 * scale
    assert abs(W.std().item() / (0.8796 * scale) - 1) < 0.03 and abs(W.mean().item()) < 0.02 * scale
    for t in (layer.adapter_down.bias, layer.adapter_up.weight, layer.adapter_up.bias):
        assert torch.equal(t, torch.zeros_like(t))


# -- adapter tensors kept in float32 when the model is cast to bf16 ----------------------------------------------------


@pytest.mark.parametrize("config", method_configs()[1:])
@pytest.mark.parametrize("cast_first", [False, True])
def test_fp32_adapter_keeps_the_methods_tensors_float32_in_a_bf16_model(config, cast_first):
    reference, idx = tiny(), batch()
    peft.get_peft_model(reference, config)
    randomise(reference)
    model = tiny()
    if cast_first:
        model.to(torch.bfloat16)
    peft.get_peft_model(model, config, fp32_adapter=True)
    model.load_state_dict(reference.state_dict())  # the same values, whatever the dtypes
    model.to(torch.bfloat16)
    owned = peft.adapter_state_dict(model)
    for name, p in model.named_parameters():
        in_place = isinstance(config, peft.AdapterConfig) and config.train_layernorm and ".ln_" in name
        assert p.dtype == (torch.float32 if name in owned and not in_place else torch.bfloat16), name
    out = logits(model, idx)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), logits(reference, idx), atol=0.1, rtol=0.05)
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad.dtype == p.dtype for p in trainable(model))
    without = tiny()
    peft.get_peft_model(without, config)
    without.to(torch.bfloat16)  # the default: everything follows the cast
    assert all(p.dtype == torch.bfloat16 for p in without.parameters())


def test_bitfit_keeps_each_original_bias_under_its_documented_name():
    """notebooks/06a_bitfit.ipynb reads the copies as module.bitfit_original_bias (peft.bitfit.ORIGINAL)."""
    model = tiny()
    fc_bias = model.encoder.blocks[0].mlp.fc.bias.detach().clone()
    peft.get_peft_model(model, peft.BitFitConfig())
    randomise(model)
    fc = model.encoder.blocks[0].mlp.fc
    assert peft.bitfit.ORIGINAL == "bitfit_original_bias"
    assert torch.equal(getattr(fc, peft.bitfit.ORIGINAL), fc_bias) and not torch.equal(fc.bias, fc_bias)
