"""Adapters in huggingface peft's format (peft.save_hf_adapter / peft.load_hf_adapter, peft/hf.py).

Plain tests: the file's names, shapes and config fields against huggingface peft's format written out by hand (what
PeftModel.save_pretrained writes for GPT-2: e.g. ``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight``);
a shared-A c_attn LoRA and a c_attn IA3 vector written by hand load here as the GPT with the update folded into its
weights by hand; every supported method makes the round trip with identical logits; and what has no exact
counterpart is refused.

Parity tests (``make parity``): a GPT-2-shaped minigpt GPT is written with minigpt.pretrained.save_gpt2, our adapters
with save_hf_adapter; transformers and huggingface peft (tests/reference/ref_hf_adapters.py, in .venv-ref) open
them with GPT2LMHeadModel.from_pretrained and PeftModel.from_pretrained and compute the same logits; and adapters that
huggingface peft made and saved on that folder load here with its logits.
"""

import copy
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft
from minigpt import GPT, GPTConfig, preset
from minigpt.pretrained import save_gpt2

V = 64
HF = "base_model.model.transformer.h.{}."


def tiny(seed=0):
    """preset tiny (2 layers, 2 heads, 32 dims: GPT-2's shape), biases and LayerNorms randomised."""
    torch.manual_seed(seed)
    model = GPT(preset("tiny", vocab_size=V))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def adapted(config, seed=0):
    """(plain copy, model with config applied and every method tensor moved off its initial value)."""
    base = tiny(seed)
    plain = copy.deepcopy(base)
    model = peft.get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return plain, model.eval()


def logits(model, x):
    with torch.no_grad():
        return model(x)[0]


X = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(5))


# -- the format, by hand --------------------------------------------------------------------------------------------


def test_lora_on_query_and_value_is_one_c_attn_lora_of_twice_the_rank(tmp_path):
    _, model = adapted(peft.LoraConfig(r=2, alpha=6, target_modules=["query", "value"]))
    peft.save_hf_adapter(model, tmp_path, base_model_name_or_path="path/to/gpt2")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "path/to/gpt2"
    assert config["r"] == 2 and config["lora_alpha"] == 6 and config["target_modules"] == ["attn.c_attn"]
    assert config["rank_pattern"] == {"attn.c_attn": 4} and config["alpha_pattern"] == {"attn.c_attn": 12}
    assert config["fan_in_fan_out"] is True and config["use_dora"] is False
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {HF.format(i) + f"attn.c_attn.lora_{x}.weight" for i in range(2) for x in "AB"}
    for i, block in enumerate(model.encoder.blocks):
        A, B = tensors[HF.format(i) + "attn.c_attn.lora_A.weight"], tensors[HF.format(i) + "attn.c_attn.lora_B.weight"]
        q, v = block.attn.query, block.attn.value
        assert A.shape == (4, 32) and B.shape == (96, 4)
        assert torch.equal(A, torch.cat([q.lora_A, v.lora_A]))
        expected = torch.zeros(96, 4)
        expected[:32, :2], expected[64:, 2:] = q.lora_B, v.lora_B  # rows q | k | v; the key gets nothing
        assert torch.equal(B, expected)
        # HF's update (12 / 4) B A is ours: (6 / 2) B_q A_q on the query rows, (6 / 2) B_v A_v on the value rows
        delta = 12 / 4 * B @ A
        torch.testing.assert_close(delta[:32], 3.0 * q.lora_B @ q.lora_A)
        torch.testing.assert_close(delta[64:], 3.0 * v.lora_B @ v.lora_A)
        assert torch.equal(delta[32:64], torch.zeros(32, 32))


def test_dora_magnitude_on_c_attn_holds_the_keys_own_row_norms(tmp_path):
    _, model = adapted(peft.LoraConfig(r=2, alpha=4, target_modules=["query", "value", "fc"], use_dora=True))
    peft.save_hf_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    for i, block in enumerate(model.encoder.blocks):
        m = tensors[HF.format(i) + "attn.c_attn.lora_magnitude_vector"]
        assert m.shape == (96,)
        assert torch.equal(m[:32], block.attn.query.lora_magnitude)
        assert torch.equal(m[64:], block.attn.value.lora_magnitude)
        W_k = block.attn.key.weight
        torch.testing.assert_close(m[32:64], torch.sqrt((W_k**2).sum(1)))  # ||W_k|| of each output: factor 1
        assert torch.equal(tensors[HF.format(i) + "mlp.c_fc.lora_magnitude_vector"], block.mlp.fc.lora_magnitude)


