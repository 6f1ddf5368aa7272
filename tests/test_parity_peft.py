"""Parity with Hugging Face peft: the same GPT-2 weights and the same adapter tensors give the same outputs.

The test writes a small random GPT-2 in Hugging Face's format (the helpers of test_parity_gpt2.py); minigpt loads it
with GPT.from_pretrained and this project's peft patches it here, while transformers' GPT2LMHeadModel and Hugging
Face's peft run in .venv-ref, in another process (tests/reference/ref_peft_methods.py through bridge.py). Each case
sets every trainable tensor of our model to seeded random values (LoRA's B included, so the update is not zero),
hands the same values to the reference under HF's parameter names, and compares the logits, the loss (mean
next-token cross-entropy of the real tokens), the gradient of every adapter tensor, and per case merged logits,
greedy generation and a left-padded batch. Float32, eval mode, dropout 0, tolerance 1e-5.

How our modules map onto HF GPT-2's (HF fuses q, k, v into one Conv1D ``c_attn`` (C -> 3C), fan_in_fan_out):

LoRA (r, alpha; scaling alpha / r, or alpha / sqrt(r) with rsLoRA)
    ours  query, value, fc, attn.proj, mlp.proj              HF  c_attn, mlp.c_fc, attn.c_proj, mlp.c_proj
    fc / proj map one to one: lora_A (r, in), lora_B (out, r) have the same layout on both sides.
    q and v by construction: HF's c_attn adapter has rank 2r and
        A = [A_q; A_v]  (2r, C)          B = [[B_q, 0], [0, 0], [0, B_v]]  (3C, 2r): rows q | k | v
    so B A = [B_q A_q; 0; B_v A_v]: the key gets nothing, query and value get exactly our updates. Its scaling must
    equal ours: alpha_HF / (2r) = alpha / r, i.e. alpha_HF = 2 alpha (rsLoRA: alpha_HF / sqrt(2r) = alpha / sqrt(r),
    alpha_HF = sqrt(2) alpha), set with HF's rank_pattern / alpha_pattern. The gradients of A_q, A_v, B_q, B_v are
    compared with the matching blocks of HF's; HF's off-diagonal blocks of B have gradients but no counterpart here.
DoRA (use_dora): the same block form on c_attn; HF's magnitude there is (3C,), [m_q; ||W_k||; m_v], the key third
    the key weight's own row norms, so its factor m / ||W_0 + s B A||_c is exactly 1 (the key's B rows are zero).
    The gradients of m_q, m_v (and A, B) are compared with the matching parts of HF's; both detach the norm.
IA3
    ours  attn.key (l_k), attn.value (l_v): the output scaled; mlp.proj (l_ff): the input scaled (feedforward)
    HF    c_attn (its vector scales all 3C outputs) and mlp.c_proj as a feedforward module (the input scaled):
          HF's default targets for GPT-2. The q third of HF's c_attn vector is set to ones, [1; l_k; l_v].
Prompt Tuning, P-Tuning
    Same position convention on both sides: the n virtual tokens take positions 0..n-1, the real tokens n..n+T-1.
    HF returns logits for the virtual tokens too, (B, n + T, V); ours for the real tokens only, so HF's [:, n:].
    HF's P-Tuning encoders are architecturally the same as ours ("MLP": Linear-ReLU-Linear-ReLU-Linear; "LSTM": a
    2-layer bi-LSTM then Linear-ReLU-Linear), so the encoder weights themselves are copied, by the same names.
    HF ignores position_ids for these methods, and its GPT-2 counts positions over padding, so no padded batch here.
Generation (prompt methods): with these pins HF peft's *cached* generate is broken. transformers 5.24 renamed the
    model's ``past_key_values`` argument to ``cache``; peft 0.21.2 still reads and writes
    model_kwargs["past_key_values"], so (as far as we traced it) it never sees the cache generate keeps: Prompt
    Tuning / P-Tuning re-prepend the n virtual tokens at every decoding step (each step feeds n + 1 embeddings, the
    positions run off the table), and Prefix-Tuning's prefix never reaches the model (GPT-2 gets an empty cache at
    prefill).
    HF's uncached generate re-runs the whole sequence through PeftModel.forward each step and agrees with HF's own
    forward pass, so the reference generates with use_cache=False, and ours with its KV cache must reproduce it.
Prefix-Tuning
    HF stores the whole prefix as one (n, n_layer * 2 * C) table, per row layer 0 key | layer 0 value | layer 1 key
    ...; ours keeps (n, C) prefix_key / prefix_value per layer. With prefix_projection both use P' (n, C) ->
    Linear -> tanh -> Linear -> n_layer * 2 * C in that same layout (HF's ``transform`` is our ``mlp``).
    Positions differ. Ours: the prefix takes no positions, the real tokens keep 0..T-1. HF: the prefix sits in the
    KV cache, so GPT-2 gives the real tokens positions n..n+T-1; and position_ids passed to HF peft get n added
    (peft_model.py, _adjust_prompt_learning_kwargs). So the reference passes position_ids = arange(T) - n to get
    ours. test_prefix_default_positions checks HF's own convention too: without position_ids HF equals our model
    with shift_positions=True (real tokens at n..n+T-1).

Run with `make parity`; without .venv-ref these tests skip.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from reference.bridge import run_reference, skip_without_reference
from test_parity_gpt2 import C, L, V, left_padded_batch, random_hf_gpt2, write_hf_dir

import peft
from minigpt import GPT

pytestmark = pytest.mark.parity

R, ALPHA = 4, 8.0  # LoRA rank and alpha (scaling 2; rsLoRA: 4)
N_VIRTUAL = 5  # virtual tokens of the prompt methods
HIDDEN = 32  # width of the P-Tuning and prefix encoders
NEW = 10  # tokens generated greedily
TOL = 1e-5
HF = "base_model.model.transformer.h.{}."  # HF peft's name of GPT-2 block i
PROMPT = "prompt_encoder.default."  # HF peft's prompt / prefix encoder


# ----------------------------------------------------------------------------------------------------------
# Mapping our adapter tensors to HF peft's parameters (pack) and HF's gradients back to ours (unpack)


def pack_lora(ours: dict, with_mlp: bool) -> dict:
    hf = {}
    for i in range(L):
        o, h = f"encoder.blocks.{i}.", HF.format(i) + "attn.c_attn.lora_{}.default.weight"
        B = torch.zeros(3 * C, 2 * R)  # rows q | k | v, columns A_q's rank | A_v's rank
        B[:C, :R], B[2 * C :, R:] = ours[o + "attn.query.lora_B"], ours[o + "attn.value.lora_B"]
        hf[h.format("A")] = torch.cat([ours[o + "attn.query.lora_A"], ours[o + "attn.value.lora_A"]])  # (2r, C)
        hf[h.format("B")] = B
        if with_mlp:
            for mine, theirs in (("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                for ab in "AB":
                    hf[HF.format(i) + f"{theirs}.lora_{ab}.default.weight"] = ours[o + f"{mine}.lora_{ab}"]
    return hf


def unpack_lora(hf: dict, with_mlp: bool) -> dict:
    ours = {}
    for i in range(L):
        o, h = f"encoder.blocks.{i}.", HF.format(i) + "attn.c_attn.lora_{}.default.weight"
        A, B = hf[h.format("A")], hf[h.format("B")]
        ours[o + "attn.query.lora_A"], ours[o + "attn.value.lora_A"] = A[:R], A[R:]
        ours[o + "attn.query.lora_B"], ours[o + "attn.value.lora_B"] = B[:C, :R], B[2 * C :, R:]
        if with_mlp:
            for mine, theirs in (("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                for ab in "AB":
                    ours[o + f"{mine}.lora_{ab}"] = hf[HF.format(i) + f"{theirs}.lora_{ab}.default.weight"]
    return ours


def pack_dora(ours: dict) -> dict:
    """DoRA on query, value and mlp.fc: LoRA's block form on c_attn, and a (3C,) magnitude whose key third is the
    key weight's own row norms (its factor m / ||W|| is then exactly 1), passed in as "key_norm.{i}"."""
    hf = {}
    for i in range(L):
        o, h = f"encoder.blocks.{i}.", HF.format(i)
        B = torch.zeros(3 * C, 2 * R)
        B[:C, :R], B[2 * C :, R:] = ours[o + "attn.query.lora_B"], ours[o + "attn.value.lora_B"]
        hf[h + "attn.c_attn.lora_A.default.weight"] = torch.cat([ours[o + "attn.query.lora_A"],
                                                                 ours[o + "attn.value.lora_A"]])
        hf[h + "attn.c_attn.lora_B.default.weight"] = B
        hf[h + "attn.c_attn.lora_magnitude_vector.default.weight"] = torch.cat(
            [ours[o + "attn.query.lora_magnitude"], ours[f"key_norm.{i}"], ours[o + "attn.value.lora_magnitude"]])
        for x in ("A", "B"):
            hf[h + f"mlp.c_fc.lora_{x}.default.weight"] = ours[o + f"mlp.fc.lora_{x}"]
        hf[h + "mlp.c_fc.lora_magnitude_vector.default.weight"] = ours[o + "mlp.fc.lora_magnitude"]
    return hf


