"""huggingface peft's adapter format, written and read here without huggingface peft or transformers.

    peft.save_hf_adapter(model, "out/hf_lora", base_model_name_or_path="out/gpt2")   # adapter_config.json +
    peft.load_hf_adapter(GPT.from_pretrained("out/gpt2"), "out/hf_lora")           # adapter_model.safetensors

The base is a GPT-2-shaped minigpt GPT (pre-LN, biases), which ``minigpt.pretrained.save_gpt2`` writes as a GPT-2
folder; huggingface peft's ``PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(folder), adapter_folder)``
then computes the same logits as the model here, and an adapter huggingface peft trained on that folder loads here
with its logits. The folder holds what ``PeftModel.save_pretrained`` writes: the config (``peft_type``,
``task_type`` CAUSAL_LM and the method's fields) and the tensors under huggingface peft's names, e.g.
``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`` (no adapter name).

How the modules map. GPT-2 has one fused attention input projection, ``attn.c_attn`` (a Conv1D, C -> 3C: the
query, key and value outputs side by side); this GPT has three Linear layers, ``attn.query``, ``attn.key``,
``attn.value``. The other modules map one to one: ``attn.proj`` <-> ``attn.c_proj``, ``mlp.fc`` <-> ``mlp.c_fc``,
``mlp.proj`` <-> ``mlp.c_proj``. Anything else (the tied output head, the embeddings) is refused, by name.

LoRA (and DoRA)
    One HF LoRA on c_attn has a single A (R, C) shared by the three thirds of its B (3C, R). Written from here, the
    k adapted projections among query, key and value become one HF LoRA of rank k r, which is exact:
        A = [A_q; A_v] (2r, C),   B = [[B_q, 0], [0, 0], [0, B_v]] (3C, 2r),   so B A = [B_q A_q; 0; B_v A_v]
    with that module's alpha set by ``alpha_pattern`` (and its rank by ``rank_pattern``) so that its scaling is ours
    (alpha / r = alpha_HF / (k r); rsLoRA: alpha_HF = sqrt(k) alpha). DoRA's magnitude on c_attn is (3C,): ours for
    the adapted thirds, the base's own row norms ||W_k|| for the others (their factor m / ||W|| is then 1).
    Read here, a c_attn LoRA whose B has that block form (each third's columns disjoint from the others', of equal
    number) comes back as the separate LoRAs it was made of; any other (an adapter huggingface peft trained) becomes
    query, key and value each with the shared A and its third of B, of rank R: exact as well. This LoRA has one rank
    and one scaling for all its targets, so an adapter whose modules differ in either is refused.
IA3
    HF's vector on c_attn scales its 3C outputs: [l_q; l_k; l_v], a third of ones where this model does not adapt
    that projection. Read back, a third of exact ones is left out (unless every vector is ones: an untrained
    adapter keeps l_k and l_v, IA3's own targets). A feedforward (input
    scaling) vector on c_attn is one vector for the three projections: written only if all three carry the same one.
Prompt Tuning, P-Tuning
    The same positions on both sides (virtual tokens 0..n-1, real tokens n..n+T-1). Written as PROMPT_TUNING with
    the prompt the model uses (P-Tuning: its encoder's output, which is what huggingface peft itself saves);
    PROMPT_TUNING and P_TUNING files are read as Prompt Tuning. One task only (num_tasks = 1).
Prefix-Tuning, P-Tuning v2
    huggingface peft saves the computed prefix, (n, n_layer * 2 * C) with row i = [K_0[i], V_0[i], K_1[i], ...],
    and puts the real tokens at positions n..n+T-1: only a prefix trained with ``shift_positions=True`` computes the
    same there, so another one is refused. A file is read as PrefixTuningConfig(prefix_projection=False,
    shift_positions=True). One task only.
BitFit and bottleneck adapters have no huggingface peft format and are refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from minigpt.files import atomic_write, read_text, write_json

from .adapter import AdapterConfig
from .bitfit import BitFitConfig
from .ia3 import IA3Config, IA3Linear, _vector_name
from .lora import LoraConfig, LoraLinear
from .p_tuning import PTuningConfig
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
HF_MODEL = "base_model.model."  # huggingface peft's prefix of the base model's names
QKV = ("attn.query", "attn.key", "attn.value")  # the thirds of GPT-2's attn.c_attn, in order
DIRECT = {"attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
HF_PARTS = ("attn.c_attn", *DIRECT.values())
OURS = re.compile(r"encoder\.blocks\.(\d+)\.(.+)")
THEIRS = re.compile(r"transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)")


def hf_module(i: int, part: str) -> str:
    return f"transformer.h.{i}.{part}"


def pattern_key(patterns, name: str):
    """The key of a rank_pattern / alpha_pattern that applies to module ``name``, or None. huggingface peft reads a
    key as a regular expression that must match the end of the name after a dot (or all of it)."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)


