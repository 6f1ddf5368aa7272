"""Prompt Tuning, P-Tuning, Prefix-Tuning and P-Tuning v2 checked against their equations written out by hand.

The expected values come from a by-hand forward pass of the *unpatched* model (LayerNorm, attention, MLP written out
on small tensors), fed with the virtual tokens or the prefix keys and values read from the patched model.
"""

import copy
import dataclasses
import json
import math

import pytest
import torch

import peft
from minigpt import GPT, KVCache, preset
from minigpt.model import disable_dropout
from peft import p_tuning, prefix_tuning

V = 64


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(preset("tiny", vocab_size=V, **overrides))
    with torch.no_grad():  # randomise biases and LayerNorms so every term shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def patched(config, seed=0):
    """(plain copy, patched model) with the method's tensors randomised away from their initial values."""
    base = tiny(seed)
    plain = copy.deepcopy(base)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return plain, model.eval()


# -- the equations by hand --------------------------------------------------------------------------------------


def layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def linear(x, lin):
    return x @ lin.weight.T + lin.bias


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def attention_by_hand(x, attn, n_head, prefix_k=None, prefix_v=None):
    """softmax(q [K_p; K]^T / sqrt(d)) [V_p; V]: causal on the real keys, every query sees all n prefix keys."""
    T, C = x.shape[-2:]
    d = C // n_head
    q, k, v = linear(x, attn.query), linear(x, attn.key), linear(x, attn.value)
    n = 0
    if prefix_k is not None:
        n = prefix_k.size(1)
        k, v = torch.cat([prefix_k, k], dim=1), torch.cat([prefix_v, v], dim=1)
    allowed = torch.ones(T, n + T, dtype=torch.bool)
    allowed[:, n:] = torch.ones(T, T).tril().bool()
    heads = []
    for h in range(n_head):
        qh, kh, vh = (t[..., h * d : (h + 1) * d] for t in (q, k, v))
        scores = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ vh)
    return linear(torch.cat(heads, dim=-1), attn.proj)


def forward_by_hand(plain, h0, prefixes=None):
    """Logits of the unpatched GPT (pre-LN) for input-layer output h0 (B, T, C); prefixes[l] = (K_p, V_p) (B, n, C)."""
    x = h0
    for l, block in enumerate(plain.encoder.blocks):
        pk, pv = prefixes[l] if prefixes is not None else (None, None)
        x = x + attention_by_hand(layer_norm(x, block.ln_1), block.attn, plain.config.n_head, pk, pv)
        x = x + linear(gelu_tanh(linear(layer_norm(x, block.ln_2), block.mlp.fc)), block.mlp.proj)
    return layer_norm(x, plain.output_layer.ln_f) @ plain.input_layer.wte.weight.T


def lstm_by_hand(x, lstm):
    """A bidirectional LSTM on one sequence x (n, in): i, f, g, o gates; c = f c + i g; h = o tanh(c)."""
    n = x.size(0)
    for layer in range(lstm.num_layers):
        outputs = []
        for suffix, order in (("", range(n)), ("_reverse", reversed(range(n)))):
            W_ih, W_hh = getattr(lstm, f"weight_ih_l{layer}{suffix}"), getattr(lstm, f"weight_hh_l{layer}{suffix}")
            b = getattr(lstm, f"bias_ih_l{layer}{suffix}") + getattr(lstm, f"bias_hh_l{layer}{suffix}")
            h = c = torch.zeros(lstm.hidden_size)
            out = [None] * n
            for t in order:
                i, f, g, o = (W_ih @ x[t] + W_hh @ h + b).chunk(4)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                out[t] = h
            outputs.append(torch.stack(out))
        x = torch.cat(outputs, dim=-1)  # (n, 2H): forward and backward states side by side
    return x


def prompt_by_hand(model, x, prompt):
    """h_0 = [P + W_p[0..n-1]; W_e[x] + W_p[n..n+T-1]] for prompt P (B, n, C)."""
    wte, wpe = model.input_layer.base.wte.weight, model.input_layer.base.wpe.weight
    n, T = prompt.size(1), x.size(1)
    return torch.cat([prompt + wpe[:n], wte[x] + wpe[n : n + T]], dim=1)


# -- Prompt Tuning and P-Tuning ---------------------------------------------------------------------------------


def test_prompt_tuning_equals_the_prompt_prepended_by_hand():
    plain, model = patched(peft.PromptTuningConfig(num_virtual_tokens=3))
    x = torch.randint(0, V, (2, 6))
    P = model.input_layer.prompt.weight[0].detach()  # (n, C)
    expected = forward_by_hand(plain, prompt_by_hand(model, x, P.expand(2, -1, -1)))[:, 3:]
    logits, _ = model(x)
    assert logits.shape == (2, 6, V)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_p_tuning_prompt_is_the_encoder_written_out(encoder):
    config = peft.PTuningConfig(num_virtual_tokens=3, encoder_reparameterization_type=encoder, encoder_hidden_size=8)
    plain, model = patched(config)
    enc = model.input_layer.prompt
    h = enc.embedding[0].detach()  # (n, C)
    if encoder == "lstm":
        assert enc.lstm_head.bidirectional and enc.lstm_head.num_layers == 2
        mlp = enc.mlp_head
        prompt = linear(torch.relu(linear(lstm_by_hand(h, enc.lstm_head), mlp[0])), mlp[2])
    else:
        mlp = enc.mlp_head
        prompt = linear(torch.relu(linear(torch.relu(linear(h, mlp[0])), mlp[2])), mlp[4])
    x = torch.randint(0, V, (2, 5))
    expected = forward_by_hand(plain, prompt_by_hand(model, x, prompt.expand(2, -1, -1)))[:, 3:]
    torch.testing.assert_close(model(x)[0], expected, atol=1e-5, rtol=1e-5)


