"""Every stage's output, saved one way and opened by one function; a Hugging Face GPT-2 folder opens the same way.

    loaded = checkpoint.load("out/sft/lora")       # or out/pretrain, out/pretrain/best.pt, out/ppo, a GPT-2 folder
    loaded.model, loaded.tokenizer, loaded.info    # a GPT (its PEFT method applied, if any), its tokenizer, what it is

What each stage leaves behind (``save_model``), a folder of plain files:

    model.json          what the model is and where it came from (below)
    tokenizer.json      the tokenizer, as tokenizer.to_dict() (plain lists and strings)
    model.safetensors   every weight, or
    adapter.safetensors the tensors of a PEFT method only (peft.save_adapter); the rest is the model named in "base"

    model.json: {"format": 1, "kind": "gpt" | "reward", "stage": "pretrain" | "sft" | "reward" | "ppo" | ...,
                 "model_config": GPTConfig fields, "peft": null | {"method", "config"},
                 "base": null | {"path", "relative"}   the model an adapter goes on (absolute, and relative to here),
                 "template": null | the prompt template the model was fine-tuned with (minigpt.tasks.TEMPLATE),
                 "made_from": {...} its inputs, "settings": {...} the stage's configs}

``load`` also opens the training loop's checkpoints (ckpt.pt, best.pt: the same description, the weights and the
optimizer state, read with torch.load(weights_only=True), so no pickled code can run), a run folder holding one (a
pretraining run's out/pretrain opens its best.pt), and a Hugging Face GPT-2 folder (config.json + model.safetensors,
with vocab.json or tokenizer.json for the tokenizer). A reward model ("kind": "reward") is a GPT backbone and a scalar
head: ``load`` returns the backbone as the model and the head's tensors as ``head``
(rlhf.reward_model.load_reward_model puts them together).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import GPTConfig
from .files import atomic_write, read_text, write_json
from .model import GPT
from .tokenizer import BPETokenizer, TiktokenTokenizer, tokenizer_from_dict

FORMAT = 1
LANGUAGE_MODEL = "a language model (a pretrained, SFT, PPO, GRPO or DPO output, or a Hugging Face GPT-2 folder)"
REWARD_MODEL = "a reward model (written by python -m rlhf.reward_model)"


@dataclass
class Loaded:
    model: GPT  # the GPT, with its PEFT method applied when it was trained through one (a reward model's backbone)
    tokenizer: object
    info: dict  # the model.json description; info["path"] is where it was opened from
    head: dict = field(default_factory=dict)  # a reward model's head tensors: head.weight, head.bias, gain, bias


# -- training checkpoints: a dict of tensors and plain data in one torch.save file ----------------------------------


def save_checkpoint(path, state: dict) -> None:
    """torch.save to a temporary file, then rename: a crash mid-write leaves the previous checkpoint intact."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, map_location="cpu") -> dict:
    """A torch.save file read with weights_only=True: tensors and plain containers only, never pickled code.
    An empty, truncated or foreign file is refused with a message naming it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {str(path)!r} is a folder; expected a .pt file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise ValueError(f"checkpoint {str(path)!r} is empty (0 bytes): its write was cut off")
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise ValueError(f"{str(path)!r} is not a PyTorch checkpoint (torch.save writes a zip file; this one starts "
                         f"with {magic!r})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors and plain containers "
            f"(possibly code); only checkpoints of plain data are loaded ({str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:  # torch's zip reader fails in one of these ways on a cut file
        raise ValueError(f"checkpoint {str(path)!r} is truncated or corrupted ({str(e).splitlines()[0]})") from None


def load_resume_checkpoint(out_dir) -> dict:
    """The checkpoint a run continues from: out_dir/ckpt.pt, or, when that file is damaged, out_dir/best.pt (an
    earlier iteration), with a message saying so."""
    out_dir = Path(out_dir)
    try:
        return load_checkpoint(out_dir / "ckpt.pt")
    except (ValueError, FileNotFoundError) as e:
        if not (out_dir / "best.pt").is_file():
            raise
        state = load_checkpoint(out_dir / "best.pt")
        print(f"warning: {e}; continuing from best.pt instead (iteration {state['iter']})", flush=True)
        return state


# -- the description -------------------------------------------------------------------------------------------------


def peft_description(gpt) -> dict | None:
    config = getattr(gpt, "peft_config", None)
    return None if config is None else {"method": config.method, "config": dataclasses.asdict(config)}


def describe(model, stage: str, template=None, made_from=None, settings=None, base=None, where=None) -> dict:
    """The model.json description of model (a GPT, or a reward model: a module with a GPT ``backbone``). base: the
    path of the model an adapter goes on, stored absolute and relative to the folder ``where``."""
    gpt = getattr(model, "backbone", model)
    info = {"format": FORMAT, "kind": "reward" if gpt is not model else "gpt", "stage": stage,
            "model_config": gpt.config.to_dict(), "peft": peft_description(gpt), "base": None, "template": template,
            "made_from": made_from or {}, "settings": settings or {}}
    if base is not None:
        base = Path(base).resolve()
        info["base"] = {"path": str(base), "relative": os.path.relpath(base, Path(where or ".").resolve())}
    return info


def tensors_to_save(module) -> dict[str, torch.Tensor]:
    """module's state dict with each tied tensor once (under its first name), contiguous, on the CPU."""
    seen, out = set(), {}
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


