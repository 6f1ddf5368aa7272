"""adapter (stub, to be written)."""
from dataclasses import dataclass
@dataclass
class AdapterConfig:
    method = "adapter"
def apply(model, config): raise NotImplementedError