def test_prompt_initialisations():
    base = tiny()
    wte = base.input_layer.wte.weight.detach().clone()
    text = peft.get_peft_model(
        copy.deepcopy(base),
        peft.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="text", prompt_tuning_init_token_ids=[7, 3]),
    )
    assert torch.equal(text.input_layer.prompt.weight[0], wte[[7, 3, 7, 3, 7]])  # repeated to n
    short = peft.get_peft_model(
        copy.deepcopy(base),
        peft.PromptTuningConfig(
            num_virtual_tokens=2, prompt_tuning_init="text", prompt_tuning_init_token_ids=[1, 2, 9]
        ),
    )
    assert torch.equal(short.input_layer.prompt.weight[0], wte[[1, 2]])  # truncated to n
    # "vocab": each virtual token starts as the embedding of a token drawn from the whole vocabulary. 20 tasks x 20
    # tokens = 400 draws from 64 ids miss ~0.1 ids on average; drawing from part of the vocabulary misses many
    torch.manual_seed(0)
    vocab = peft.get_peft_model(
        copy.deepcopy(base), peft.PromptTuningConfig(num_virtual_tokens=20, num_tasks=20, prompt_tuning_init="vocab")
    )
    rows = vocab.input_layer.prompt.weight.reshape(-1, wte.size(1))
    ids = [int((wte == row).all(-1).nonzero()[0]) for row in rows]  # each row is some token's embedding
    assert len(set(ids)) >= 60 and max(ids) >= 60 and min(ids) <= 3
    # "random": uniform in [-0.5, 0.5] (the paper's random-uniform ablation): mean 0, standard deviation 1/sqrt(12)
    rand = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(num_virtual_tokens=20, num_tasks=20))
    P = rand.input_layer.prompt.weight.detach()
    assert P.abs().max() <= 0.5 and P.abs().max() > 0.49
    assert abs(P.std().item() * math.sqrt(12) - 1) < 0.05 and abs(P.mean().item()) < 0.01


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_p_tuning_export_keeps_outputs_and_stores_n_times_d(encoder, tmp_path):
    config = peft.PTuningConfig(num_virtual_tokens=4, encoder_reparameterization_type=encoder, encoder_dropout=0.1)
    plain, model = patched(config)
    x = torch.randint(0, V, (2, 6))
    before = model(x)[0]
    p_tuning.export(model)
    assert isinstance(model.peft_config, peft.PromptTuningConfig)
    assert peft.count_parameters(model)[0] == 4 * model.config.n_embd
    torch.testing.assert_close(model(x)[0], before, atol=1e-6, rtol=1e-6)
    peft.save_adapter(model, tmp_path / "exported.safetensors")
    fresh = peft.load_adapter(copy.deepcopy(plain), tmp_path / "exported.safetensors")
    torch.testing.assert_close(fresh(x)[0], before, atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="PTuningConfig"):
        p_tuning.export(model)  # already exported: now a Prompt Tuning model


def test_p_tuning_export_from_training_mode_keeps_every_task_and_no_dropout(tmp_path):
    """export while training with LSTM dropout: the stored prompt of each of the K tasks is the encoder by hand, with no
    dropout, and the exported model is a K-task Prompt Tuning model (K * n * C numbers) that saves and loads."""
    config = peft.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8, encoder_dropout=0.5, num_tasks=3)
    plain, model = patched(config)
    enc = model.input_layer.prompt
    with torch.no_grad():
        by_hand = torch.stack([linear(torch.relu(linear(lstm_by_hand(h, enc.lstm_head), enc.mlp_head[0])),
                                      enc.mlp_head[2]) for h in enc.embedding])  # (K, n, C)
    p_tuning.export(model.train())
    torch.testing.assert_close(model.input_layer.prompt.weight.detach(), by_hand, atol=1e-5, rtol=1e-5)
    assert model.peft_config == peft.PromptTuningConfig(num_virtual_tokens=3, num_tasks=3)
    assert peft.count_parameters(model)[0] == 3 * 3 * model.config.n_embd
    x = torch.randint(0, V, (3, 5))
    model.eval()
    with peft.task_ids(model, [2, 0, 1]):
        before = model(x)[0]
    peft.save_adapter(model, tmp_path / "three.safetensors")
    fresh = peft.load_adapter(copy.deepcopy(plain), tmp_path / "three.safetensors")
    with peft.task_ids(fresh, [2, 0, 1]):
        torch.testing.assert_close(fresh(x)[0], before, atol=1e-6, rtol=1e-6)


def lstm_count(C, H, layers):
    """A bidirectional LSTM: per layer and direction 4 gates x (input weights + hidden weights + two biases); the first
    layer reads C, the others the 2H of both directions below."""
    return sum(2 * 4 * H * ((C if l == 0 else 2 * H) + H + 2) for l in range(layers))


