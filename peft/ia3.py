"""ia3 (stub, to be written)."""
from dataclasses import dataclass
@dataclass
class IA3Config:
    method = "ia3"
def apply(model, config): raise NotImplementedError
