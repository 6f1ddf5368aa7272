"""P-Tuning (Liu et al. 2021, "GPT Understands, Too"): continuous prompts produced by a prompt encoder.

Prompt Tuning learns the virtual-token embeddings directly; P-Tuning learns inputs h_0..h_{n-1} (the embeddings of
the pseudo tokens [P_0]..[P_{n-1}]) and feeds them through a prompt encoder, because free embeddings optimise
poorly: the word-embedding space is discrete, and the prompt tokens should depend on each other (the paper's
"discreteness" and "association" arguments). Its encoder is a bidirectional LSTM then a two-layer ReLU MLP:

    h'_i = MLP([ LSTM_forward(h_{0:i}) ; LSTM_backward(h_{i:n}) ])          (encoder_reparameterization_type="lstm")

or, as Hugging Face peft offers, an MLP alone: h'_i = MLP(h_i) with three Linear layers ("mlp").

The encoded prompt h' (n, C) is then used exactly like a Prompt Tuning prompt (``prompt_tuning.PromptInput``):
prepended at the input layer, positions 0..n-1, real tokens shifted by n. Here the pseudo tokens all come before
the input (the paper also places some between input words with anchor tokens; a prefix is what decoding needs).

After training the encoder is no longer needed: ``export(model)`` computes h' once, keeps it as a plain Prompt
Tuning prompt (n * C numbers per task) and drops the LSTM and MLP; the outputs do not change.
With num_tasks = K the inputs are (K, n, C), the encoder is shared by the tasks, and each row chooses its task with
``peft.task_ids`` (see prompt_tuning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from minigpt.options import option

from .prompt_tuning import PromptEmbedding, PromptInput, PromptTuningConfig, check_int, check_prompt_fits

ENCODERS = ("lstm", "mlp")


@dataclass
class PTuningConfig:
    """num_virtual_tokens: n pseudo tokens. encoder_reparameterization_type: "lstm" (the paper) or "mlp".
    encoder_hidden_size: the LSTM's hidden size per direction, or the MLP's width (None: the model's n_embd).
    encoder_num_layers, encoder_dropout: of the LSTM. num_tasks: prompts held for mixed-task batches."""

    method = "p_tuning"
    num_virtual_tokens: int = option(20, "prompt methods: the number n of virtual tokens")
    encoder_reparameterization_type: str = option("lstm", "p-tuning: the prompt encoder, lstm or mlp")
    encoder_hidden_size: int | None = option(None, "p-tuning, prefix-tuning: the encoder's hidden width "
                                             "(none: n_embd)")
    encoder_num_layers: int = option(2, "p-tuning: LSTM layers")
    encoder_dropout: float = option(0.0, "p-tuning: dropout between the LSTM layers")
    num_tasks: int = option(1, "prompt methods: prompts held for mixed-task batches")

    def __post_init__(self):
        check_int("PTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        check_int("PTuningConfig", "num_tasks", self.num_tasks)
        check_int("PTuningConfig", "encoder_num_layers", self.encoder_num_layers)
        if self.encoder_hidden_size is not None:
            check_int("PTuningConfig", "encoder_hidden_size", self.encoder_hidden_size)
        if self.encoder_reparameterization_type not in ENCODERS:
            raise ValueError(
                f"PTuningConfig.encoder_reparameterization_type must be one of {ENCODERS}, "
                f"got {self.encoder_reparameterization_type!r}"
            )
        if not isinstance(self.encoder_dropout, (int, float)) or not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"PTuningConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")


class PromptEncoder(nn.Module):
    """h' = encoder(h): the learned inputs h (K, n, C) through a bi-LSTM + MLP, or an MLP, to the prompt (K, n, C)."""

    def __init__(self, config: PTuningConfig, n_embd: int, device=None):
        super().__init__()
        K, n, C = config.num_tasks, config.num_virtual_tokens, n_embd
        H = config.encoder_hidden_size or n_embd
        self.encoder_type = config.encoder_reparameterization_type
        # h: the pseudo tokens' input embeddings, N(0, 1) as an nn.Embedding starts
        self.embedding = nn.Parameter(torch.randn(K, n, C, device=device))
        if self.encoder_type == "lstm":
            self.lstm_head = nn.LSTM(
                C,
                H,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout if config.encoder_num_layers > 1 else 0.0,
                bidirectional=True,
                batch_first=True,
                device=device,
            )
            # a two-layer ReLU MLP on [forward state; backward state]
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * H, 2 * H, device=device), nn.ReLU(), nn.Linear(2 * H, C, device=device)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(C, H, device=device),
                nn.ReLU(),
                nn.Linear(H, H, device=device),
                nn.ReLU(),
                nn.Linear(H, C, device=device),
            )

    def forward(self):
        h = self.embedding  # (K, n, C): each task's pseudo tokens form one sequence for the LSTM
        if self.encoder_type == "lstm":
            h, _ = self.lstm_head(h)  # (K, n, 2H): forward and backward states side by side
        return self.mlp_head(h)  # (K, n, C)


def apply(model: nn.Module, config: PTuningConfig) -> None:
    """Wrap model.input_layer so that it prepends the encoded prompt; h and the encoder are trainable."""
    check_prompt_fits(model, config.num_virtual_tokens, "PTuningConfig")
    encoder = PromptEncoder(config, model.config.n_embd, device=model.input_layer.wte.weight.device)
    model.input_layer = PromptInput(
        model.input_layer, encoder, config.num_virtual_tokens, config.num_tasks, model.config.block_size
    )


def export(model: nn.Module) -> nn.Module:
    """Replace the prompt encoder by its output: the model becomes a Prompt Tuning model with identical outputs,
    storing n * C numbers per task, and ``model.peft_config`` becomes the matching PromptTuningConfig (so
    save_adapter / load_adapter treat it as one)."""
    config = getattr(model, "peft_config", None)
    if not isinstance(config, PTuningConfig):
        raise TypeError(f"export needs a model patched with PTuningConfig, got {type(config).__name__}")
    layer = model.input_layer
    encoder = layer.prompt
    was_training = encoder.training
    encoder.eval()  # no LSTM dropout in the exported prompt
    with torch.no_grad():
        prompt = encoder().detach().clone()  # (K, n, C)
    encoder.train(was_training)
    layer.prompt = PromptEmbedding(prompt)
    model.peft_config = PromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens, num_tasks=config.num_tasks)
    return model