def test_encoder_sizes_follow_the_config():
    """Closed-form trainable counts on the tiny model (L = 2, C = 32) with every width different from C: P-Tuning's
    LSTM encoder (H per direction, its layers) or MLP (C -> H -> H -> C), Prefix-Tuning's P' (n, d') and MLP
    d' -> H -> L * 2 * C."""
    n, L, C = 4, 2, 32

    def trainable(config):
        return peft.count_parameters(peft.get_peft_model(tiny(), config))[0]

    H = 8
    for layers in (1, 3):
        lstm = peft.PTuningConfig(num_virtual_tokens=n, encoder_hidden_size=H, encoder_num_layers=layers)
        assert trainable(lstm) == n * C + lstm_count(C, H, layers) + (2 * H * 2 * H + 2 * H) + (2 * H * C + C)
    mlp = peft.PTuningConfig(num_virtual_tokens=n, encoder_reparameterization_type="mlp", encoder_hidden_size=H)
    assert trainable(mlp) == n * C + (C * H + H) + (H * H + H) + (H * C + C)
    d, H = 5, 7
    prefix = peft.PrefixTuningConfig(num_virtual_tokens=n, prefix_dim=d, encoder_hidden_size=H)
    assert trainable(prefix) == n * d + (d * H + H) + (H * L * 2 * C + L * 2 * C)


# -- Prefix-Tuning and P-Tuning v2 -------------------------------------------------------------------------------


def test_prefix_attention_equals_attention_over_the_prefixed_keys_by_hand():
    plain, model = patched(peft.PTuningV2Config(num_virtual_tokens=3))
    layer = model.encoder.blocks[0].attn
    x = torch.randn(2, 5, model.config.n_embd)
    pk, pv = layer.prefix_key[0].detach().expand(2, -1, -1), layer.prefix_value[0].detach().expand(2, -1, -1)
    expected = attention_by_hand(x, plain.encoder.blocks[0].attn, model.config.n_head, pk, pv)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_prefix_tuning_model_equals_the_blocks_by_hand():
    plain, model = patched(peft.PTuningV2Config(num_virtual_tokens=3))
    x = torch.randint(0, V, (2, 6))
    wte, wpe = plain.input_layer.wte.weight, plain.input_layer.wpe.weight
    h0 = wte[x] + wpe[:6]  # real tokens keep positions 0..T-1: the prefix takes none
    prefixes = [
        (b.attn.prefix_key[0].expand(2, -1, -1), b.attn.prefix_value[0].expand(2, -1, -1)) for b in model.encoder.blocks
    ]
    torch.testing.assert_close(model(x)[0], forward_by_hand(plain, h0, prefixes), atol=1e-5, rtol=1e-5)


def test_prefix_reparameterisation_is_the_mlp_by_hand_and_export_keeps_outputs(tmp_path):
    config = peft.PrefixTuningConfig(num_virtual_tokens=3, prefix_dim=5, encoder_hidden_size=7)
    plain, model = patched(config)
    enc = model.prefix_encoder
    L, C = model.config.n_layer, model.config.n_embd
    # P_theta = MLP(P') with one tanh hidden layer, its output read as (n, n_layer, key/value, C)
    P = linear(torch.tanh(linear(enc.embedding[0], enc.mlp[0])), enc.mlp[2]).view(3, L, 2, C).detach()
    x = torch.randint(0, V, (2, 6))
    h0 = plain.input_layer.wte.weight[x] + plain.input_layer.wpe.weight[:6]
    prefixes = [(P[:, l, 0].expand(2, -1, -1), P[:, l, 1].expand(2, -1, -1)) for l in range(L)]
    before = model(x)[0]
    torch.testing.assert_close(before, forward_by_hand(plain, h0, prefixes), atol=1e-5, rtol=1e-5)

    prefix_tuning.export(model)
    assert not hasattr(model, "prefix_encoder") and model.peft_config.prefix_projection is False
    assert peft.count_parameters(model)[0] == 3 * L * 2 * C
    torch.testing.assert_close(model(x)[0], before, atol=1e-6, rtol=1e-6)
    peft.save_adapter(model, tmp_path / "prefix.safetensors")
    fresh = peft.load_adapter(copy.deepcopy(plain), tmp_path / "prefix.safetensors")
    torch.testing.assert_close(fresh(x)[0], before, atol=1e-6, rtol=1e-6)


# -- every method: cache, padding, mixed tasks, training, saving, disabling --------------------------------------

CONFIGS = {
    "prompt_tuning": peft.PromptTuningConfig(num_virtual_tokens=4),
    "p_tuning_lstm": peft.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8),
    "p_tuning_mlp": peft.PTuningConfig(num_virtual_tokens=4, encoder_reparameterization_type="mlp"),
    "prefix_tuning": peft.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8),
    "p_tuning_v2": peft.PTuningV2Config(num_virtual_tokens=4),
}
METHODS = pytest.mark.parametrize("name", list(CONFIGS))


