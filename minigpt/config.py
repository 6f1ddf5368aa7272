"""GPTConfig: the numbers that fix the shape of a GPT, and named presets.

The presets follow the sizes people know:
- ``tiny``: a few thousand parameters, for tests;
- ``baby``: nanoGPT's documented CPU run (4 layers, 4 heads, 128 dims, block 64);
- ``small``: nanoGPT's shakespeare-char GPU run (6 layers, 6 heads, 384 dims, block 256);
- ``gpt2``: GPT-2 small (Radford et al. 2019), 124,439,808 parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

LAYOUTS = ("pre_ln", "post_ln")
ACTIVATIONS = ("gelu_tanh", "gelu")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # the longest sequence the model reads (number of learned positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in the Linear layers and LayerNorms, as GPT-2
    layout: str = "pre_ln"  # "pre_ln": GPT-2, LN before each sub-layer; "post_ln": LN after each residual sum (BERT)
    layer_norm_eps: float = 1e-5
    # the MLP's GELU (Hendrycks and Gimpel 2016): "gelu_tanh" is GPT-2's tanh approximation (Hugging Face's "gelu_new"),
    # "gelu" the exact x Phi(x) with the error function, as nanoGPT uses; the two differ by less than 1e-3
    activation: str = "gelu_tanh"

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by GPTConfig.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"GPTConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "GPTConfig":
        return replace(self, **changes)


PRESETS = {
    "tiny": dict(block_size=32, n_layer=2, n_head=2, n_embd=32),
    "baby": dict(block_size=64, n_layer=4, n_head=4, n_embd=128),
    "small": dict(block_size=256, n_layer=6, n_head=6, n_embd=384),
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}


def preset(name: str, **overrides) -> GPTConfig:
    """A named preset with optional overrides, e.g. ``preset("baby", vocab_size=67)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})
