"""Parameter counts of the reference LoRA set-ups, from config.json alone (models built on `meta`).

    python benchmarks/params.py

For each: the frozen and trained parameters of the targeted layers (d*k vs r*(d+k)), the trainable
total (LoRA plus modules_to_save), all parameters, and the share. With transformers and peft
installed, the same configs go through get_peft_model(...).get_nb_trainable_parameters() on `meta`
too, and the two counts are printed side by side (peft's "all params" also counts the frozen original
it keeps of every modules_to_save module). Writes benchmarks/results/params.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minilora.lora.inject import apply_lora
from minilora.lora.report import param_report
from minilora.models import PRESETS, build_model

RESULTS = Path(__file__).resolve().parent / "results"

DISTILBERT = dict(model_type="distilbert", vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
                  max_position_embeddings=512, id2label={0: "negative", 1: "positive"})
LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0)

# (name, config, task, LoRA targets, r, alpha, modules_to_save): the three reference workflows and an 8B
CASES = [
    ("gpt2-medium", PRESETS["gpt2-medium"], None, ["c_attn"], 16, 32, []),
    ("GPT-J-6B", PRESETS["EleutherAI/gpt-j-6b"], None, ["q_proj", "v_proj"], 8, 16, []),
    ("DistilBERT (classifier)", DISTILBERT, "classification", ["q_lin"], 4, 32, ["pre_classifier", "classifier"]),
    ("Llama-3-8B", LLAMA3_8B, None, "all-linear", 16, 32, []),
]


def minilora_counts(config: dict, task, targets, r: int, alpha: int, save: list[str]):
    with torch.device("meta"):
        model = build_model(config, task=task)
        apply_lora(model, targets, r=r, alpha=alpha, modules_to_save=save)
    return param_report(model)


def peft_counts(config: dict, task, targets, r: int, alpha: int) -> tuple[int, int] | None:
    """(trainable, all) from transformers + peft on the same config, or None when they are not installed."""
    try:
        import transformers
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    classes = {"gpt2": ("GPT2Config", "GPT2LMHeadModel"), "gptj": ("GPTJConfig", "GPTJForCausalLM"),
               "llama": ("LlamaConfig", "LlamaForCausalLM"),
               "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification")}[model_type]
    with torch.device("meta"):
        hf = getattr(transformers, classes[1])(getattr(transformers, classes[0])(**cfg))
        lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="SEQ_CLS" if task else "CAUSAL_LM")
        model = get_peft_model(hf, lora)
    return model.get_nb_trainable_parameters()


def main() -> None:
    rows = []
    print(f"{'model':<24} {'targets':<18} {'r':>3} {'frozen d*k':>15} {'LoRA r*(d+k)':>13} {'trainable':>12} "
          f"{'all params':>15} {'trainable%':>10}  peft (trainable / all)")
    for name, config, task, targets, r, alpha, save in CASES:
        report = minilora_counts(config, task, targets, r, alpha, save)
        frozen = sum(row.count * row.frozen for row in report.rows)
        lora = sum(row.count * row.trainable for row in report.rows)
        peft = peft_counts(config, task, targets, r, alpha)
        extra = sum(n for _, n in report.saved_modules)  # peft keeps the original beside each module_to_save
        same = "" if peft is None else ("  same" if peft == (report.trainable, report.total) else
                                        "  same (peft's total counts its frozen copy of the head)"
                                        if peft == (report.trainable, report.total + extra) else "  DIFFERENT")
        shown = "not installed" if peft is None else f"{peft[0]:,} / {peft[1]:,}{same}"
        label = targets if isinstance(targets, str) else ",".join(targets)
        print(f"{name:<24} {label:<18} {r:>3} {frozen:>15,} {lora:>13,} {report.trainable:>12,} "
              f"{report.total:>15,} {report.percent:>9.4f}%  {shown}")
        rows.append(dict(model=name, targets=targets, r=r, alpha=alpha, modules_to_save=save, frozen_targeted=frozen,
                         lora=lora, trainable=report.trainable, total=report.total, percent=report.percent,
                         peft=list(peft) if peft else None))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "params.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