def unpack_dora(hf: dict) -> dict:
    ours = {}
    for i in range(L):
        o, h = f"encoder.blocks.{i}.", HF.format(i)
        A, B = hf[h + "attn.c_attn.lora_A.default.weight"], hf[h + "attn.c_attn.lora_B.default.weight"]
        m = hf[h + "attn.c_attn.lora_magnitude_vector.default.weight"]
        ours[o + "attn.query.lora_A"], ours[o + "attn.value.lora_A"] = A[:R], A[R:]
        ours[o + "attn.query.lora_B"], ours[o + "attn.value.lora_B"] = B[:C, :R], B[2 * C :, R:]
        ours[o + "attn.query.lora_magnitude"], ours[o + "attn.value.lora_magnitude"] = m[:C], m[2 * C :]
        for x in ("A", "B"):
            ours[o + f"mlp.fc.lora_{x}"] = hf[h + f"mlp.c_fc.lora_{x}.default.weight"]
        ours[o + "mlp.fc.lora_magnitude"] = hf[h + "mlp.c_fc.lora_magnitude_vector.default.weight"]
    return ours


def key_norms(model) -> dict:
    """||W_k|| of each output of every block's key projection (DoRA's magnitude for HF's key third)."""
    return {f"key_norm.{i}": torch.linalg.norm(b.attn.key.weight.detach(), dim=1)
            for i, b in enumerate(model.encoder.blocks)}


