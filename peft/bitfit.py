"""BitFit (stub, to be written)."""
from dataclasses import dataclass
@dataclass
class BitFitConfig:
    method = "bitfit"
def apply(model, config): raise NotImplementedError