@METHODS
def test_kv_cache_steps_equal_the_full_forward(name):
    _, model = patched(CONFIGS[name])
    x = torch.randint(0, V, (2, 9))
    full, _ = model(x)
    cache = KVCache(model.config.n_layer)
    steps = [model(x[:, :4], cache=cache)[0], model(x[:, 4:6], cache=cache)[0]]  # a prompt, then a chunk of two
    steps += [model(x[:, t : t + 1], cache=cache)[0] for t in range(6, 9)]  # then one token at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@METHODS
def test_greedy_generation_with_and_without_cache_agree(name):
    _, model = patched(CONFIGS[name])
    x = torch.randint(0, V, (2, 10))
    # 10 + 25 tokens pass block_size 32 (with prompt tuning, block_size - 4): the window slides, the cache is dropped
    with_cache = model.generate(x, 25, temperature=0)
    without = model.generate(x, 25, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 35)
    assert torch.equal(with_cache, without)


@METHODS
def test_a_left_padded_row_equals_the_row_alone(name):
    _, model = patched(CONFIGS[name])
    long, short = torch.randint(0, V, (1, 7)), torch.randint(0, V, (1, 4))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    logits, _ = model(batch, attention_mask=mask)
    torch.testing.assert_close(logits[0:1], model(long)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1:2, 3:], model(short)[0], atol=1e-5, rtol=1e-5)
    generated = model.generate(batch, 6, temperature=0, attention_mask=mask)
    assert torch.equal(generated[1:2, 3:], model.generate(short, 6, temperature=0))
    assert torch.equal(generated[0:1], model.generate(long, 6, temperature=0))


@METHODS
def test_mixed_task_batch_rows_equal_each_row_alone(name):
    config = dataclasses.replace(CONFIGS[name], num_tasks=3)
    _, model = patched(config)
    rows = [torch.randint(0, V, (1, T)) for T in (5, 3, 6)]
    batch = torch.stack([torch.cat([torch.zeros(6 - r.size(1), dtype=torch.long), r[0]]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(6 - r.size(1)), torch.ones(r.size(1))]) for r in rows])
    tasks = [2, 0, 1]
    with peft.task_ids(model, tasks):
        logits, _ = model(batch, attention_mask=mask)
        generated = model.generate(batch, 5, temperature=0, attention_mask=mask)
    for b, (row, task) in enumerate(zip(rows, tasks)):
        with peft.task_ids(model, [task]):
            alone, _ = model(row)
            torch.testing.assert_close(logits[b : b + 1, 6 - row.size(1) :], alone, atol=1e-5, rtol=1e-5)
            assert torch.equal(generated[b : b + 1, 6 - row.size(1) :], model.generate(row, 5, temperature=0))
    with peft.task_ids(model, [0]):
        other = model(rows[0])[0]
    assert not torch.allclose(other, logits[0:1, 1:])  # the tasks really differ
    with pytest.raises(ValueError, match="num_tasks=3"):
        model(batch)  # several tasks and no ids
    with pytest.raises(ValueError, match="2 entries but the batch has 3 rows"), peft.task_ids(model, [0, 1]):
        model(batch)
    with pytest.raises(ValueError, match=r"task id 3 is outside \[0, num_tasks=3\)"), peft.task_ids(model, [0, 3, 1]):
        pass


def test_a_task_of_a_mixed_batch_is_the_single_task_prompt():
    """Independently of task_ids: row b equals a one-task model holding task ids[b]'s prompt (or prefix)."""
    _, multi = patched(peft.PromptTuningConfig(num_virtual_tokens=4, num_tasks=3))
    _, multi_prefix = patched(peft.PTuningV2Config(num_virtual_tokens=4, num_tasks=3))
    x = torch.randint(0, V, (3, 5))
    for model, one_config in (
        (multi, peft.PromptTuningConfig(num_virtual_tokens=4)),
        (multi_prefix, peft.PTuningV2Config(num_virtual_tokens=4)),
    ):
        with peft.task_ids(model, [1, 2, 0]):
            logits, _ = model(x)
        for b, task in enumerate([1, 2, 0]):
            single = peft.get_peft_model(tiny(), one_config)
            with torch.no_grad():
                for p, q in zip(single.parameters(), model.parameters()):
                    p.copy_(q[task : task + 1] if p.requires_grad else q)
            torch.testing.assert_close(logits[b : b + 1], single(x[b : b + 1])[0], atol=1e-5, rtol=1e-5)


@METHODS
def test_training_changes_only_the_method_tensors(name):
    base = tiny()
    originals = [(p, p.detach().clone()) for p in base.parameters()]
    model = peft.get_peft_model(base, CONFIGS[name]).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)  # decay would move tensors without a gradient
    x = torch.randint(0, V, (2, 8))
    _, loss = model(x[:, :-1], targets=x[:, 1:])
    loss.backward()
    opt.step()
    assert all(torch.equal(p, saved) for p, saved in originals)  # the base weights, bit for bit
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before))  # every method tensor moved


@METHODS
def test_save_and_load_into_a_fresh_base(name, tmp_path):
    plain, model = patched(CONFIGS[name])
    x = torch.randint(0, V, (2, 6))
    peft.save_adapter(model, tmp_path / "a.safetensors")
    fresh = peft.load_adapter(copy.deepcopy(plain).eval(), tmp_path / "a.safetensors")
    assert fresh.peft_config == model.peft_config
    torch.testing.assert_close(fresh(x)[0], model(x)[0], atol=0, rtol=0)


