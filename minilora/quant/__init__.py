"""Frozen base weights stored in fewer bits: int8 (LLM.int8()), NF4 (QLoRA) and ggml's blocks (a GGUF
file's own), each a `QuantizedLinear` (base.py) that LoRA wraps like an nn.Linear.

May import: minilora.formats (ggml's block layouts) and the ground floor (kernels, names, hardware,
errors). It knows nothing of models or of LoRA: it swaps linear layers by name.
"""
