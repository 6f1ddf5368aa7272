"""lora (stub, to be written)."""
from dataclasses import dataclass
@dataclass
class LoraConfig:
    method = "lora"
def apply(model, config): raise NotImplementedError