@METHODS
def test_disable_and_unload_give_the_plain_model(name):
    plain, model = patched(CONFIGS[name])
    x = torch.randint(0, V, (2, 6))
    assert not torch.allclose(model(x)[0], plain(x)[0])
    with peft.disable_adapters(model):
        assert torch.equal(model(x)[0], plain(x)[0])
        assert torch.equal(model.generate(x, 30, temperature=0), plain.generate(x, 30, temperature=0))
    peft.unload(model)
    assert not any(isinstance(m, peft.AdapterLayer) for m in model.modules())
    assert not hasattr(model, "prefix_encoder")
    assert torch.equal(model(x)[0], plain(x)[0])
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_mlp"])
def test_generation_window_is_block_size_less_the_virtual_tokens_and_all_of_it_when_disabled(name):
    """Past the context, generation slides a window of block_size - n real tokens (the n virtual tokens fill the
    rest): the encoder reads at most block_size = 32 positions. With the adapter disabled no position is taken:
    the window is the whole block_size of real tokens."""
    plain, model = patched(CONFIGS[name])
    lengths = []
    model.encoder.register_forward_pre_hook(lambda m, args: lengths.append(args[0].size(1)))
    x = torch.randint(0, V, (1, 6))
    model.generate(x, 30, temperature=0)
    assert max(lengths) == 32
    lengths.clear()
    with peft.disable_adapters(model):
        out = model.generate(x, 30, temperature=0)
    assert max(lengths) == 32 and torch.equal(out, plain.generate(x, 30, temperature=0))


@METHODS
def test_config_survives_a_json_round_trip(name):
    config = dataclasses.replace(CONFIGS[name], num_tasks=2)
    d = json.loads(json.dumps(dataclasses.asdict(config)))
    assert type(config)(**d) == config
    text = peft.PromptTuningConfig(prompt_tuning_init="text", prompt_tuning_init_token_ids=(1, 2))
    assert peft.PromptTuningConfig(**json.loads(json.dumps(dataclasses.asdict(text)))) == text


# -- parameter counts on the gpt2 preset (built on the meta device: no memory, no time) -------------------------


@pytest.fixture(scope="module")
def gpt2():
    with torch.device("meta"):
        return GPT(preset("gpt2"))


def test_parameter_counts_on_gpt2(gpt2):
    n, L, C = 20, 12, 768

    def trainable(config):
        return peft.count_parameters(peft.get_peft_model(copy.deepcopy(gpt2), config))[0]

    assert trainable(peft.PromptTuningConfig(num_virtual_tokens=n)) == n * C == 15_360
    assert trainable(peft.PromptTuningConfig(num_virtual_tokens=n, num_tasks=3)) == 3 * n * C
    assert trainable(peft.PTuningV2Config(num_virtual_tokens=n)) == n * L * 2 * C == 368_640
    assert trainable(peft.PrefixTuningConfig(num_virtual_tokens=n, prefix_projection=False)) == 368_640
    d, H = 512, 512  # P' (n, d'), then Linear(d', H), tanh, Linear(H, L * 2 * C)
    reparam = peft.get_peft_model(copy.deepcopy(gpt2), peft.PrefixTuningConfig(prefix_dim=d, encoder_hidden_size=H))
    assert peft.count_parameters(reparam)[0] == n * d + d * H + H + H * L * 2 * C + L * 2 * C
    assert peft.count_parameters(prefix_tuning.export(reparam))[0] == 368_640
    H = 768  # bi-LSTM: 4 gates x (input + hidden weights + 2 biases) per direction and layer; MLP 2H -> 2H -> C
    lstm = 2 * 4 * H * (C + H + 2) + 2 * 4 * H * (2 * H + H + 2)
    ptuning = peft.get_peft_model(copy.deepcopy(gpt2), peft.PTuningConfig(num_virtual_tokens=n))
    assert peft.count_parameters(ptuning)[0] == n * C + lstm + (2 * H * 2 * H + 2 * H) + (2 * H * C + C)
    assert peft.count_parameters(p_tuning.export(ptuning))[0] == n * C


