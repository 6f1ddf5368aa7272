"""The GPT checked against its equations written out by hand, and its behaviour (causality, KV cache, padding)."""

import math

import pytest
import torch

from minigpt import GPT, GPTConfig, KVCache, preset, sample_next_token
from minigpt.model import disable_dropout

V = 61


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(preset("tiny", vocab_size=V, **overrides))
    # GPT-2 init leaves biases at zero and LayerNorm at (1, 0); randomise them so the tests see every term
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# -- the equations by hand ------------------------------------------------------------------------------------


def layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def linear(x, lin):
    return x @ lin.weight.T + lin.bias


def attention_by_hand(x, attn, n_head):
    """softmax(Q K^T / sqrt(d_k) + causal mask) V, one head at a time, heads concatenated, then W_O."""
    T, C = x.shape[-2:]
    d = C // n_head
    q, k, v = linear(x, attn.query), linear(x, attn.key), linear(x, attn.value)
    heads = []
    for h in range(n_head):
        qh, kh, vh = (t[..., h * d : (h + 1) * d] for t in (q, k, v))
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ vh)
    return linear(torch.cat(heads, dim=-1), attn.proj)


def mlp_by_hand(x, mlp):
    return linear(gelu_tanh(linear(x, mlp.fc)), mlp.proj)


def test_attention_equals_the_formula():
    model = tiny()
    attn = model.encoder.blocks[0].attn
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        assert torch.allclose(attn(x), attention_by_hand(x, attn, 2), atol=1e-5)


@pytest.mark.parametrize("layout", ["pre_ln", "post_ln"])
def test_block_equals_its_equations(layout):
    model = tiny(layout=layout)
    block = model.encoder.blocks[1]
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        if layout == "pre_ln":  # GPT-2
            h = x + attention_by_hand(layer_norm(x, block.ln_1), block.attn, 2)
            expected = h + mlp_by_hand(layer_norm(h, block.ln_2), block.mlp)
        else:  # BitFit paper, eqs. (1)-(5): LN after each residual sum
            h3 = layer_norm(attention_by_hand(x, block.attn, 2) + x, block.ln_1)
            expected = layer_norm(mlp_by_hand(h3, block.mlp) + h3, block.ln_2)
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_exact_gelu_mlp_equals_the_erf_formula_and_differs_from_the_tanh_one():
    """activation="gelu": GELU(z) = z Phi(z) = 0.5 z (1 + erf(z / sqrt 2)); the default stays GPT-2's tanh form."""
    exact, approx = tiny(activation="gelu").encoder.blocks[0].mlp, tiny().encoder.blocks[0].mlp
    x = 3 * torch.randn(4, 6, 32)
    with torch.no_grad():
        z = linear(x, exact.fc)
        expected = linear(0.5 * z * (1 + torch.erf(z / math.sqrt(2))), exact.proj)
        tanh_form = linear(gelu_tanh(z), exact.proj)
        assert torch.allclose(exact(x), expected, atol=1e-6)
        assert (expected - tanh_form).abs().max() > 1e-5  # so the check above tells the two apart
        assert torch.allclose(approx(x), mlp_by_hand(x, approx), atol=1e-6)


def model_by_hand(model, idx):
    """P(u) = softmax(LN_f(h_n) W_e^T) with h_0 = W_e[u] + W_p and pre-LN blocks: the logits, without dropout."""
    T = idx.size(1)
    h = model.input_layer.wte.weight[idx] + model.input_layer.wpe.weight[torch.arange(T)]
    for block in model.encoder.blocks:
        h = h + attention_by_hand(layer_norm(h, block.ln_1), block.attn, model.config.n_head)
        h = h + mlp_by_hand(layer_norm(h, block.ln_2), block.mlp)
    return layer_norm(h, model.output_layer.ln_f) @ model.input_layer.wte.weight.T  # tied head


