"""Training: the loop (loop.py), the objectives it optimises (objectives/), evaluation, checkpoints
and exact resume, data parallelism and FSDP (fsdp.py), and what a run shows (progress.py) and leaves
(plots.py).

May import: minilora.lora (saving the adapter), minilora.quant (a quantized head's rows), minilora.data,
minilora.formats and the ground floor.
It knows a model, a dataset and an objective; nothing of file formats beyond its own checkpoints.
"""