def pack_ia3(ours: dict) -> dict:
    hf = {}
    for i in range(L):
        o = f"encoder.blocks.{i}."
        qkv = torch.cat([torch.ones(C), ours[o + "attn.key.l_k"], ours[o + "attn.value.l_v"]])  # (3C,)
        hf[HF.format(i) + "attn.c_attn.ia3_l.default"] = qkv[:, None]  # (3C, 1): scales the outputs
        hf[HF.format(i) + "mlp.c_proj.ia3_l.default"] = ours[o + "mlp.proj.l_ff"][None, :]  # (1, 4C): the inputs
    return hf


def unpack_ia3(hf: dict) -> dict:
    ours = {}
    for i in range(L):
        o, qkv = f"encoder.blocks.{i}.", hf[HF.format(i) + "attn.c_attn.ia3_l.default"][:, 0]
        ours[o + "attn.key.l_k"], ours[o + "attn.value.l_v"] = qkv[C : 2 * C], qkv[2 * C :]
        ours[o + "mlp.proj.l_ff"] = hf[HF.format(i) + "mlp.c_proj.ia3_l.default"][0]
    return ours


def pack_prompt(ours: dict) -> dict:
    """Prompt Tuning: P_e (1, n, C) is HF's embedding table (n, C)."""
    return {PROMPT + "embedding.weight": ours["input_layer.prompt.weight"][0]}


def unpack_prompt(hf: dict) -> dict:
    return {"input_layer.prompt.weight": hf[PROMPT + "embedding.weight"][None]}


def pack_p_tuning(ours: dict) -> dict:
    """P-Tuning: the pseudo tokens' inputs h (1, n, C) are HF's embedding table; the heads have the same names."""
    hf = {PROMPT + "embedding.weight": ours["input_layer.prompt.embedding"][0]}
    hf.update({PROMPT + k.removeprefix("input_layer.prompt."): v for k, v in ours.items() if "_head." in k})
    return hf


def unpack_p_tuning(hf: dict) -> dict:
    ours = {"input_layer.prompt.embedding": hf[PROMPT + "embedding.weight"][None]}
    ours.update({"input_layer.prompt." + k.removeprefix(PROMPT): v for k, v in hf.items() if "_head." in k})
    return ours


def pack_prefix(ours: dict) -> dict:
    """Prefix-Tuning without reparameterisation: row i of HF's table is [K_0[i], V_0[i], K_1[i], V_1[i], ...]."""
    kv = [ours[f"encoder.blocks.{i}.attn.prefix_{w}"][0] for i in range(L) for w in ("key", "value")]
    return {PROMPT + "embedding.weight": torch.cat(kv, dim=-1)}  # (n, L * 2 * C)


