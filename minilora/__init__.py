"""minilora: LoRA fine-tuning written from scratch in plain PyTorch."""

from .adapter import load_adapter, save_adapter
from .data import build_examples, read_records, split
from .errors import CheckpointError, ConfigError, DataError, MiniLoraError, TrainingError
from .export import export_adapter, export_merged
from .generate import generate
from .hub import push_to_hub
from .inject import (LoRAConfig, adapter_disabled, add_adapter, apply_lora, delete_adapter, merge_lora, remove_lora,
                     set_adapter, unmerge_lora)
from .lora import LoRALinear
from .report import param_report
from .tokenizer import Tokenizer, load_tokenizer
from .train import TrainConfig, train
from .weights import load_config, load_model, save_model

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "DataError", "LoRAConfig", "LoRALinear", "MiniLoraError", "Tokenizer",
           "TrainConfig", "TrainingError", "adapter_disabled", "add_adapter", "apply_lora", "build_examples",
           "delete_adapter", "export_adapter", "export_merged", "generate", "load_adapter", "load_config", "load_model",
           "load_tokenizer", "merge_lora", "param_report", "push_to_hub", "read_records", "remove_lora", "save_adapter",
           "save_model", "set_adapter", "split", "train", "unmerge_lora"]
