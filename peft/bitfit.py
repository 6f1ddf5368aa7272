"""BitFit: bias-terms fine-tuning (Ben Zaken, Ravfogel and Goldberg 2021, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models", Section 3).

Every weight matrix stays frozen; only the bias vectors b train. The paper writes out the BERT encoder with its
biases (its equations for one layer l, heads m):

    Q^{m,l}(x) = W_q^{m,l} x + b_q^{m,l}    K^{m,l}(x) = W_k^{m,l} x + b_k^{m,l}    V^{m,l}(x) = W_v^{m,l} x + b_v^{m,l}
    h_2 = Dropout(W_m1 h_1 + b_m1)                  attention output projection      -> attn.proj here
    h_3 = g_LN1 ⊙ (h_2 + x - mu) / sigma + b_LN1    LayerNorm                         -> ln_1
    h_4 = GELU(W_m2 h_3 + b_m2)                     the MLP's intermediate layer      -> mlp.fc
    h_5 = Dropout(W_m3 h_4 + b_m3)                  the MLP's output layer            -> mlp.proj
    out = g_LN2 ⊙ (h_5 + h_3 - mu) / sigma + b_LN2  LayerNorm                         -> ln_2

and trains exactly the b's. Its reduced variant trains only b_q and b_m2, the biases that move most during
fine-tuning: ``BitFitConfig(target_modules=REDUCED_TARGETS)``.

Config choice: the paper's b_LN are LayerNorm biases, so by default every bias is trained, LayerNorm biases included
(the final ln_f too); ``include_layernorm=False`` trains the Linear biases only. The LayerNorm gains g stay frozen.

BitFit trains the base model's own tensors, so there are no wrapper layers. ``apply`` keeps a frozen copy of each
selected original bias (``base.train_in_place``: a non-persistent buffer on its module; biases are tiny, and the
copy follows the module across devices and dtypes); ``peft.disable_adapters`` swaps the originals in for the
duration of a ``with`` block and ``peft.unload`` copies them back for good. The trained biases simply are weights of
the base model, so ``peft.merge_and_unload`` only drops the saved originals: a plain GPT with the trained biases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from minigpt.options import option

from .base import find_modules, name_list, train_in_place, trained_in_place

REDUCED_TARGETS = ["attn.query", "mlp.fc"]  # the paper's b_q and b_m2
ORIGINAL = "bitfit_original_bias"  # name of the buffer holding the frozen copy of a module's original bias
TRAINS_BASE_TENSORS_ONLY = True  # peft.merge_and_unload keeps the trained biases and drops the originals


@dataclass
class BitFitConfig:
    """target_modules: None trains every bias of the model; a list of module names (or name endings) trains those
    modules' biases only, e.g. REDUCED_TARGETS. include_layernorm: whether LayerNorm biases may be trained."""

    method = "bitfit"

    target_modules: list[str] | None = option(None, "the modules the method adapts, by name or name ending "
                                              "(BitFit: none trains every bias)")
    include_layernorm: bool = option(True, "BitFit: train the LayerNorm biases too")

    def __post_init__(self):
        if self.target_modules is not None:
            self.target_modules = name_list("BitFitConfig.target_modules", self.target_modules)
        if not isinstance(self.include_layernorm, bool):
            raise ValueError(f"BitFitConfig.include_layernorm must be True or False, got {self.include_layernorm!r}")


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


def selected_modules(model: nn.Module, config: BitFitConfig) -> list[str]:
    """Names of the modules whose bias BitFit trains under config."""
    if config.target_modules is None:
        names = [n for n, m in model.named_modules() if n and _has_bias(m)]
        if not names:
            raise ValueError("the model has no bias terms (built with bias=False?); BitFit trains only biases")
    else:
        names = find_modules(model, config.target_modules)
        lacking = [n for n in names if not _has_bias(model.get_submodule(n))]
        if lacking:
            raise ValueError(f"BitFit target modules {lacking} have no bias to train; expected modules with a bias")
    layernorms = [n for n in names if isinstance(model.get_submodule(n), nn.LayerNorm)]
    if not config.include_layernorm:
        if config.target_modules is not None and layernorms:
            raise ValueError(f"targets {layernorms} are LayerNorms, but BitFitConfig.include_layernorm is False")
        names = [n for n in names if n not in layernorms]
    return names


def apply(model: nn.Module, config: BitFitConfig) -> None:
    """Make the selected biases trainable (everything else was frozen by get_peft_model), keeping their originals."""
    if trained_in_place(model):
        raise ValueError("the model already carries BitFit; call peft.unload(model) first")
    for name in selected_modules(model, config):
        train_in_place(model.get_submodule(name), ["bias"], "bitfit")  # the copy: module.bitfit_original_bias