def unpack_prefix(hf: dict) -> dict:
    table = hf[PROMPT + "embedding.weight"].view(N_VIRTUAL, L, 2, C)
    return {f"encoder.blocks.{i}.attn.prefix_{w}": table[:, i, j][None]
            for i in range(L) for j, w in enumerate(("key", "value"))}


PREFIX_MLP = {"prefix_encoder.mlp.0.": "transform.0.", "prefix_encoder.mlp.2.": "transform.2."}


def pack_prefix_projection(ours: dict) -> dict:
    """With reparameterisation: P' (1, n, C) is HF's embedding; our mlp.0 / mlp.2 are HF's transform.0 / 2."""
    hf = {PROMPT + "embedding.weight": ours["prefix_encoder.embedding"][0]}
    for mine, theirs in PREFIX_MLP.items():
        for w in ("weight", "bias"):
            hf[PROMPT + theirs + w] = ours[mine + w]
    return hf


def unpack_prefix_projection(hf: dict) -> dict:
    ours = {"prefix_encoder.embedding": hf[PROMPT + "embedding.weight"][None]}
    for mine, theirs in PREFIX_MLP.items():
        for w in ("weight", "bias"):
            ours[mine + w] = hf[PROMPT + theirs + w]
    return ours


# ----------------------------------------------------------------------------------------------------------
# The cases: our config, HF peft's, how our tensors are drawn, and the mapping


def normal(std, mean=0.0):
    return lambda name, p, g: mean + std * torch.randn(p.shape, generator=g)


def keep(name, p, g):  # the seeded initialisation our method gave it (encoder weights, N(0, 1) embeddings)
    return p.detach().clone()


LORA_TARGETS = ["query", "value", "fc", "proj"]  # "proj": attn.proj and mlp.proj
HF_LORA = {
    "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "fan_in_fan_out": True,
    "target_modules": ["c_attn", "c_fc", "c_proj"],
    "rank_pattern": {"c_attn": 2 * R}, "alpha_pattern": {"c_attn": 2 * ALPHA},
}
HF_RSLORA = {
    "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "fan_in_fan_out": True, "target_modules": ["c_attn"],
    "use_rslora": True, "rank_pattern": {"c_attn": 2 * R}, "alpha_pattern": {"c_attn": math.sqrt(2) * ALPHA},
}
HF_DORA = {
    "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "fan_in_fan_out": True, "target_modules": ["c_attn", "c_fc"],
    "use_dora": True, "rank_pattern": {"c_attn": 2 * R}, "alpha_pattern": {"c_attn": 2 * ALPHA},
}
HF_IA3 = {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"], "fan_in_fan_out": True}
HF_PROMPT = {"num_virtual_tokens": N_VIRTUAL}
HF_P_MLP = {"num_virtual_tokens": N_VIRTUAL, "encoder_reparameterization_type": "MLP", "encoder_hidden_size": HIDDEN}
HF_P_LSTM = {"num_virtual_tokens": N_VIRTUAL, "encoder_reparameterization_type": "LSTM",
             "encoder_hidden_size": HIDDEN, "encoder_num_layers": 2}
HF_PREFIX = {"num_virtual_tokens": N_VIRTUAL}
HF_PREFIX_MLP = {"num_virtual_tokens": N_VIRTUAL, "prefix_projection": True, "encoder_hidden_size": HIDDEN}

# name: our config, (HF peft's config class, its arguments), how our tensors are drawn, pack / unpack, extras
CASES = {
    "lora": {
        "ours": peft.LoraConfig(r=R, alpha=ALPHA, target_modules=LORA_TARGETS),
        "hf": ("LoraConfig", HF_LORA), "draw": normal(0.1),
        "pack": lambda t: pack_lora(t, True), "unpack": lambda t: unpack_lora(t, True), "merge": True,
    },
    "rslora_qv": {
        "ours": peft.LoraConfig(r=R, alpha=ALPHA, target_modules=["query", "value"], use_rslora=True),
        "hf": ("LoraConfig", HF_RSLORA), "draw": normal(0.1),
        "pack": lambda t: pack_lora(t, False), "unpack": lambda t: unpack_lora(t, False), "merge": True,
    },
    "dora": {  # the magnitudes drawn around 1.2 x their start (the row norms of W_0 + s B A are near 0.6 here)
        "ours": peft.LoraConfig(r=R, alpha=ALPHA, target_modules=["query", "value", "fc"], use_dora=True),
        "hf": ("LoraConfig", HF_DORA),
        "draw": lambda name, p, g: p.detach() * (1.2 + 0.2 * torch.randn(p.shape, generator=g))
        if name.endswith("lora_magnitude") else 0.1 * torch.randn(p.shape, generator=g),
        "pack": pack_dora, "unpack": unpack_dora, "merge": True, "extra": key_norms,
    },
    "ia3": {
        "ours": peft.IA3Config(),  # attn.key, attn.value, mlp.proj (feedforward)
        "hf": ("IA3Config", HF_IA3), "draw": normal(0.3, mean=1.0),
        "pack": pack_ia3, "unpack": unpack_ia3, "merge": True,
    },
    "prompt_tuning": {
        "ours": peft.PromptTuningConfig(num_virtual_tokens=N_VIRTUAL),
        "hf": ("PromptTuningConfig", HF_PROMPT), "draw": normal(0.5),
        "pack": pack_prompt, "unpack": unpack_prompt, "generate": NEW,
    },
    "p_tuning_mlp": {
        "ours": peft.PTuningConfig(num_virtual_tokens=N_VIRTUAL, encoder_reparameterization_type="mlp",
                                   encoder_hidden_size=HIDDEN),
        "hf": ("PromptEncoderConfig", HF_P_MLP), "draw": keep,
        "pack": pack_p_tuning, "unpack": unpack_p_tuning, "generate": NEW,
    },
    "p_tuning_lstm": {
        "ours": peft.PTuningConfig(num_virtual_tokens=N_VIRTUAL, encoder_reparameterization_type="lstm",
                                   encoder_hidden_size=HIDDEN, encoder_num_layers=2),
        "hf": ("PromptEncoderConfig", HF_P_LSTM), "draw": keep, "pack": pack_p_tuning, "unpack": unpack_p_tuning,
    },
    "prefix": {
        "ours": peft.PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL, prefix_projection=False),
        "hf": ("PrefixTuningConfig", HF_PREFIX), "draw": normal(0.5),
        "pack": pack_prefix, "unpack": unpack_prefix, "positions": "explicit", "padded": True,
    },
    "prefix_projection": {
        "ours": peft.PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL, prefix_projection=True,
                                        encoder_hidden_size=HIDDEN),
        "hf": ("PrefixTuningConfig", HF_PREFIX_MLP), "draw": keep,
        "pack": pack_prefix_projection, "unpack": unpack_prefix_projection, "positions": "explicit",
    },
}
# HF's own position convention, with the tensors of "prefix" (see test_prefix_default_positions)
HF_ONLY = {"prefix_default_positions": {"like": "prefix", "hf": ("PrefixTuningConfig", HF_PREFIX), "generate": NEW}}