def test_whole_model_equals_the_three_parts_by_hand():
    model = tiny()
    idx = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        expected = model_by_hand(model, idx)
        logits, _ = model(idx)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_attention_mask_for_padding_by_hand():
    """Query i (the i-th of the last T of S positions) may see key j iff j <= S - T + i and j is a real token, and
    it always sees itself, so a left-padding query sees one key (no all -inf row for SDPA to turn into NaN)."""
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    S = key_mask.size(1)
    for T in (S, 3, 1):
        expected = torch.zeros(3, 1, T, S, dtype=torch.bool)
        for b in range(3):
            for i in range(T):
                for j in range(S):
                    expected[b, 0, i, j] = (j <= S - T + i and bool(key_mask[b, j])) or j == S - T + i
        mask = GPT._attention_mask(key_mask, T)
        assert torch.equal(mask.expand(3, 1, T, S), expected), T


def dropped(out, clean, p=0.5):
    """out is dropout(clean): each entry 0 (about a fraction p of them) or clean / (1 - p)."""
    zero = out == 0
    assert p - 0.2 < zero.float().mean() < p + 0.2
    assert torch.allclose(out[~zero], (clean / (1 - p))[~zero], atol=1e-5)


def test_dropout_is_off_in_evaluation_and_where_the_paper_puts_it_in_training():
    """dropout=0.5: evaluation is the formula; in training the MLP's output and the attention's output projection are
    each dropped (every entry 0 or value / (1 - p)), the attention weights too, and disable_dropout turns it all off."""
    model = tiny(dropout=0.5)
    idx = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        expected = model_by_hand(model, idx)
        assert torch.allclose(model(idx)[0], expected, atol=1e-5)  # eval: no dropout, the attention's included
        model.train()
        block = model.encoder.blocks[0]
        x = torch.randn(2, 9, 32)
        torch.manual_seed(0)
        dropped(block.mlp(x), mlp_by_hand(x, block.mlp))
        block.attn.attn_dropout = 0.0  # the attention's residual dropout alone: its weights' dropout off for now
        dropped(block.attn(x), attention_by_hand(x, block.attn, 2))
        block.attn.attn_dropout = 0.5
        block.attn.resid_drop.p = 0.0  # now the attention weights' dropout alone: the output is no longer the formula
        assert not torch.allclose(block.attn(x), attention_by_hand(x, block.attn, 2), atol=1e-3)
        disable_dropout(model)
        assert model.training and torch.allclose(model(idx)[0], expected, atol=1e-5)