# -- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_mlp"])
def test_input_too_long_for_the_virtual_tokens(name):
    _, model = patched(CONFIGS[name])  # block_size 32, 4 virtual tokens: 28 real tokens fit
    model(torch.randint(0, V, (1, 28)))
    with pytest.raises(ValueError, match=r"29 tokens is too long.*num_virtual_tokens=4.*28 tokens"):
        model(torch.randint(0, V, (1, 29)))
    _, prefix = patched(CONFIGS["prefix_tuning"])
    prefix(torch.randint(0, V, (1, 32)))  # a prefix takes no positions


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: peft.PromptTuningConfig(num_virtual_tokens=0), r"num_virtual_tokens must be an integer >= 1, got 0"),
        (lambda: peft.PromptTuningConfig(num_virtual_tokens=2.5), r"num_virtual_tokens .* got 2.5"),
        (lambda: peft.PromptTuningConfig(prompt_tuning_init="zeros"), r"prompt_tuning_init must be one of .* 'zeros'"),
        (lambda: peft.PromptTuningConfig(prompt_tuning_init="text"), r"needs prompt_tuning_init_token_ids"),
        (
            lambda: peft.PromptTuningConfig(prompt_tuning_init="text", prompt_tuning_init_token_ids=[1, -2]),
            r"got \[1, -2\]",
        ),
        (
            lambda: peft.PromptTuningConfig(prompt_tuning_init_token_ids=[1]),
            r"only used with prompt_tuning_init='text'",
        ),
        (lambda: peft.PromptTuningConfig(num_tasks=0), r"num_tasks must be an integer >= 1, got 0"),
        (
            lambda: peft.PTuningConfig(encoder_reparameterization_type="gru"),
            r"must be one of \('lstm', 'mlp'\), got 'gru'",
        ),
        (lambda: peft.PTuningConfig(encoder_dropout=1.5), r"encoder_dropout must be in \[0, 1\), got 1.5"),
        (lambda: peft.PTuningConfig(encoder_hidden_size=-8), r"encoder_hidden_size must be an integer >= 1, got -8"),
        (lambda: peft.PrefixTuningConfig(prefix_projection="yes"), r"prefix_projection must be True or False"),
        (lambda: peft.PTuningV2Config(num_virtual_tokens=-1), r"PTuningV2Config.num_virtual_tokens .* got -1"),
    ],
)
def test_bad_config_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_values_found_when_applied():
    with pytest.raises(
        ValueError, match=r"num_virtual_tokens \(32\) must be smaller than the model's block_size \(32\)"
    ):
        peft.get_peft_model(tiny(), peft.PromptTuningConfig(num_virtual_tokens=32))
    text = peft.PromptTuningConfig(prompt_tuning_init="text", prompt_tuning_init_token_ids=[3, 99])
    with pytest.raises(ValueError, match=r"token id 99, outside the vocabulary \[0, 64\)"):
        peft.get_peft_model(tiny(), text)
    _, v2 = patched(CONFIGS["p_tuning_v2"])
    with pytest.raises(ValueError, match="task ids must be a 1-D sequence"), peft.task_ids(v2, [[0, 1]]):
        pass
    with pytest.raises(TypeError, match="needs a model patched with prefix tuning"):
        prefix_tuning.export(patched(CONFIGS["prompt_tuning"])[1])
    with pytest.raises(ValueError, match="task_ids needs a model patched"), peft.task_ids(tiny(), [0]):
        pass


# -- the adapter API for prompt methods (issue 18) -------------------------------------------------------------------


@METHODS
def test_save_adapter_ignores_requires_grad(name, tmp_path):
    plain, model = patched(CONFIGS[name])
    model.requires_grad_(False)
    peft.save_adapter(model, tmp_path / "a.safetensors")
    fresh = peft.load_adapter(copy.deepcopy(plain).eval(), tmp_path / "a.safetensors")
    x = torch.randint(0, V, (2, 6))
    assert torch.equal(fresh(x)[0], model(x)[0])


@METHODS
def test_disable_adapters_nests(name):
    plain, model = patched(CONFIGS[name])
    x = torch.randint(0, V, (2, 6))
    adapted = model(x)[0]
    with peft.disable_adapters(model):
        with peft.disable_adapters(model):
            pass
        assert torch.equal(model(x)[0], plain(x)[0])
    assert torch.equal(model(x)[0], adapted)


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_prefix_reparameterisation_runs_once_per_forward_pass():
    config = peft.PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8)
    base = tiny(n_layer=4)
    model = peft.get_peft_model(base, config).eval()
    calls = count_calls(model.prefix_encoder.mlp[0])
    x = torch.randint(0, V, (2, 6))
    model(x)
    assert len(calls) == 1  # one MLP pass for all four layers
    model.hidden_states(x)  # the reward model's and PPO's entry point
    assert len(calls) == 2
    model.generate(x, 5, temperature=0)  # five forward passes (a prompt, then four cached steps)
    assert len(calls) == 7
    with peft.disable_adapters(model):
        model(x)
    assert len(calls) == 7  # no prefix, no MLP
    # the shared output is each layer's own slice: the logits equal the layers computed one by one
    with torch.no_grad():
        logits = model(x)[0]
        P = model.prefix_encoder.table()[0]  # (n, L, 2, C)
        h0 = base.input_layer.wte.weight[x] + base.input_layer.wpe.weight[:6]
    plain = copy.deepcopy(model)
    peft.unload(plain)
    prefixes = [(P[:, l, 0].expand(2, -1, -1), P[:, l, 1].expand(2, -1, -1)) for l in range(4)]
    torch.testing.assert_close(logits, forward_by_hand(plain, h0, prefixes), atol=1e-5, rtol=1e-5)


def test_prefix_training_shares_one_mlp_pass_and_a_copy_has_its_own_hooks():
    config = peft.PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8)
    model = peft.get_peft_model(tiny(), config).train()
    twin = copy.deepcopy(model)
    calls, twin_calls = count_calls(model.prefix_encoder.mlp[0]), count_calls(twin.prefix_encoder.mlp[0])
    x = torch.randint(0, V, (2, 8))
    _, loss = model(x[:, :-1], targets=x[:, 1:])
    loss.backward()
    assert len(calls) == 1 and not twin_calls  # the copy's hooks are bound to the copy's encoder
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prefix_encoder.parameters())
    twin(x)
    assert len(twin_calls) == 1 and len(calls) == 1
    with pytest.raises(ValueError):  # an error inside a pass closes it: the next call outside computes afresh
        model(torch.randint(0, V, (1, 40)))
    assert model.prefix_encoder.cache is None
    peft.unload(model)
    assert not model.encoder._forward_pre_hooks and not model.encoder._forward_hooks