def adapted_model(model_dir, name):
    """Our GPT with case name's method applied and every trainable tensor drawn from a seeded generator."""
    case = CASES[name]
    torch.manual_seed(0)  # the initialisation that `keep` keeps
    model = peft.get_peft_model(GPT.from_pretrained(model_dir), case["ours"]).eval()
    g = torch.Generator().manual_seed(10 + list(CASES).index(name))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(case["draw"](n, p, g))
    return model


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The model directory, the inputs, our adapter tensors per case, and everything HF peft computed (one
    reference process for all cases)."""
    skip_without_reference()
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, V, (2, 12), generator=g)
    pad_idx, pad_mask = left_padded_batch(g)
    model_dir = write_hf_dir(tmp_path_factory.mktemp("gpt2") / "hf", random_hf_gpt2(seed=3))
    inputs, specs, tensors = {"idx": idx, "pad_idx": pad_idx, "pad_mask": pad_mask}, [], {}
    for name in CASES:
        model = adapted_model(model_dir, name)
        tensors[name] = {n: p.detach().clone() for n, p in trainable(model).items()}
        tensors[name].update(CASES[name].get("extra", lambda m: {})(model))  # what the packing needs besides
    for name, c in {**CASES, **HF_ONLY}.items():
        source = c.get("like", name)
        cls, config = c["hf"]
        inputs.update({f"{name}:{k}": v for k, v in CASES[source]["pack"](tensors[source]).items()})
        specs.append({"name": name, "config_class": cls, "config": config, "positions": c.get("positions"),
                      "merge": c.get("merge", False), "generate": c.get("generate", 0), "padded": c.get("padded")})
    ref = run_reference("ref_peft_methods", inputs, {"model_dir": str(model_dir), "cases": specs})
    return {"model_dir": model_dir, "idx": idx, "pad_idx": pad_idx, "pad_mask": pad_mask, "ref": ref,
            "tensors": tensors}


def max_diff(a, b):
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


def real_token_loss(logits, idx):
    """Mean cross-entropy of each real token's prediction of the next one (computed the same way on HF's side)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))