def test_ia3_vectors_in_hf_layout(tmp_path):
    _, model = adapted(peft.IA3Config())
    peft.save_hf_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    assert sorted(config["target_modules"]) == ["attn.c_attn", "mlp.c_proj"]
    assert config["feedforward_modules"] == ["mlp.c_proj"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for i, block in enumerate(model.encoder.blocks):
        qkv = tensors[HF.format(i) + "attn.c_attn.ia3_l"]
        assert qkv.shape == (96, 1)  # scales the outputs
        assert torch.equal(qkv[:32, 0], torch.ones(32))  # the query is not adapted
        assert torch.equal(qkv[32:64, 0], block.attn.key.l_k) and torch.equal(qkv[64:, 0], block.attn.value.l_v)
        ff = tensors[HF.format(i) + "mlp.c_proj.ia3_l"]
        assert ff.shape == (1, 128) and torch.equal(ff[0], block.mlp.proj.l_ff)  # scales the inputs


def test_prompt_and_prefix_tables(tmp_path):
    _, model = adapted(peft.PromptTuningConfig(num_virtual_tokens=3))
    peft.save_hf_adapter(model, tmp_path / "prompt")
    config = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 3 and config["token_dim"] == 32
    assert config["num_transformer_submodules"] == 1 and config["num_layers"] == 2
    tensors = load_file(tmp_path / "prompt" / "adapter_model.safetensors")
    assert set(tensors) == {"prompt_embeddings"}
    assert torch.equal(tensors["prompt_embeddings"], model.input_layer.prompt.weight[0])

    _, model = adapted(peft.PTuningV2Config(num_virtual_tokens=3, shift_positions=True))
    peft.save_hf_adapter(model, tmp_path / "prefix")
    config = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is False
    table = load_file(tmp_path / "prefix" / "adapter_model.safetensors")["prompt_embeddings"]
    assert table.shape == (3, 2 * 2 * 32)  # (n, n_layer * 2 * C)
    b0, b1 = (b.attn for b in model.encoder.blocks)
    expected = torch.cat([b0.prefix_key[0], b0.prefix_value[0], b1.prefix_key[0], b1.prefix_value[0]], dim=-1)
    assert torch.equal(table, expected)  # row i: K_0[i] | V_0[i] | K_1[i] | V_1[i]


def write_hf(folder, config, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"task_type": "CAUSAL_LM", **config}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def test_a_shared_a_c_attn_lora_loads_as_the_update_folded_in_by_hand(tmp_path):
    """As huggingface peft trains it: one A (R, C) for the three thirds of B (3C, R); alpha 6, R 3."""
    g = torch.Generator().manual_seed(0)
    tensors, folded = {}, tiny()
    for i, block in enumerate(folded.encoder.blocks):
        A, B = torch.randn(3, 32, generator=g), torch.randn(96, 3, generator=g)
        P_A, P_B = torch.randn(3, 128, generator=g), torch.randn(32, 3, generator=g)
        tensors.update({HF.format(i) + "attn.c_attn.lora_A.weight": A, HF.format(i) + "attn.c_attn.lora_B.weight": B,
                        HF.format(i) + "mlp.c_proj.lora_A.weight": P_A, HF.format(i) + "mlp.c_proj.lora_B.weight": P_B})
        with torch.no_grad():  # W_qkv (as three Linear weights) += (alpha / R) B A; mlp.proj likewise
            for j, proj in enumerate((block.attn.query, block.attn.key, block.attn.value)):
                proj.weight += 2.0 * B[32 * j : 32 * (j + 1)] @ A
            block.mlp.proj.weight += 2.0 * P_B @ P_A
    folder = write_hf(tmp_path, {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "bias": "none",
                                 "target_modules": ["c_attn", "mlp.c_proj"], "fan_in_fan_out": True}, tensors)
    model = peft.load_hf_adapter(tiny(), folder)
    assert model.peft_config.r == 3 and model.peft_config.scaling == 2.0
    assert sorted(model.peft_config.target_modules) == ["attn.key", "attn.query", "attn.value", "mlp.proj"]
    torch.testing.assert_close(logits(model, X), logits(folded, X), atol=1e-5, rtol=1e-5)


def test_a_c_attn_ia3_vector_loads_as_rows_scaled_by_hand(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors, folded = {}, tiny()
    for i, block in enumerate(folded.encoder.blocks):
        qkv, ff = 1 + 0.3 * torch.randn(96, 1, generator=g), 1 + 0.3 * torch.randn(1, 128, generator=g)
        tensors[HF.format(i) + "attn.c_attn.ia3_l"], tensors[HF.format(i) + "mlp.c_proj.ia3_l"] = qkv, ff
        with torch.no_grad():
            for j, proj in enumerate((block.attn.query, block.attn.key, block.attn.value)):
                proj.weight *= qkv[32 * j : 32 * (j + 1)]  # row o times its entry: the output scaled
                proj.bias *= qkv[32 * j : 32 * (j + 1), 0]
            block.mlp.proj.weight *= ff  # column i times its entry: the input scaled
    folder = write_hf(tmp_path, {"peft_type": "IA3", "target_modules": ["c_attn", "mlp.c_proj"],
                                 "feedforward_modules": ["mlp.c_proj"]}, tensors)
    model = peft.load_hf_adapter(tiny(), folder)
    assert model.peft_config.feedforward_modules == ["mlp.proj"]
    torch.testing.assert_close(logits(model, X), logits(folded, X), atol=1e-5, rtol=1e-5)


# -- round trips ------------------------------------------------------------------------------------------------------

ROUND_TRIPS = {
    "lora_qv": peft.LoraConfig(r=2, alpha=4),
    "lora_all_rslora": peft.LoraConfig(r=2, alpha=3, target_modules=["query", "key", "value", "proj", "fc"],
                                       use_rslora=True),
    "lora_one_layer": peft.LoraConfig(r=2, alpha=4, target_modules=["blocks.1.attn.key", "blocks.0.mlp.fc"]),
    "dora": peft.LoraConfig(r=2, alpha=4, target_modules=["query", "value", "mlp.proj"], use_dora=True),
    "ia3": peft.IA3Config(),
    "ia3_query_fc": peft.IA3Config(target_modules=["query", "key", "fc"], feedforward_modules=["fc"]),
    "prompt_tuning": peft.PromptTuningConfig(num_virtual_tokens=3),
    "prefix_projection": peft.PrefixTuningConfig(num_virtual_tokens=3, shift_positions=True, encoder_hidden_size=8),
    "p_tuning_v2": peft.PTuningV2Config(num_virtual_tokens=2, shift_positions=True),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_round_trip_keeps_the_logits(name, tmp_path):
    plain, model = adapted(ROUND_TRIPS[name])
    assert not torch.allclose(logits(model, X), logits(plain, X), atol=1e-3)
    peft.save_hf_adapter(model, tmp_path)
    back = peft.load_hf_adapter(plain, tmp_path)
    torch.testing.assert_close(logits(back, X), logits(model, X), atol=1e-6, rtol=1e-6)
    config, original = back.peft_config, ROUND_TRIPS[name]
    if isinstance(original, (peft.LoraConfig, peft.IA3Config)):  # the block form comes back as what it was made of
        assert adapted_modules(back) == adapted_modules(model)
        assert dataclasses.replace(config, target_modules=original.target_modules,
                                   feedforward_modules=original.feedforward_modules) == original \
            if isinstance(original, peft.IA3Config) else \
            dataclasses.replace(config, target_modules=original.target_modules) == original
    if isinstance(original, peft.PrefixTuningConfig):
        assert config.prefix_projection is False and config.shift_positions is True


def adapted_modules(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, peft.AdapterLayer)}


def test_p_tuning_travels_as_its_encoders_output(tmp_path):
    plain, model = adapted(peft.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8, encoder_dropout=0.2))
    model.train()  # the saved prompt is the deployed one: no LSTM dropout in it
    peft.save_hf_adapter(model, tmp_path)
    assert model.training
    back = peft.load_hf_adapter(plain, tmp_path)
    assert isinstance(back.peft_config, peft.PromptTuningConfig)
    torch.testing.assert_close(logits(back, X), logits(model.eval(), X), atol=1e-6, rtol=1e-6)


# -- refused ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, match", [
    (peft.BitFitConfig(), "no format for BitFit"),
    (peft.AdapterConfig(reduction_factor=8), "no format for bottleneck adapters"),
    (peft.PrefixTuningConfig(num_virtual_tokens=3), "shift_positions=True"),
    (peft.PromptTuningConfig(num_virtual_tokens=3, num_tasks=2), "num_tasks=2"),
    (peft.LoraConfig(target_modules=["query", "head"]), "'output_layer.head' has no counterpart"),
    (peft.IA3Config(target_modules=["query", "key"], feedforward_modules=["query"]), "one input-scaling vector"),
])
def test_what_has_no_exact_counterpart_is_refused(config, match, tmp_path):
    _, model = adapted(config)
    with pytest.raises(ValueError, match=match):
        peft.save_hf_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_other_shapes_and_merged_models_are_refused(tmp_path):
    post_ln = peft.get_peft_model(GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=8,
                                                layout="post_ln")), peft.LoraConfig(r=2))
    with pytest.raises(ValueError, match="GPT-2-shaped"):
        peft.save_hf_adapter(post_ln, tmp_path)
    _, model = adapted(peft.LoraConfig(r=2))
    peft.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        peft.save_hf_adapter(model, tmp_path)