def compact(names_by_part: dict[str, list[int]], n_layer: int, prefix: str) -> list[str]:
    """Module names as target_modules lists them: a part adapted in every block by its name ("attn.c_attn"), one
    adapted in some blocks by the full names of those."""
    out = []
    for part, blocks in names_by_part.items():
        out += [part] if sorted(blocks) == list(range(n_layer)) else [f"{prefix}{i}.{part}" for i in sorted(blocks)]
    return out


def _check_gpt2_shape(model) -> None:
    from minigpt.pretrained import hf_config

    if not hasattr(model, "config") or not hasattr(model, "encoder"):
        raise TypeError(f"expected a minigpt GPT, got a {type(model).__name__}")
    hf_config(model.config)  # raises unless the model has GPT-2's shape (pre-LN, with biases)


def _layers(model, layer_type) -> dict[tuple[int, str], torch.nn.Module]:
    """{(block, part): layer} for every layer_type layer of model, refusing one outside the blocks' Linear layers."""
    found = {}
    for name, m in model.named_modules():
        if not isinstance(m, layer_type):
            continue
        match = OURS.fullmatch(name)
        if match is None or match.group(2) not in (*QKV, *DIRECT):
            raise ValueError(f"{name!r} has no counterpart in huggingface peft's GPT-2 (only the blocks' attention "
                             f"and MLP projections map); leave it out of target_modules to save in that format")
        if m.merged:
            raise ValueError("the adapter is merged into the base weights; call peft.unmerge(model) first")
        found[int(match.group(1)), match.group(2)] = m
    return found


# -- writing ----------------------------------------------------------------------------------------------------