def hf_real_logits(case, name, key="logits"):
    """HF's logits for the real tokens: prompt and p-tuning prepend n virtual tokens to HF's output."""
    logits = case["ref"][f"{name}.{key}"]
    return logits[:, -case["idx"].size(1) :] if key == "logits" else logits


# ----------------------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("name", list(CASES))
def test_logits_loss_and_gradients_match(case, name):
    model = adapted_model(case["model_dir"], name)
    for n, p in trainable(model).items():  # the fixture sent HF these very tensors
        assert torch.equal(p, case["tensors"][name][n])
    idx, ref = case["idx"], case["ref"]
    logits, _ = model(idx)  # (B, T, V)
    with torch.no_grad(), peft.disable_adapters(model):
        base_logits, _ = model(idx)
    assert max_diff(logits, base_logits) > 1e-2, "the adapter barely changes the output: the comparison is weak"

    assert max_diff(logits, hf_real_logits(case, name)) <= TOL
    loss = real_token_loss(logits, idx)
    assert abs(loss.item() - ref[f"{name}.loss"].item()) <= TOL
    loss.backward()
    prefix = f"{name}.grad."
    hf_grads = CASES[name]["unpack"]({k[len(prefix) :]: v for k, v in ref.items() if k.startswith(prefix)})
    grads = {n: p.grad for n, p in trainable(model).items()}
    assert set(hf_grads) == set(grads)
    for n, grad in grads.items():
        assert max_diff(grad, hf_grads[n]) <= TOL, n


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.get("merge")])
def test_merged_logits_match(case, name):
    """LoRA and IA3 folded into the base weights: ours (peft.merge) and HF's (merge_adapter) agree, and merging
    changes neither side's outputs beyond float rounding."""
    model = adapted_model(case["model_dir"], name)
    with torch.no_grad():
        peft.merge(model)
        merged, _ = model(case["idx"])
    assert max_diff(merged, case["ref"][f"{name}.merged_logits"]) <= TOL
    assert max_diff(merged, case["ref"][f"{name}.logits"]) <= TOL


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.get("generate")])
def test_greedy_generation_matches(case, name):
    """Prompt methods, our generate with the KV cache: each cached step shifts the real position by n and reads the
    virtual tokens from the cache; HF recomputes [prompt; tokens] every step (see the module docstring)."""
    out = adapted_model(case["model_dir"], name).generate(case["idx"], NEW, temperature=0, use_cache=True)
    expected = case["ref"][f"{name}.gen"]
    assert out.shape == expected.shape == (case["idx"].size(0), case["idx"].size(1) + NEW)
    assert torch.equal(out, expected)


def test_prefix_left_padded_batch_matches_on_real_tokens(case):
    """A left-padded batch with the prefix: every real query sees the whole prefix and its row's real tokens."""
    mask = case["pad_mask"].bool()
    with torch.no_grad():
        logits, _ = adapted_model(case["model_dir"], "prefix")(case["pad_idx"], attention_mask=case["pad_mask"])
    assert max_diff(logits[mask], case["ref"]["prefix.pad_logits"][mask]) <= TOL  # (n_real, V) each


def test_prefix_default_positions(case):
    """HF's own convention, without position_ids: the real tokens take positions n..n+T-1 behind the prefix in the
    KV cache. Ours with PrefixTuningConfig(shift_positions=True) and the same prefix computes exactly what HF does,
    in a forward pass and in greedy generation (ours cached, HF's uncached: see the module docstring)."""
    model = peft.get_peft_model(GPT.from_pretrained(case["model_dir"]).eval(),
                                peft.PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL, prefix_projection=False,
                                                        shift_positions=True))
    with torch.no_grad():
        for n, p in trainable(model).items():
            p.copy_(case["tensors"]["prefix"][n])  # the "prefix" case's tensors, which HF was given
    idx, ref = case["idx"], case["ref"]
    with torch.no_grad():
        logits, _ = model(idx)
    assert max_diff(logits, ref["prefix_default_positions.logits"]) <= TOL
    assert max_diff(logits, ref["prefix.logits"]) > 1e-2  # the two conventions do differ
    out = model.generate(idx, NEW, temperature=0, use_cache=True)
    assert torch.equal(out, ref["prefix_default_positions.gen"])
