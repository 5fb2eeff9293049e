"""Results leaving the process: GGUF files for llama.cpp and Ollama (gguf_export.py) and the Hugging
Face Hub (hub.py).

May import: everything below the entry points (minilora.lora, minilora.training's plots,
minilora.loading, minilora.formats, the ground floor); nothing imports it but the entry points.
"""
