"""Shared fixtures and helpers: tiny random models built by transformers (the oracle) and saved to disk;
real weights and data fetched through package registries (minilora/data/assets.py); tiny datasets, a
stand-in tokenizer and a recipe for the training tests.

A test that uses a real-asset fixture (ASSET_FIXTURES) is marked `slow`: `make test-fast` leaves
those out, and with them every download."""

import json
import shutil
import sys

import pytest
import torch

TINY = {
    "gpt2": dict(model_type="gpt2", vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama-gqa": dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=5e4),
    "llama-tied": dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama3-rope": dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=16),
                        max_position_embeddings=128),
    "gptj": dict(model_type="gptj", vocab_size=97, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
    "qwen2": dict(model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral-window": dict(model_type="mistral", vocab_size=97, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
}
ENCODERS = {
    "distilbert": dict(model_type="distilbert", vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                       id2label={0: "negative", 1: "positive"}),
    "bert": dict(model_type="bert", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, id2label={0: "a", 1: "b", 2: "c"}),
}


def hf_model(kind: str, seed: int = 0):
    """A transformers model with random weights for one of the TINY configs, in eval mode."""
    import transformers
    cfg = dict(TINY.get(kind) or ENCODERS[kind])
    model_type = cfg.pop("model_type")
    config_cls, model_cls = {
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "gptj": (transformers.GPTJConfig, transformers.GPTJForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "distilbert": (transformers.DistilBertConfig, transformers.DistilBertForSequenceClassification),
        "bert": (transformers.BertConfig, transformers.BertForSequenceClassification),
    }[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg, attn_implementation="eager"))
    with torch.no_grad():  # random, not-small values everywhere, biases and norms included
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory):
    """save_pretrained folders of every TINY model: {kind: (hf_model, folder)}."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for kind in [*TINY, *ENCODERS]:
        model = hf_model(kind)
        model.save_pretrained(root / kind)
        out[kind] = (model, root / kind)
    return out


# ---------------------------------------------------------------------------------------------
# Real assets, fetched once into the cache (minilora/data/assets.py)

# fixture name -> the assets.py function that fetches it
ASSETS = {"smollm2_path": "smollm2",                # SmolLM2-135M-Instruct, Q4_1 GGUF
          "minilm_path": "minilm",                  # all-MiniLM-L6-v2 (a BERT): safetensors + tokenizer.json
          "gpt2_tokenizer_path": "gpt2_tokenizer",  # GPT-2's real vocab.json + merges.txt
          "reviews": "reviews",                     # Pang & Lee review sentences: (train CSV, test CSV)
          "alpaca_path": "alpaca",                  # Alpaca records (JSONL)
          "quotes_path": "quotes_jsonl",            # quotes with authors (JSONL)
          "qwen25_05b_path": "qwen25_05b",          # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (arch qwen2)
          "qwen25_15b_path": "qwen25_15b",          # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (arch qwen2)
          "gemma3_270m_path": "gemma3_270m"}        # Gemma 3 270M, Q4_K_M GGUF (arch gemma3)
ASSET_FIXTURES = {*ASSETS, "smollm2"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if ASSET_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _asset_fixture(name: str, fetch: str):
    @pytest.fixture(scope="session", name=name)
    def fixture():
        from minilora.data import assets
        return getattr(assets, fetch)()
    return fixture


for _name, _fetch in ASSETS.items():
    globals()[_name] = _asset_fixture(_name, _fetch)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from minilora.loading.tokenizer import load_tokenizer
    from minilora.loading.weights import load_model
    return load_model(smollm2_path), load_tokenizer(smollm2_path)


# ---------------------------------------------------------------------------------------------
# Training helpers: tiny datasets over the tiny models' 97 ids, a LoRA model, a recipe

class Tok:
    """The two ids train() needs of a tokenizer."""
    pad_token_id = 0
    eos_token_id = 1


def examples(n=24, seed=0, vocab=97):
    """n examples of 3 to 14 random ids, the first third of each masked out of the loss (a prompt)."""
    from minilora.data.records import Example
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 15, (1,), generator=g))
        ids = torch.randint(2, vocab, (length,), generator=g).tolist()
        labels = [-100] * (length // 3) + ids[length // 3:]  # some prompt tokens masked
        out.append(Example(ids, labels))
    return out


def lora_model(saved_tiny, kind="llama-gqa", dropout=0.0, targets="all-linear", std=0.05, **settings):
    """A tiny model with LoRA (by default on every linear layer, r=4, alpha=8), B made non-zero (normal
    with `std`) so that A gets gradients too and the update is not zero."""
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    _, folder = saved_tiny[kind]
    torch.manual_seed(0)
    model = load_model(folder)
    apply_lora(model, targets, **{"r": 4, "alpha": 8, "dropout": dropout, **settings})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_model_with_tokenizer(saved_tiny, tmp_path):
    """The tiny Llama folder plus a word-level tokenizer.json over its 97 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    folder = tmp_path / "tiny"
    shutil.copytree(saved_tiny["llama-gqa"][1], folder)
    vocab = {"[UNK]": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 97)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<eos>"])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return folder


RECIPE = """
[model]
name = "{model}"
[lora]
targets = ["q_proj", "v_proj"]
r = 4
alpha = 8
[data]
train = "{data}"
template = {{ prompt = "{{author}} says", response = " {{quote}}" }}
cutoff = 16
val_size = 4
[train]
output_dir = "{out}"
max_steps = 4
micro_batch_size = 2
batch_size = 4
lr = 1e-2
save_every = 2
progress = false
[generate]
prompts = ["w5 says", "w9 says"]
max_new_tokens = 4
"""


def write_recipe(saved_tiny, tmp_path, **fields):
    """A recipe over the tiny Llama and 20 made-up quotes; `fields` replace text in it."""
    model = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    rows = [{"author": f"w{2 + i % 5}", "quote": " ".join(f"w{(i * 7 + j) % 90 + 3}" for j in range(5))} for i in range(20)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = RECIPE.format(model=model, data=tmp_path / "data.jsonl", out=tmp_path / "run")
    for key, value in fields.items():
        text = text.replace(key, value)
    (tmp_path / "r.toml").write_text(text)
    return tmp_path / "r.toml", model


def load_peak(tmp_path, n_layer: int, forward: bool, **load_kwargs) -> tuple[int, int, int]:
    """(fp32 checkpoint size, baseline VmHWM, VmHWM after loading it) in a fresh process: a random
    GPT-J-shaped checkpoint (hidden 1024, `n_layer` blocks) loaded with `load_kwargs`. The baseline is
    taken after a small load the same way, which pays the one-time costs (imports, kernels)."""
    import subprocess
    import textwrap

    from minilora.models import build_model
    from safetensors.torch import save_file

    def write(folder, **cfg):
        folder.mkdir()
        cfg = dict(model_type="gptj", vocab_size=1000, rotary_dim=16, **cfg)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
        save_file({k: torch.randn(s) * 0.02 for k, s in shapes.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(cfg))
        return (folder / "model.safetensors").stat().st_size
    size = write(tmp_path / "big", n_embd=1024, n_layer=n_layer, n_head=16)
    write(tmp_path / "warmup", n_embd=64, n_layer=1, n_head=4)
    run = "(torch.tensor([[1, 2, 3]]))" if forward else ""
    code = textwrap.dedent(f"""
        import torch, minilora.loading.weights as w
        def hwm(): return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
        w.load_model({str(tmp_path / "warmup")!r}, **{load_kwargs!r})(torch.tensor([[1, 2, 3]]))
        base = hwm()
        w.load_model({str(tmp_path / "big")!r}, **{load_kwargs!r}){run}
        print(base, hwm())
    """)
    base, peak = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         check=True).stdout.split())
    return size, base, peak


# ---------------------------------------------------------------------------------------------
# Helpers of the bad-input tests (tests/test_errors_*.py)

def copy_model(saved_tiny, tmp_path, kind="llama-gqa", **config_changes):
    """A copy of a tiny model's folder, its config.json changed by `config_changes`."""
    folder = tmp_path / kind
    shutil.copytree(saved_tiny[kind][1], folder)
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def digests(folder):
    """{relative path: sha256} of every file under `folder` but the hidden ones (the run's lock)."""
    import hashlib
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def assert_gguf_lora_applies(reader, base, merged, atol: float) -> dict:
    """The GGUF LoRA adapter that `reader` (a gguf.GGUFReader) opened, applied in numpy to each tensor of the
    exported GGUF `base` (W + alpha / r * B A), gives the exported GGUF `merged`, tensor by tensor, and every
    lora_a/lora_b pair is used. Returns the adapter's tensors by name, (out, in) shaped."""
    import gguf
    import numpy as np
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    lora = dict(tensors)
    want = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(merged)).tensors}
    for t in gguf.GGUFReader(str(base)).tensors:
        w = np.asarray(t.data).copy()
        if f"{t.name}.lora_a" in lora:
            a, b = lora.pop(f"{t.name}.lora_a"), lora.pop(f"{t.name}.lora_b")
            w = w + alpha / a.shape[0] * (b @ a)
        assert np.allclose(w, want[t.name], atol=atol), t.name
    assert not lora
    return tensors
