"""prefix tuning (stub, to be written)."""
from dataclasses import dataclass
@dataclass
class PrefixTuningConfig:
    method = "prefix_tuning"
@dataclass
class PTuningV2Config:
    method = "p_tuning_v2"
def apply(model, config): raise NotImplementedError
