"""p_tuning (stub, to be written)."""
from dataclasses import dataclass
@dataclass
class PTuningConfig:
    method = "p_tuning"
def apply(model, config): raise NotImplementedError
