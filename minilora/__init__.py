"""minilora: LoRA fine-tuning written from scratch in plain PyTorch."""

from .data.records import build_examples, read_records, split
from .errors import (
           CheckpointError,
           ConfigError,
           DataError,
           MiniLoraError,
           TrainingError,
)
from .generate import generate
from .loading.tokenizer import Tokenizer, load_tokenizer
from .loading.weights import load_config, load_model, save_model
from .lora.adapters import add_adapter, delete_adapter, set_adapter
from .lora.config import LoRAConfig
from .lora.inject import (
           adapter_disabled,
           apply_lora,
           merge_lora,
           remove_lora,
           unmerge_lora,
)
from .lora.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .lora.layers import LoRALinear
from .lora.mixed import mixed_adapters
from .lora.peft_files import load_adapter, save_adapter
from .lora.report import param_report
from .ship.gguf_export import export_adapter, export_merged
from .ship.hub import push_to_hub
from .training.loop import TrainConfig, train

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "DataError", "LoRAConfig", "LoRALinear", "MiniLoraError", "Tokenizer",
           "TrainConfig", "TrainingError", "adapter_disabled", "add_adapter", "apply_lora", "build_examples",
           "delete_adapter", "export_adapter", "export_merged", "generate", "hotswap_adapter", "load_adapter", "load_config", "load_model",
           "load_tokenizer", "merge_lora", "mixed_adapters", "param_report", "prepare_model_for_compiled_hotswap", "push_to_hub", "read_records", "remove_lora", "save_adapter",
           "save_model", "set_adapter", "split", "train", "unmerge_lora"]