def test_initialisation_is_gpt2s():
    """N(0, 0.02) for every Linear and Embedding weight, zero biases, and N(0, 0.02 / sqrt(2 n_layer)) for the two
    projections that end a residual branch (attn.proj, mlp.proj), GPT-2's scaling of residual layers."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=2, n_embd=64))
    residual = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith("proj.weight")])
    others = torch.cat([p.detach().flatten() for n, p in model.named_parameters()
                        if n.endswith("weight") and not n.endswith("proj.weight") and ".ln" not in n])
    assert residual.numel() == 4 * (64 * 64 + 4 * 64 * 64)
    assert abs(residual.std().item() / (0.02 / math.sqrt(8)) - 1) < 0.03 and abs(residual.mean().item()) < 1e-3
    assert abs(others.std().item() / 0.02 - 1) < 0.03 and abs(others.mean().item()) < 1e-3
    biases = [p for n, p in model.named_parameters() if n.endswith("bias") and ".ln" not in n]
    assert len(biases) == 4 * 6 and all(torch.equal(b, torch.zeros_like(b)) for b in biases)


def test_loss_is_cross_entropy_ignoring_minus_100():
    model = tiny()
    idx = torch.randint(0, V, (2, 8))
    targets = torch.randint(0, V, (2, 8))
    targets[0, :3] = -100
    with torch.no_grad():
        logits, loss = model(idx, targets)
    logp = torch.log_softmax(logits, -1)
    keep = targets != -100
    expected = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


# -- behaviour ------------------------------------------------------------------------------------------------


def test_causality_future_tokens_do_not_change_the_past():
    model = tiny()
    idx = torch.randint(0, V, (1, 12))
    changed = idx.clone()
    changed[0, 6] = (idx[0, 6] + 1) % V
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_kv_cache_gives_the_full_forward_logits():
    model = tiny()
    idx = torch.randint(0, V, (3, 15))
    cache = KVCache(model.config.n_layer)
    with torch.no_grad():
        full, _ = model(idx)
        parts = [model(idx[:, a:b], cache=cache)[0] for a, b in [(0, 5), (5, 6), (6, 10), (10, 15)]]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_greedy_generate_with_and_without_cache_agree():
    model = tiny()
    idx = torch.randint(0, V, (2, 4))
    a = model.generate(idx, 20, temperature=0)
    b = model.generate(idx, 20, temperature=0, use_cache=False)
    assert a.shape == (2, 24) and torch.equal(a, b)
    # past the context (block_size 32) generation slides the window instead of failing
    long = model.generate(idx, 40, temperature=0)
    assert long.shape == (2, 44) and torch.equal(long[:, :24], a)


def test_left_padded_batch_matches_each_row_alone():
    model = tiny()
    rows = [torch.randint(0, V, (n,)) for n in (3, 7, 5)]
    width = 7
    idx = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.arange(width) >= width - len(r) for r in rows]).long()
    with torch.no_grad():
        logits, _ = model(idx, attention_mask=mask)
        out = model.generate(idx, 10, temperature=0, attention_mask=mask)
        for i, r in enumerate(rows):
            alone, _ = model(r[None])
            assert torch.allclose(logits[i, width - len(r) :], alone[0], atol=1e-5)
            assert torch.equal(out[i, width:], model.generate(r[None], 10, temperature=0)[0, len(r) :])
    assert torch.isfinite(logits).all()  # padding queries stay finite


def test_generate_stops_rows_at_eos_and_pads_them():
    model = tiny()
    idx = torch.randint(0, V, (2, 3))
    greedy = model.generate(idx, 6, temperature=0)
    eos = int(greedy[0, 4])  # the second token row 0 generates
    out = model.generate(idx, 6, temperature=0, eos_token_id=eos, pad_token_id=V - 1)
    first_eos = (greedy[0, 3:] == eos).nonzero()[0].item() + 3
    assert out[0, first_eos] == eos
    assert (out[0, first_eos + 1 :] == V - 1).all()


def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # nucleus: p = softmax = [.61, .22, .14, .03, .004]; top_p 0.8 keeps the first two (0.61 < 0.8 <= 0.83)
    assert set(sample_next_token(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(sample_next_token(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert sample_next_token(logits, 0.0).eq(0).all()
    counts = torch.bincount(sample_next_token(logits, 1.0, generator=g), minlength=5).float() / 400
    assert abs(counts[0] - torch.softmax(logits[0], -1)[0]) < 0.1


# -- sizes and training ---------------------------------------------------------------------------------------


def count_by_formula(cfg):
    V_, N, L, C = cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd
    per_block = 12 * C * C + 13 * C  # q, k, v, proj: 4(C^2 + C); fc: 4C^2 + 4C; proj: 4C^2 + C; 2 LayerNorms: 4C
    return V_ * C + N * C + L * per_block + 2 * C  # wte (tied head), wpe, blocks, ln_f


def test_gpt2_preset_has_124M_parameters():
    with torch.device("meta"):
        model = GPT(preset("gpt2"))
    assert model.num_parameters() == 124_439_808
    assert model.num_parameters() == count_by_formula(model.config)


@pytest.mark.parametrize("cfg", [preset("tiny", vocab_size=V), preset("baby", vocab_size=500), GPTConfig(
    vocab_size=100, block_size=16, n_layer=3, n_head=4, n_embd=48)])
def test_parameter_count_formula(cfg):
    with torch.device("meta"):
        assert GPT(cfg).num_parameters() == count_by_formula(cfg)


def test_loss_at_init_is_ln_vocab_and_one_batch_can_be_overfit():
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=V))
    idx, targets = torch.randint(0, V, (4, 16)), torch.randint(0, V, (4, 16))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(V)) < 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


# -- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(layout="sandwich"), "layout"),
        (dict(activation="relu"), "activation"),
    ],
)
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**dict(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8), **changes})


def test_bad_inputs_get_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="sequence length 33 .* block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=f"token id {V} is outside the vocabulary"):
        model(torch.tensor([[1, V]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))
    cache = KVCache(2)
    model(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cached 30 \\+ new 3"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_model_refuses_a_larger_tokenizer():
    from minigpt import CharTokenizer

    model = tiny()
    small, big = CharTokenizer("abc"), CharTokenizer([chr(i) for i in range(100, 200)])
    model.check_tokenizer(small)
    with pytest.raises(ValueError, match=f"102 tokens but the model's vocab_size is {V}"):
        model.check_tokenizer(big)
