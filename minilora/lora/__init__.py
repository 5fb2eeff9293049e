"""LoRA itself: the layers (the paper's equation) and their variants (DoRA), putting them on a model by
name, several named adapters side by side, PEFT's adapter files (written: peft_files.py; read and
loaded: peft_load.py), the trainable-parameter report and the paper's section 7 analysis.

May import: minilora.quant (a quantized base's contract), minilora.formats and the ground floor. It
knows nothing of model families: it replaces modules by name and reads the output heads a model
declares.
"""