def test_an_error_inside_a_pass_closes_the_prefix_cache():
    """An error raised inside model.encoder (here a wrong number of task ids, found by the first layer) still closes the
    pass: a later call outside a pass computes MLP(P') afresh, so it sees P' changed after the error."""
    config = peft.PrefixTuningConfig(num_virtual_tokens=3, prefix_dim=5, encoder_hidden_size=7)
    _, model = patched(config)
    with pytest.raises(ValueError, match="2 entries but the batch has 3 rows"), peft.task_ids(model, [0, 0]):
        model(torch.randint(0, V, (3, 4)))
    enc = model.prefix_encoder
    with torch.no_grad():
        enc.embedding.add_(1.0)
        P = linear(torch.tanh(linear(enc.embedding, enc.mlp[0])), enc.mlp[2]).view(1, 3, model.config.n_layer, 2, -1)
        key, value = model.encoder.blocks[1].attn.prefix()
    torch.testing.assert_close(key, P[:, :, 1, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(value, P[:, :, 1, 1], atol=1e-6, rtol=1e-6)


def test_prefix_attention_output_gets_the_residual_dropout():
    """Training with dropout p = 0.5 (attention weights' dropout set to 0 here): the prefixed attention's output is
    dropout(W_O heads), each entry 0 or the by-hand value / (1 - p); in evaluation, the by-hand value itself."""
    base = tiny(dropout=0.5)
    plain = copy.deepcopy(base)
    model = peft.get_peft_model(base, peft.PTuningV2Config(num_virtual_tokens=3))
    layer = model.encoder.blocks[0].attn
    layer.base.attn_dropout = 0.0
    x = torch.randn(2, 5, model.config.n_embd)
    with torch.no_grad():
        pk, pv = layer.prefix_key[0].expand(2, -1, -1), layer.prefix_value[0].expand(2, -1, -1)
        clean = attention_by_hand(x, plain.encoder.blocks[0].attn, model.config.n_head, pk, pv)
        torch.manual_seed(0)
        out = layer.train()(x)
        torch.testing.assert_close(layer.eval()(x), clean, atol=1e-5, rtol=1e-5)
    zero = out == 0
    assert 0.3 < zero.float().mean() < 0.7
    torch.testing.assert_close(out[~zero], (clean / 0.5)[~zero], atol=1e-5, rtol=1e-5)


# -- dropout and initialisation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_mlp"])
def test_the_virtual_tokens_get_the_input_layers_dropout(name):
    """In training, h_0 of the virtual tokens is dropout(P + W_p[0..n-1]): each entry either 0 or (P + W_p) / (1-p)."""
    base = tiny(dropout=0.5)
    model = peft.get_peft_model(base, CONFIGS[name]).train()
    seen = []
    model.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    torch.manual_seed(0)
    model(torch.randint(0, V, (2, 6)))
    virtual = seen[0][:, :4]  # (B, n, C)
    with torch.no_grad():
        clean = (model.input_layer.prompt()[0] + base.input_layer.base.wpe.weight[:4]).expand(2, -1, -1)
    zero = virtual == 0
    assert 0.3 < zero.float().mean() < 0.7
    torch.testing.assert_close(virtual[~zero], (clean / 0.5)[~zero], atol=1e-6, rtol=1e-6)
    model.eval()
    seen.clear()
    model(torch.randint(0, V, (2, 6)))
    torch.testing.assert_close(seen[0][:, :4], clean, atol=1e-6, rtol=1e-6)


def test_the_lstm_encoder_has_its_dropout_between_layers():
    config = peft.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8, encoder_dropout=0.5)
    model = peft.get_peft_model(tiny(), config)
    encoder = model.input_layer.prompt
    assert encoder.lstm_head.dropout == 0.5 and encoder.lstm_head.num_layers == 2
    encoder.train()
    torch.manual_seed(0)
    a, b = encoder(), encoder()
    assert not torch.allclose(a, b)  # dropout: two training passes differ
    encoder.eval()
    h = encoder.embedding[0].detach()
    mlp = encoder.mlp_head
    by_hand = linear(torch.relu(linear(lstm_by_hand(h, encoder.lstm_head), mlp[0])), mlp[2])
    torch.testing.assert_close(encoder()[0], by_hand, atol=1e-5, rtol=1e-5)  # and none in evaluation
    torch.manual_seed(0)
    no_dropout = peft.get_peft_model(tiny(), dataclasses.replace(config, encoder_dropout=0.0)).input_layer.prompt
    no_dropout.train()
    assert torch.equal(no_dropout(), no_dropout())
    disable_dropout(model)  # what the reward model and PPO do: training passes become one function
    encoder.train()
    assert encoder.lstm_head.dropout == 0.0
    torch.testing.assert_close(encoder()[0], by_hand, atol=1e-5, rtol=1e-5)


def test_free_prompts_and_prefixes_start_as_an_embedding_does():
    """P-Tuning's inputs h, Prefix-Tuning's P' and P-Tuning v2's prefixes: N(0, 1), as nn.Embedding starts."""
    torch.manual_seed(0)
    sizes = {"num_virtual_tokens": 20, "num_tasks": 10}
    tensors = [
        peft.get_peft_model(tiny(), peft.PTuningConfig(**sizes)).input_layer.prompt.embedding,
        peft.get_peft_model(tiny(), peft.PrefixTuningConfig(**sizes)).prefix_encoder.embedding,
        peft.get_peft_model(tiny(), peft.PTuningV2Config(**sizes)).encoder.blocks[1].attn.prefix_key,
        peft.get_peft_model(tiny(), peft.PTuningV2Config(**sizes)).encoder.blocks[0].attn.prefix_value,
    ]
    for t in tensors:
        assert abs(t.std().item() - 1) < 0.05 and abs(t.mean().item()) < 0.05


# -- Prefix-Tuning with huggingface peft's positions -----------------------------------------------------------------


SHIFTED = {
    "prefix_tuning": peft.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8, shift_positions=True),
    "p_tuning_v2": peft.PTuningV2Config(num_virtual_tokens=4, shift_positions=True),
}