def test_files_this_library_cannot_read_are_refused(tmp_path):
    lora = {HF.format(0) + "attn.c_attn.lora_A.weight": torch.zeros(2, 32),
            HF.format(0) + "attn.c_attn.lora_B.weight": torch.zeros(96, 2)}
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"]}
    cases = [
        ({**base, "bias": "all"}, lora, "bias='all'"),
        ({**base, "modules_to_save": ["lm_head"]}, lora, "modules_to_save"),
        ({**base, "task_type": "SEQ_CLS"}, lora, "SEQ_CLS"),
        ({**base, "peft_type": "LOHA"}, lora, "'LOHA' is not read here"),
        (base, {**lora, "base_model.model.lm_head.lora_A.weight": torch.zeros(2, 32)}, "'base_model.model.lm_head"),
        (base, {k: v[:, :16] if "lora_A" in k else v for k, v in lora.items()}, "shapes"),
        ({**base, "target_modules": ["c_attn", "c_fc"], "rank_pattern": {"c_fc": 4}},
         {**lora, HF.format(0) + "mlp.c_fc.lora_A.weight": torch.zeros(4, 32),
          HF.format(0) + "mlp.c_fc.lora_B.weight": torch.zeros(128, 4)}, "one rank and one scaling"),
        ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "num_layers": 4, "token_dim": 32},
         {"prompt_embeddings": torch.zeros(3, 4 * 2 * 32)}, "made for another model"),
    ]
    for k, (config, tensors, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            peft.load_hf_adapter(tiny(), write_hf(tmp_path / str(k), {**config}, tensors))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peft.load_hf_adapter(tiny(), tmp_path / "nothing")


# -- parity: transformers and huggingface peft open these files ------------------------------------------------------

L, H, C, VOCAB, N = 3, 4, 96, 500, 64  # a GPT-2-shaped model: layers, heads, width, vocabulary, positions
TOL = 1e-5
OURS = {  # our adapters, saved for huggingface peft to open
    "lora_qv": peft.LoraConfig(r=4, alpha=8),
    "lora_all_rslora": peft.LoraConfig(r=4, alpha=8, target_modules=["query", "key", "value", "proj", "fc"],
                                       use_rslora=True),
    "dora": peft.LoraConfig(r=4, alpha=8, target_modules=["query", "value", "fc"], use_dora=True),
    "ia3": peft.IA3Config(),
    "ia3_query": peft.IA3Config(target_modules=["query", "value", "fc"], feedforward_modules=[]),
    "prompt_tuning": peft.PromptTuningConfig(num_virtual_tokens=5),
    "p_tuning": peft.PTuningConfig(num_virtual_tokens=5, encoder_reparameterization_type="mlp", encoder_hidden_size=16),
    "prefix": peft.PrefixTuningConfig(num_virtual_tokens=5, shift_positions=True, encoder_hidden_size=16),
    "p_tuning_v2": peft.PTuningV2Config(num_virtual_tokens=5, shift_positions=True),
}
THEIRS = {  # huggingface peft's adapters, saved there for us to open
    "lora": ("LoraConfig", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
    "rslora_fc": ("LoraConfig", {"r": 2, "lora_alpha": 4, "target_modules": ["c_fc"], "use_rslora": True,
                                 "fan_in_fan_out": True}),
    "dora": ("LoraConfig", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "mlp.c_proj"], "use_dora": True,
                            "fan_in_fan_out": True}),
    "ia3": ("IA3Config", {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"],
                          "fan_in_fan_out": True}),
    "prompt_tuning": ("PromptTuningConfig", {"num_virtual_tokens": 5}),
    "p_tuning": ("PromptEncoderConfig", {"num_virtual_tokens": 5, "encoder_reparameterization_type": "MLP",
                                         "encoder_hidden_size": 16}),
    "prefix": ("PrefixTuningConfig", {"num_virtual_tokens": 5}),
    "prefix_projection": ("PrefixTuningConfig", {"num_virtual_tokens": 5, "prefix_projection": True,
                                                 "encoder_hidden_size": 16}),
}