def save_hf_adapter(model, folder, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapter as huggingface peft writes one: folder/adapter_config.json and
    folder/adapter_model.safetensors (each atomically). base_model_name_or_path: recorded in the config (the GPT-2
    folder the adapter belongs to). Methods or targets without an exact counterpart are refused with the reason."""
    from safetensors.torch import save_file

    config = getattr(model, "peft_config", None)
    if config is None:
        raise ValueError("the model carries no PEFT method; nothing to save")
    _check_gpt2_shape(model)
    if isinstance(config, LoraConfig):
        hf, tensors = _lora_to_hf(model, config)
    elif isinstance(config, IA3Config):
        hf, tensors = _ia3_to_hf(model, config)
    elif isinstance(config, (PromptTuningConfig, PTuningConfig)):
        hf, tensors = _prompt_to_hf(model, config)
    elif isinstance(config, PrefixTuningConfig):
        hf, tensors = _prefix_to_hf(model, config)
    else:
        what = {BitFitConfig: "BitFit", AdapterConfig: "bottleneck adapters"}.get(type(config), config.method)
        raise ValueError(f"huggingface peft has no format for {what}; save it with peft.save_adapter instead")
    hf = {"peft_type": hf.pop("peft_type"), "task_type": "CAUSAL_LM", "base_model_name_or_path":
          base_model_name_or_path, "inference_mode": True, **hf}
    folder = Path(folder)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json(folder / CONFIG_FILE, hf, indent=2)
    return folder


def _lora_to_hf(model, config: LoraConfig):
    layers = _layers(model, LoraLinear)
    C, L, r = model.config.n_embd, model.config.n_layer, config.r
    tensors, ranks, blocks = {}, {}, {}
    for i in sorted({i for i, _ in layers}):
        parts = [p for p in QKV if (i, p) in layers]
        if parts:  # one c_attn LoRA of rank k r, block by block
            k = len(parts)
            A = torch.cat([layers[i, p].lora_A.detach() for p in parts])  # (k r, C)
            B = torch.zeros(3 * C, k * r)  # rows q | k | v
            for j, p in enumerate(parts):
                row = QKV.index(p) * C
                B[row : row + C, j * r : (j + 1) * r] = layers[i, p].lora_B.detach()
            entry = {"lora_A.weight": A, "lora_B.weight": B}
            if config.use_dora:  # the other thirds get their base weight's row norms: a factor of exactly 1
                attn = model.encoder.blocks[i].attn
                entry["lora_magnitude_vector"] = torch.cat([
                    layers[i, p].lora_magnitude.detach().float() if (i, p) in layers
                    else torch.linalg.norm(getattr(attn, p.split(".")[1]).weight.detach().float(), dim=1)
                    for p in QKV])
            _add(tensors, ranks, blocks, i, "attn.c_attn", entry, k * r)
        for ours, theirs in DIRECT.items():
            if (i, ours) in layers:
                layer = layers[i, ours]
                entry = {"lora_A.weight": layer.lora_A, "lora_B.weight": layer.lora_B}
                if config.use_dora:
                    entry["lora_magnitude_vector"] = layer.lora_magnitude
                _add(tensors, ranks, blocks, i, theirs, entry, r)
    rank_pattern, alpha_pattern = {}, {}
    for part in blocks:
        for i in blocks[part]:
            rank = ranks[hf_module(i, part)]
            if rank != r:  # same scaling at rank k r: alpha k (rsLoRA: alpha sqrt(k))
                k = rank // r
                key = part if all(ranks[hf_module(j, part)] == rank for j in blocks[part]) \
                    and sorted(blocks[part]) == list(range(L)) else re.escape(hf_module(i, part))
                rank_pattern[key] = rank
                alpha_pattern[key] = config.alpha * (math.sqrt(k) if config.use_rslora else k)
    hf = {"peft_type": "LORA", "r": r, "lora_alpha": config.alpha, "lora_dropout": config.lora_dropout,
          "target_modules": compact(blocks, L, "transformer.h."), "rank_pattern": rank_pattern,
          "alpha_pattern": alpha_pattern, "use_rslora": config.use_rslora, "use_dora": config.use_dora,
          "fan_in_fan_out": True, "bias": "none", "modules_to_save": None, "init_lora_weights": True}
    return hf, tensors


def _add(tensors, ranks, blocks, i, part, entry, rank=None):
    name = hf_module(i, part)
    tensors.update({f"{HF_MODEL}{name}.{k}": v for k, v in entry.items()})
    if rank is not None:
        ranks[name] = rank
    blocks.setdefault(part, []).append(i)


def _ia3_to_hf(model, config: IA3Config):
    layers = _layers(model, IA3Linear)
    C, L = model.config.n_embd, model.config.n_layer
    tensors, blocks, feedforward = {}, {}, {}
    for i in sorted({i for i, _ in layers}):
        parts = [p for p in QKV if (i, p) in layers]
        if parts:
            ff = {layers[i, p].scale_input for p in parts}
            if ff == {False}:  # output scaling: the thirds not adapted here are ones
                vector = torch.cat([layers[i, p].vector.detach().float() if (i, p) in layers else torch.ones(C)
                                    for p in QKV])
                _add(tensors, {}, blocks, i, "attn.c_attn", {"ia3_l": vector[:, None]})  # (3C, 1)
            else:
                vectors = [layers[i, p].vector.detach() for p in parts]
                if len(parts) < 3 or ff != {True} or not all(torch.equal(v, vectors[0]) for v in vectors):
                    raise ValueError(f"block {i}: huggingface peft's c_attn has one input-scaling vector for the "
                                     "query, key and value together; these differ (or are not all feedforward)")
                _add(tensors, {}, blocks, i, "attn.c_attn", {"ia3_l": vectors[0][None, :]})  # (1, C)
                feedforward.setdefault("attn.c_attn", []).append(i)
        for ours, theirs in DIRECT.items():
            if (i, ours) in layers:
                layer = layers[i, ours]
                vector = layer.vector.detach()
                shaped = vector[None, :] if layer.scale_input else vector[:, None]  # (1, in) or (out, 1)
                _add(tensors, {}, blocks, i, theirs, {"ia3_l": shaped})
                if layer.scale_input:
                    feedforward.setdefault(theirs, []).append(i)
    hf = {"peft_type": "IA3", "target_modules": compact(blocks, L, "transformer.h."),
          "feedforward_modules": compact(feedforward, L, "transformer.h."), "fan_in_fan_out": True,
          "modules_to_save": None, "init_ia3_weights": True}
    return hf, tensors


def _prompt_fields(model, n):
    c = model.config
    return {"num_virtual_tokens": n, "token_dim": c.n_embd, "num_transformer_submodules": 1,
            "num_attention_heads": c.n_head, "num_layers": c.n_layer}


def _one_task(config) -> None:
    if config.num_tasks != 1:
        raise ValueError(f"huggingface peft's {type(config).__name__[:-6]} holds one task's prompt; this adapter "
                         f"holds num_tasks={config.num_tasks}")


def _prompt_to_hf(model, config):
    _one_task(config)
    prompt = model.input_layer.prompt
    was_training = prompt.training
    prompt.eval()  # P-Tuning: the encoder's output without dropout, as it is deployed
    with torch.no_grad():
        table = prompt()[0]  # (n, C)
    prompt.train(was_training)
    hf = {"peft_type": "PROMPT_TUNING", **_prompt_fields(model, config.num_virtual_tokens),
          "prompt_tuning_init": "RANDOM"}
    return hf, {"prompt_embeddings": table}


def _prefix_to_hf(model, config: PrefixTuningConfig):
    _one_task(config)
    if not config.shift_positions:
        raise ValueError("huggingface peft puts the real tokens at positions n..n+T-1 behind the prefix; this prefix "
                         "was trained with them at 0..T-1 and would compute something else there. Train it with "
                         f"{type(config).__name__}(shift_positions=True) to save it in huggingface peft's format")
    with torch.no_grad():
        rows = [torch.cat(block.attn.prefix(), dim=-1)[0] for block in model.encoder.blocks]  # (n, 2C) per layer
    hf = {"peft_type": "PREFIX_TUNING", **_prompt_fields(model, config.num_virtual_tokens), "prefix_projection": False,
          "encoder_hidden_size": model.config.n_embd}
    return hf, {"prompt_embeddings": torch.cat(rows, dim=-1)}  # (n, n_layer * 2 * C): K_0 | V_0 | K_1 | V_1 ...


# -- reading ----------------------------------------------------------------------------------------------------


def read_hf_adapter(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, the tensors of adapter_model.safetensors) of a huggingface peft folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a huggingface peft adapter folder: expected {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE} in it")
    return json.loads(read_text(folder / CONFIG_FILE)), load_file(str(folder / WEIGHTS_FILE))


def load_hf_adapter(model, folder, fp32_adapter: bool = False):
    """Apply the adapter huggingface peft saved in folder to model (a plain GPT-2-shaped GPT, e.g.
    GPT.from_pretrained of the adapter's base folder) and return it: LoRA (and DoRA), IA3, Prompt Tuning,
    P-Tuning (as Prompt Tuning) and Prefix-Tuning. fp32_adapter: as in peft.get_peft_model."""
    from . import apply_with_tensors

    hf, tensors = read_hf_adapter(folder)
    _check_gpt2_shape(model)
    if getattr(model, "peft_config", None) is not None:
        raise ValueError(f"the model already carries a {model.peft_config.method!r} adapter; load into a plain GPT")
    if hf.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{folder}: task_type {hf['task_type']!r}; only CAUSAL_LM adapters fit a GPT")
    if hf.get("modules_to_save"):
        raise ValueError(f"{folder}: modules_to_save {hf['modules_to_save']} trains whole modules besides the "
                         "adapter; this library has no such method")
    kind = hf.get("peft_type")
    readers = {"LORA": _lora_from_hf, "IA3": _ia3_from_hf, "PROMPT_TUNING": _prompt_from_hf,
               "P_TUNING": _prompt_from_hf, "PREFIX_TUNING": _prefix_from_hf}
    if kind not in readers:
        raise ValueError(f"{folder}: peft_type {kind!r} is not read here; expected one of {sorted(readers)}")
    config, ours = readers[kind](model, hf, tensors, folder)
    return apply_with_tensors(model, config, ours, folder, fp32_adapter)


def _by_module(tensors, folder, suffixes) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """{(block, HF part): {suffix: tensor}}; a tensor outside the blocks' four projections is refused by name."""
    out = {}
    for key, t in tensors.items():
        rest = key.removeprefix(HF_MODEL)
        suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
        match = None if suffix is None else THEIRS.fullmatch(rest[: -len(suffix) - 1])
        if not key.startswith(HF_MODEL) or match is None:
            raise ValueError(f"{folder}: tensor {key!r} has no counterpart in this GPT (read here: {list(suffixes)} "
                             "of the blocks' attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj)")
        out.setdefault((int(match.group(1)), match.group(2)), {})[suffix] = t
    return out


def _in_out(model, part: str) -> tuple[int, int]:
    C = model.config.n_embd
    return {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}[part]


def _targets(names: list[tuple[int, str]], n_layer: int) -> list[str]:
    by_part = {}
    for i, part in names:
        by_part.setdefault(part, []).append(i)
    return compact(by_part, n_layer, "encoder.blocks.")


def _lora_from_hf(model, hf, tensors, folder):
    for field, fine in (("bias", "none"), ("lora_bias", False), ("target_parameters", None),
                        ("layer_replication", None), ("trainable_token_indices", None)):
        if hf.get(field, fine) not in (fine, [], {}):
            raise ValueError(f"{folder}: {field}={hf[field]!r} is not supported here (expected {fine!r})")
    dora, rslora = bool(hf.get("use_dora", False)), bool(hf.get("use_rslora", False))
    suffixes = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if dora else ())
    modules = _by_module(tensors, folder, suffixes)
    C = model.config.n_embd
    entries = {}  # (block, our part) -> (A, B, magnitude or None, rank, scaling)
    for (i, part), t in sorted(modules.items()):
        if set(t) != set(suffixes):
            raise ValueError(f"{folder}: {hf_module(i, part)} has {sorted(t)}, expected {list(suffixes)}")
        A, B, m = t["lora_A.weight"], t["lora_B.weight"], t.get("lora_magnitude_vector")
        R, (n_in, n_out) = A.size(0), _in_out(model, part)
        rkey = pattern_key(hf.get("rank_pattern") or {}, hf_module(i, part))
        expected_r = hf["rank_pattern"][rkey] if rkey is not None else hf["r"]
        shapes = [tuple(A.shape), tuple(B.shape)] + ([] if m is None else [tuple(m.shape)])
        if shapes != [(expected_r, n_in), (n_out, expected_r)] + ([] if m is None else [(n_out,)]):
            raise ValueError(f"{folder}: {hf_module(i, part)} has tensors of shapes {shapes}; this GPT with rank "
                             f"{expected_r} expects {[(expected_r, n_in), (n_out, expected_r)]} (and ({n_out},))")
        key = pattern_key(hf.get("alpha_pattern") or {}, hf_module(i, part))
        alpha = hf["alpha_pattern"][key] if key is not None else hf["lora_alpha"]
        scaling = alpha / math.sqrt(R) if rslora else alpha / R
        if part != "attn.c_attn":
            ours = next(o for o, theirs in DIRECT.items() if theirs == part)
            entries[i, ours] = (A, B, m, R, scaling)
            continue
        attn = model.encoder.blocks[i].attn
        thirds = {p: B[j * C : (j + 1) * C] for j, p in enumerate(QKV)}
        norms = {p: torch.linalg.norm(getattr(attn, p.split(".")[1]).weight.detach().float(), dim=1) for p in QKV}
        mags = {p: None if m is None else m[j * C : (j + 1) * C] for j, p in enumerate(QKV)}
        columns = {p: set(torch.nonzero(thirds[p].abs().sum(0)).flatten().tolist()) for p in QKV}
        adapted = [p for p in QKV if columns[p] or (dora and not torch.allclose(mags[p].float(), norms[p], rtol=1e-6,
                                                                                   atol=0))]
        sizes = {len(columns[p]) for p in adapted}
        disjoint = sum(len(columns[p]) for p in adapted) == len(set().union(*(columns[p] for p in adapted)))
        if adapted and disjoint and len(sizes) == 1 and 0 not in sizes:  # the block form written by save_hf_adapter
            for p in adapted:
                cols = sorted(columns[p])
                entries[i, p] = (A[cols], thirds[p][:, cols], mags[p], len(cols), scaling)
        else:  # a shared A: every third with it, rank R
            for p in QKV:
                entries[i, p] = (A, thirds[p], mags[p], R, scaling)
    ranks = {e[3] for e in entries.values()}
    scalings = sorted({e[4] for e in entries.values()})
    if len(ranks) != 1 or not math.isclose(scalings[0], scalings[-1], rel_tol=1e-9):
        raise ValueError(f"{folder}: this library's LoRA has one rank and one scaling for all its targets; the "
                         f"adapter maps to ranks {sorted(ranks)} and scalings {scalings}")
    r, scaling = ranks.pop(), scalings[0]
    config = LoraConfig(r=r, alpha=scaling * (math.sqrt(r) if rslora else r), lora_dropout=hf.get("lora_dropout", 0.0),
                        target_modules=_targets(list(entries), model.config.n_layer), use_rslora=rslora,
                        use_dora=dora)
    ours = {}
    for (i, part), (A, B, m, _, _) in entries.items():
        name = f"encoder.blocks.{i}.{part}."
        ours[name + "lora_A"], ours[name + "lora_B"] = A, B
        if dora:
            ours[name + "lora_magnitude"] = m
    return config, ours


def _ia3_from_hf(model, hf, tensors, folder):
    modules = _by_module(tensors, folder, ("ia3_l",))
    C = model.config.n_embd
    targets, feedforward, ours = [], [], {}

    def add(i, part, vector, ff):
        name = f"encoder.blocks.{i}.{part}"
        targets.append((i, part))
        if ff:
            feedforward.append((i, part))
        ours[f"{name}.{_vector_name(name, ff)}"] = vector

    skipped = []

    def identity(i, part, vector, ff):
        skipped.append((i, part, vector))

    for (i, part), t in sorted(modules.items()):
        vector = t["ia3_l"]
        n_in, n_out = _in_out(model, part)
        ff = tuple(vector.shape) == (1, n_in)  # (1, in): the input is scaled; (out, 1): the output
        if not ff and tuple(vector.shape) != (n_out, 1):
            raise ValueError(f"{folder}: {hf_module(i, part)}.ia3_l has shape {tuple(vector.shape)}, expected "
                             f"(1, {n_in}) or ({n_out}, 1)")
        vector = vector.flatten()
        if part == "attn.c_attn" and ff:
            for p in QKV:
                add(i, p, vector, True)
        elif part == "attn.c_attn":  # a third of exact ones is the identity: that projection is left out
            for j, p in enumerate(QKV):
                third = vector[j * C : (j + 1) * C]
                (identity if torch.equal(third, torch.ones_like(third)) else add)(i, p, third, False)
        else:
            add(i, next(o for o, theirs in DIRECT.items() if theirs == part), vector, ff)
    if not targets:  # an untrained adapter, all ones: keep the keys and values (IA3's l_k, l_v) all the same
        for i, p, third in skipped:
            if p != "attn.query":
                add(i, p, third, False)
    L = model.config.n_layer
    config = IA3Config(target_modules=_targets(targets, L), feedforward_modules=_targets(feedforward, L))
    return config, ours


def _prompt_table(model, hf, tensors, folder, width):
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"{folder}: expected the one tensor 'prompt_embeddings', found {sorted(tensors)}")
    c = model.config
    expected = {"num_transformer_submodules": 1, "token_dim": c.n_embd, "num_layers": c.n_layer,
                "num_attention_heads": c.n_head}
    wrong = {k: hf[k] for k, v in expected.items() if hf.get(k, v) != v}
    if wrong:
        raise ValueError(f"{folder} was made for another model: {wrong}, this GPT has {expected}")
    table = tensors["prompt_embeddings"]
    n = hf.get("num_virtual_tokens", table.size(0))
    if tuple(table.shape) != (n, width):
        raise ValueError(f"{folder}: prompt_embeddings has shape {tuple(table.shape)}, expected {(n, width)}")
    return table, n


def _prompt_from_hf(model, hf, tensors, folder):
    table, n = _prompt_table(model, hf, tensors, folder, model.config.n_embd)
    return PromptTuningConfig(num_virtual_tokens=n), {"input_layer.prompt.weight": table[None]}


def _prefix_from_hf(model, hf, tensors, folder):
    L, C = model.config.n_layer, model.config.n_embd
    table, n = _prompt_table(model, hf, tensors, folder, L * 2 * C)
    kv = table.view(n, L, 2, C)
    ours = {f"encoder.blocks.{i}.attn.prefix_{w}": kv[:, i, j][None] for i in range(L) for j, w in
            enumerate(("key", "value"))}
    return PrefixTuningConfig(num_virtual_tokens=n, prefix_projection=False, shift_positions=True), ours
