"""minilora: LoRA fine-tuning written from scratch in plain PyTorch."""

from .adapter import load_adapter, save_adapter
from .errors import CheckpointError, ConfigError, DataError, MiniLoraError, TrainingError
from .generate import generate
from .inject import LoRAConfig, apply_lora, merge_lora, remove_lora, unmerge_lora
from .lora import LoRALinear
from .report import param_report
from .tokenizer import Tokenizer, load_tokenizer
from .train import TrainConfig, train
from .weights import load_config, load_model, save_model

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "DataError", "LoRAConfig", "LoRALinear", "MiniLoraError", "Tokenizer",
           "TrainConfig", "TrainingError", "apply_lora", "generate", "load_adapter", "load_config", "load_model",
           "load_tokenizer", "merge_lora", "param_report", "remove_lora", "save_adapter", "save_model", "train",
           "unmerge_lora"]
