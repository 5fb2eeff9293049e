"""Files on disk, read and written: where a checkpoint is (a path or a Hub id), safetensors one tensor
at a time, GGUF files and ggml's block formats, and folders written atomically.

May import: the ground floor (minilora.errors, minilora.hardware) only. It knows nothing of models,
LoRA or training: what a tensor means is decided above it.
"""