def gpt2_shaped(seed=3):
    """A minigpt GPT of GPT-2's shape with every weight, bias and LayerNorm random (std 0.1 around GPT-2's init)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=N, n_layer=L, n_head=H, n_embd=C))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def travel(tmp_path_factory):
    """The GPT-2 folder, our adapters saved into folders, and what the reference computed (one process)."""
    from reference.bridge import run_reference, skip_without_reference

    skip_without_reference()
    root = tmp_path_factory.mktemp("travel")
    model_dir = save_gpt2(gpt2_shaped(), root / "gpt2")
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    ours = {}
    for k, (name, config) in enumerate(OURS.items()):
        model = peft.get_peft_model(GPT.from_pretrained(model_dir).eval(), config)
        g = torch.Generator().manual_seed(20 + k)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
        ours[name] = logits(model, idx)
        peft.save_hf_adapter(model, root / "ours" / name, base_model_name_or_path=str(model_dir))
    load = [{"name": n, "folder": str(root / "ours" / n)} for n in OURS]
    make = [{"name": n, "folder": str(root / "theirs" / n), "config_class": cls, "config": cfg, "seed": 40 + k}
            for k, (n, (cls, cfg)) in enumerate(THEIRS.items())]
    ref = run_reference("ref_hf_adapters", {"idx": idx}, {"model_dir": str(model_dir), "load": load, "make": make})
    return {"model_dir": model_dir, "root": root, "idx": idx, "ours": ours, "ref": ref}


def max_diff(a, b):
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


def close(a, b) -> bool:
    """Equal up to float32 rounding: TOL, relative to the logits' size once they exceed 1 (adapters on every layer
    make them larger, and two float32 implementations' rounding differences grow with them; lora_all_rslora reached
    1.8e-5 on one CPU)."""
    return max_diff(a, b) <= TOL * max(1.0, b.abs().max().item())


@pytest.mark.parity
@pytest.mark.parametrize("name", list(OURS))
def test_hf_peft_opens_our_adapter_with_our_logits(travel, name):
    base = logits(GPT.from_pretrained(travel["model_dir"]).eval(), travel["idx"])
    assert max_diff(travel["ours"][name], base) > 1e-2  # the adapter does change the outputs
    assert close(travel["ref"][f"load.{name}.logits"], travel["ours"][name])


@pytest.mark.parity
@pytest.mark.parametrize("name", list(THEIRS))
def test_an_adapter_hf_peft_saved_loads_here_with_its_logits(travel, name):
    model = peft.load_hf_adapter(GPT.from_pretrained(travel["model_dir"]).eval(), travel["root"] / "theirs" / name)
    expected = travel["ref"][f"make.{name}.logits"]
    assert max_diff(expected, travel["ref"]["base.logits"]) > 1e-2
    assert close(logits(model, travel["idx"]), expected)
    if name == "lora":  # HF trained a shared A for the three thirds: query, key and value, each of rank 4
        assert model.peft_config.r == 4 and math.isclose(model.peft_config.scaling, 2.0)
