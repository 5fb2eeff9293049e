"""minilora: LoRA fine-tuning written from scratch in plain PyTorch."""

from .errors import CheckpointError, ConfigError, DataError, MiniLoraError, TrainingError
from .generate import generate
from .lora import LoRALinear, apply_lora, merge_lora, param_report, remove_lora, unmerge_lora
from .tokenizer import Tokenizer, load_tokenizer
from .weights import load_config, load_model

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "DataError", "TrainingError", "LoRALinear", "MiniLoraError", "Tokenizer",
           "apply_lora", "generate", "load_config", "load_model", "load_tokenizer", "merge_lora", "param_report",
           "remove_lora", "unmerge_lora"]