def save_model(folder, model, tokenizer, stage: str, template=None, made_from=None, settings=None, base=None) -> Path:
    """Write model (a GPT, or a reward model with a GPT ``backbone``) as a model folder that ``load`` opens.

    A GPT carrying a PEFT method is written as its adapter alone when ``base`` names the model it goes on;
    otherwise every weight is written, with the method's config, and ``load`` applies the method again."""
    from safetensors.torch import save_file

    import peft

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").unlink(missing_ok=True)  # written last: a folder with a model.json is complete
    info = describe(model, stage, template, made_from, settings, base if peft_description(model) else None, folder)
    if info["base"] is not None:
        if info["kind"] != "gpt":
            raise ValueError("a reward model is saved with all its weights; pass base=None")
        peft.save_adapter(model, folder / "adapter.safetensors")
        (folder / "model.safetensors").unlink(missing_ok=True)
    else:
        tensors = tensors_to_save(model)
        atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        (folder / "adapter.safetensors").unlink(missing_ok=True)
    write_json(folder / "tokenizer.json", tokenizer.to_dict(), indent=None)
    write_json(folder / "model.json", info)
    return folder


# -- opening ---------------------------------------------------------------------------------------------------------


def locate(path) -> tuple[str, Path]:
    """What is at path: ("folder", dir with model.json), ("checkpoint", a .pt file) or ("gpt2", a GPT-2 folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {str(path)!r} does not exist")
    if path.is_file():
        if path.name == "model.json" or path.suffix == ".safetensors":
            return locate(path.parent)
        return "checkpoint", path
    if (path / "model.json").is_file():
        return "folder", path
    if (path / "config.json").is_file():
        return "gpt2", path
    for name in ("best.pt", "ckpt.pt"):
        if (path / name).is_file():
            return "checkpoint", path / name
    raise FileNotFoundError(f"{str(path)!r} holds no model: expected model.json (a stage's output), config.json (a "
                            f"Hugging Face GPT-2 folder) or best.pt / ckpt.pt (a training run)")


def _what(info: dict) -> str:
    return f"a {'reward model' if info['kind'] == 'reward' else 'language model'} (stage {info.get('stage')!r})"


def _info_of_checkpoint(ckpt: dict) -> dict:
    """The description inside a training checkpoint; older checkpoints carry only some of its fields."""
    info = {k: ckpt[k] for k in ("format", "kind", "stage", "model_config", "peft", "base", "template", "made_from",
                                 "settings") if k in ckpt}
    info.setdefault("kind", "reward" if ckpt.get("reward_model") else "gpt")
    info.setdefault("peft", None)
    info.setdefault("base", None)
    info.setdefault("template", None)
    return info


def load(path, expect: str | None = None) -> Loaded:
    """Open any model this project writes, or a Hugging Face GPT-2 folder: see the module docstring. expect "gpt"
    or "reward" refuses the other kind, saying what was found, before any weights are read."""
    where, path = locate(path)
    if where == "gpt2":
        _check_kind({"kind": "gpt", "stage": "gpt2 folder"}, expect, path)  # a GPT-2 folder is a language model
        return _load_gpt2(path)
    if where == "folder":
        info = _read_json(path / "model.json")
        _check_kind(info, expect, path)
        state = None
        if info.get("base") is None:
            from safetensors.torch import load_file

            if not (path / "model.safetensors").is_file():
                raise FileNotFoundError(f"{path} has a model.json but no model.safetensors")
            state = load_file(str(path / "model.safetensors"))
        tokenizer = tokenizer_from_dict(_read_json(path / "tokenizer.json"))
        return _build(info, state, tokenizer, path, path, adapter=path / "adapter.safetensors")
    ckpt = load_checkpoint(path)
    info = _info_of_checkpoint(ckpt)
    _check_kind(info, expect, path)
    if "model" not in ckpt or "model_config" not in ckpt or "tokenizer" not in ckpt:
        raise ValueError(f"{path} is a PyTorch file but not a checkpoint of this project (it lacks "
                         f"{[k for k in ('model', 'model_config', 'tokenizer') if k not in ckpt]})")
    if info["peft"] and info["base"] is None and ckpt.get("train_config", {}).get("save_trainable_only"):
        raise ValueError(f"{path} is a training checkpoint holding only the {info['peft']['method']} tensors of "
                         f"{_what(info)}, with no base model recorded; open the finished run's folder (its "
                         f"model.json), or continue the run with --resume")
    return _build(info, ckpt["model"], tokenizer_from_dict(ckpt["tokenizer"]), path.parent, path, trainable_only=True)


def load_model(path, expect: str = "gpt"):
    """(model, tokenizer) of what load(path) opens: the short form, for when the description is not needed."""
    loaded = load(path, expect)
    return loaded.model, loaded.tokenizer


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None


def _check_kind(info: dict, expect, path) -> None:
    if expect is not None and info["kind"] != expect:
        wanted = REWARD_MODEL if expect == "reward" else LANGUAGE_MODEL
        raise ValueError(f"{path} is {_what(info)}; expected {wanted}")


def _base_path(info: dict, folder: Path) -> Path:
    base = info["base"]
    for candidate in (folder / base["relative"], Path(base["path"])):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{folder} holds an adapter for the base model {base['path']!r}, which is gone (looked "
                            f"for it there and at {str(folder / base['relative'])!r})")


def _build(info: dict, state, tokenizer, folder: Path, path: Path, adapter=None, trainable_only=False) -> Loaded:
    """The model info describes, with state (a state dict; None when an adapter file goes on a base). folder: where
    the description is (a relative base path starts there); path: what was opened."""
    import peft

    config = GPTConfig.from_dict(info["model_config"])
    if info.get("base") is not None:  # an adapter on a base model
        base = load(_base_path(info, folder), expect="gpt")
        model = base.model
        if base.model.config != config:
            raise ValueError(f"{folder}: the base model {base.info['path']} has config {base.model.config}, but the "
                             f"adapter was trained on {config}")
        if state is None:
            peft.load_adapter(model, adapter)
        else:  # a training checkpoint holding the method's tensors only
            peft.get_peft_model(model, _peft_config(info))
            _load_state(model, state, path, partial=trainable_only)
    else:
        model = GPT(config)
        if info.get("peft"):
            peft.get_peft_model(model, _peft_config(info))
        head = {}
        if info["kind"] == "reward":
            head = {k: v for k, v in state.items() if not k.startswith("backbone.")}
            state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        _load_state(model, state, path)
        return Loaded(model, tokenizer, dict(info, path=str(path)), head)
    return Loaded(model, tokenizer, dict(info, path=str(path)))


def _peft_config(info):
    import peft

    method = info["peft"]["method"]
    if method not in peft.CONFIGS:
        raise ValueError(f"unknown PEFT method {method!r}; expected one of {sorted(peft.CONFIGS)}")
    return peft.CONFIGS[method](**info["peft"]["config"])


def _load_state(model, state: dict, where, partial: bool = False) -> None:
    """Load state into model; only tied aliases of saved tensors may be missing (partial: any frozen tensor may)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad} if partial else set()
    missing = [k for k in missing if k not in aliases and k not in frozen]
    if missing or unexpected:
        raise ValueError(f"{where}: the saved weights do not fit the model it describes (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    if not state:
        raise ValueError(f"{where}: the saved weights are empty")


def _load_gpt2(folder: Path) -> Loaded:
    model = GPT.from_pretrained(folder)
    try:
        tokenizer = BPETokenizer.from_gpt2_files(folder)
    except FileNotFoundError:
        tokenizer = TiktokenTokenizer("gpt2")  # when tiktoken can load it; otherwise its error says how to fix that
    model.check_tokenizer(tokenizer)
    info = {"format": FORMAT, "kind": "gpt", "stage": "gpt2 folder", "model_config": model.config.to_dict(),
            "peft": None, "base": None, "template": None, "made_from": {"gpt2_folder": str(folder.resolve())},
            "settings": {}, "path": str(folder)}
    return Loaded(model, tokenizer, info)
