"""A Hub id, a folder or a GGUF file turned into a model with its weights (weights.py) and its
tokenizer (tokenizer.py), and a model saved back as a checkpoint.

May import: minilora.models, minilora.quant (a base quantized as it streams in), minilora.data (chat
templates), minilora.formats and the ground floor.
"""
