"""prompt_tuning (stub, to be written)."""
from dataclasses import dataclass
@dataclass
class PromptTuningConfig:
    method = "prompt_tuning"
def apply(model, config): raise NotImplementedError