def test_shift_positions_puts_the_real_tokens_behind_the_prefix():
    plain, model = patched(SHIFTED["p_tuning_v2"])
    x = torch.randint(0, V, (2, 6))
    wte, wpe = plain.input_layer.wte.weight, plain.input_layer.wpe.weight
    h0 = wte[x] + wpe[4:10]  # positions n..n+T-1
    prefixes = [(b.attn.prefix_key[0].expand(2, -1, -1), b.attn.prefix_value[0].expand(2, -1, -1))
                for b in model.encoder.blocks]
    torch.testing.assert_close(model(x)[0], forward_by_hand(plain, h0, prefixes), atol=1e-5, rtol=1e-5)
    model(torch.randint(0, V, (1, 28)))  # block 32 - 4 positions
    with pytest.raises(ValueError, match=r"29 tokens is too long.*shift_positions.*28"):
        model(torch.randint(0, V, (1, 29)))
    cache = KVCache(model.config.n_layer)
    model(torch.randint(0, V, (1, 26)), cache=cache)  # cached 26 + new 3 = 29 real tokens: too long as well
    with pytest.raises(ValueError, match=r"29 tokens is too long.*shift_positions.*28"):
        model(torch.randint(0, V, (1, 3)), cache=cache)
    with peft.disable_adapters(model):
        assert torch.equal(model(x)[0], plain(x)[0])
    peft.unload(model)
    assert type(model.input_layer).__name__ == "InputLayer" and torch.equal(model(x)[0], plain(x)[0])


@pytest.mark.parametrize("name", list(SHIFTED))
def test_shift_positions_cached_generation_and_padding(name):
    _, model = patched(SHIFTED[name])
    x = torch.randint(0, V, (2, 10))
    full, _ = model(x)
    cache = KVCache(model.config.n_layer)
    steps = [model(x[:, :4], cache=cache)[0]] + [model(x[:, t : t + 1], cache=cache)[0] for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # 10 + 25 tokens pass block_size - 4: the window slides, with and without the cache alike
    assert torch.equal(model.generate(x, 25, temperature=0), model.generate(x, 25, temperature=0, use_cache=False))
    long, short = torch.randint(0, V, (1, 7)), torch.randint(0, V, (1, 4))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    logits, _ = model(batch, attention_mask=torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]]))
    torch.testing.assert_close(logits[1:2, 3:], model(short)[0], atol=1e-5, rtol=1e-5)


def test_shift_positions_survives_export_and_saving(tmp_path):
    plain, model = patched(SHIFTED["prefix_tuning"])
    x = torch.randint(0, V, (2, 6))
    before = model(x)[0]
    prefix_tuning.export(model)
    assert model.peft_config.shift_positions and not model.peft_config.prefix_projection
    torch.testing.assert_close(model(x)[0], before, atol=1e-6, rtol=1e-6)
    peft.save_adapter(model, tmp_path / "p.safetensors")
    fresh = peft.load_adapter(copy.deepcopy(plain), tmp_path / "p.safetensors")
    torch.testing.assert_close(fresh(x)[0], before, atol=1e-6, rtol=1e-6)


@METHODS
def test_fp32_prompts_in_a_bf16_model(name):
    """get_peft_model(..., fp32_adapter=True): the prompt (or prefix, or encoder) stays float32 through a bf16 cast of
    the model, and the outputs follow the float32 model's."""
    plain, reference = patched(CONFIGS[name])
    model = peft.get_peft_model(copy.deepcopy(plain), CONFIGS[name], fp32_adapter=True)
    model.load_state_dict(reference.state_dict())
    model.to(torch.bfloat16)
    owned = peft.adapter_state_dict(model)
    assert owned and all(t.dtype == torch.float32 for t in owned.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in owned)
    x = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        out = model(x)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(x)[0].detach(), atol=0.1, rtol=0.05)
    _, loss = model.train()(x[:, :-1], targets=x[:, 1:])
    loss.backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in model.parameters() if t.requires_grad)
