"""Against llama.cpp itself (opt-in: `make test-llamacpp`, which builds llama-cpp-python from source in
its own venv and points MINILORA_LLAMACPP_PYTHON at it; skipped otherwise).

Exported files: llama.cpp runs minilora's adapter file on the base GGUF, and the merged GGUF, with
minilora's logits, and the quotes adapter's format comes out of llama.cpp's own greedy generation.

Real K-quant files made from SmolLM2 by llama.cpp's own quantizer: every tensor dequantizes exactly as
the gguf package does it, the base kept in its blocks computes the dequantized model's logits, and
llama.cpp runs the same files. On an F32 copy, llama.cpp's logits are minilora's to its rounding."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

LLAMA_PY = os.environ.get("MINILORA_LLAMACPP_PYTHON")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not LLAMA_PY, reason="opt-in: make test-llamacpp")]
TOOL = Path(__file__).resolve().parents[1] / "scripts" / "llamacpp.py"
IDS = [1, 9690, 314, 253, 3575, 28, 2, 504, 3575, 282, 4649, 314]
# llama.cpp's file types, and the ggml types their block weights get (hidden 576 is not a multiple of
# 256, so only ffn_down, 1536 wide, takes a K type; llama.cpp puts the rest in the nearest 32-block type)
KINDS = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q3_K_M": "Q4_K", "Q2_K": "Q3_K", "Q2_K-pure": "Q2_K"}


def llamacpp(*args) -> str:
    return subprocess.run([LLAMA_PY, str(TOOL), *map(str, args)], check=True, stderr=subprocess.DEVNULL,
                          capture_output=False, stdout=subprocess.PIPE, text=True).stdout


@pytest.fixture(scope="module")
def made(smollm2_path, tmp_path_factory):
    def make(kind):
        out = tmp_path_factory.getbasetemp() / f"smollm2-{kind}.gguf"
        if not out.exists():
            llamacpp("quantize", smollm2_path, out, kind.removesuffix("-pure"), *(["--pure"] if kind.endswith("-pure") else []))
        return out
    return make


def llamacpp_logits(path, tmp_path, lora=None):
    out = tmp_path / "logits.npy"
    llamacpp("logits", path, ",".join(map(str, IDS)), out, *(["--lora", lora] if lora else []))
    return torch.from_numpy(np.load(out))


def test_llamacpp_computes_miniloras_logits_on_an_f32_copy(made, smollm2_path, tmp_path):
    from minilora.loading.weights import load_model
    f32 = made("F32")
    ours = load_model(f32)
    with torch.no_grad():
        logits = ours(torch.tensor([IDS]))[0]
        assert torch.equal(logits, load_model(smollm2_path)(torch.tensor([IDS]))[0])  # F32 holds Q4_1's values
    theirs = llamacpp_logits(f32, tmp_path)
    print(f"F32: max |llama.cpp - minilora| = {(theirs - logits).abs().max():.4f} (logits up to {logits.abs().max():.1f})")
    assert (theirs - logits).abs().max().item() <= 0.1 and torch.equal(theirs.argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("kind", KINDS)
def test_real_kquant_files_dequantize_and_train_as_llamacpp_wrote_them(made, tmp_path, kind):
    gguf = pytest.importorskip("gguf")
    from minilora.formats import ggml_blocks as ggml
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    from minilora.quant.ggml import GGMLLinear
    path = made(kind)
    seen = set()
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        raw = torch.from_numpy(np.array(t.data).reshape(-1).view(np.uint8).copy())
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(shape)
        assert torch.equal(ggml.dequantize(raw, int(t.tensor_type), shape), expected), (t.name, t.tensor_type.name)
        seen.add(t.tensor_type.name)
    assert KINDS[kind] in seen
    kept, dense = load_model(path, keep_quantized=True), load_model(path)
    assert ggml.NAMES[getattr(ggml, KINDS[kind])] in {ggml.NAMES[m.kind] for m in kept.modules() if isinstance(m, GGMLLinear)}
    ids = torch.tensor([IDS])
    with torch.no_grad():
        logits = dense(ids)[0]
        assert (kept(ids)[0] - logits).abs().max().item() <= 1e-4
    theirs = llamacpp_logits(path, tmp_path)  # llama.cpp rounds activations to 8 bits in its products
    cosine = torch.nn.functional.cosine_similarity(theirs, logits, dim=-1)
    print(f"{kind}: max |llama.cpp - minilora| = {(theirs - logits).abs().max():.2f}, cosine >= {cosine.min():.4f}, "
          f"argmax agrees at {(theirs.argmax(-1) == logits.argmax(-1)).sum()}/{len(IDS)}")
    assert cosine.mean().item() >= 0.995 and cosine.min().item() >= 0.95  # Q2_K: one position at 0.979
    apply_lora(kept, ["q_proj", "v_proj"], r=4, alpha=8)
    kept(ids).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in kept.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def quotes_adapter(smollm2_path, quotes_path, tmp_path_factory):
    """The demo's quotes adapter (its recipe, 20 steps), trained once for these tests."""
    from minilora.recipe import load_recipe, run_recipe
    out = tmp_path_factory.mktemp("quotes-run")
    recipe = load_recipe("quotes-smollm2", overrides={
        "model.name": str(smollm2_path), "data.train": str(quotes_path), "train.output_dir": str(out),
        "train.progress": "false"})
    model, tokenizer, result = run_recipe(recipe)
    return model, tokenizer, result.adapter_dir


def test_llamacpp_runs_the_exported_adapter_and_merged_model_with_miniloras_logits(made, quotes_adapter, tmp_path):
    """On the F32 base (llama.cpp's products then round only as fp32's do): base + adapter file, and the
    merged F32 file, against minilora's model with the adapter, position by position."""
    from minilora.loading.weights import load_model
    from minilora.lora.peft_files import load_adapter
    from minilora.ship.gguf_export import export_adapter, export_merged
    f32 = made("F32")
    model = load_adapter(load_model(f32), quotes_adapter[2])
    with torch.no_grad():
        ours = model(torch.tensor([IDS]))[0]
    export_adapter(model, tmp_path / "adapter.gguf")
    with_adapter = llamacpp_logits(f32, tmp_path, tmp_path / "adapter.gguf")
    merged = llamacpp_logits(export_merged(model, tmp_path / "merged.gguf", "f32"), tmp_path)
    for name, theirs in (("base + adapter", with_adapter), ("merged F32", merged)):
        print(f"{name}: max |llama.cpp - minilora| = {(theirs - ours).abs().max():.4f}")
        assert (theirs - ours).abs().max().item() <= 0.1 and torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_the_fine_tuned_format_comes_out_of_llamacpp(smollm2_path, quotes_adapter, tmp_path):
    """The quotes adapter exported as GGUF, on the Q4_1 file as users run it, and the merged Q8_0 file:
    llama.cpp's greedy completions of `Quote by X:` are ` "..."` then EOS, as minilora's are; the base
    model's are not."""
    import json
    import re

    from minilora.loading.weights import load_model
    from minilora.lora.peft_files import load_adapter
    from minilora.ship.gguf_export import export_adapter, export_merged
    model = load_adapter(load_model(smollm2_path), quotes_adapter[2])
    export_adapter(model, tmp_path / "adapter.gguf")
    export_merged(model, tmp_path / "merged.gguf", "q8_0")
    authors = ["Mark Twain", "Oscar Wilde", "Albert Einstein", "Mae West"]
    kept = {}
    for name, args in (("base", [smollm2_path]), ("base + adapter", [smollm2_path, "--lora", tmp_path / "adapter.gguf"]),
                       ("merged Q8_0", [tmp_path / "merged.gguf"])):
        outs = [json.loads(llamacpp("generate", args[0], f"Quote by {a}:", 60, *args[1:])) for a in authors]
        kept[name] = sum(o["finish_reason"] == "stop" and re.fullmatch(r' "[^"]+"', o["text"]) is not None for o in outs)
        print(f"{name}: {kept[name]}/{len(authors)} in the format; e.g. {outs[0]['text']!r}")
    assert kept["base + adapter"] == kept["merged Q8_0"] == len(authors) and kept["base"] < len(authors)


# ---------------------------------------------------------------------------------------------
# Today's families: Qwen3, Gemma 2 and Gemma 3 exported; the real Gemma 3 270M and Qwen2.5 files

def _family_model(model_type, tmp_path):
    """A tiny random transformers model of the family, with SmolLM2's vocabulary size (so that its real
    tokenizer goes into the file: llama.cpp loads no file without one), loaded here with a LoRA'd q/v."""
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    from test_export_families import CONFIGS, classes
    config_cls, model_cls = classes(model_type)
    torch.manual_seed(0)
    hf = model_cls(config_cls(**{**CONFIGS[model_type], "vocab_size": 49152}, attn_implementation="eager"))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1 if p.dim() > 1 else 0.3)
    hf.save_pretrained(tmp_path / model_type)
    model = apply_lora(load_model(tmp_path / model_type), ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2", "gemma3_text"])
def test_llamacpp_runs_exported_qwen3_and_gemma_files_with_miniloras_logits(smollm2_path, tmp_path, model_type):
    """The merged F32 file, and the base F32 file with the adapter file: llama.cpp's logits are minilora's
    (Gemma's norms travel as 1 + w, its four norms a block under their names, Qwen3's q/k norms)."""
    import copy

    from minilora.loading.tokenizer import load_tokenizer
    from minilora.lora.inject import adapter_disabled, remove_lora
    from minilora.ship.gguf_export import export_adapter, export_merged
    model = _family_model(model_type, tmp_path)
    tokenizer = load_tokenizer(smollm2_path)
    with torch.no_grad():
        ours = model(torch.tensor([IDS]))[0]
        with adapter_disabled(model):
            base = model(torch.tensor([IDS]))[0]
    merged = export_merged(model, tmp_path / "merged.gguf", "f32", tokenizer)
    export_adapter(model, tmp_path / "adapter.gguf")
    plain = export_merged(remove_lora(copy.deepcopy(model), merge=False), tmp_path / "base.gguf", "f32", tokenizer)
    for name, theirs, want in (("merged F32", llamacpp_logits(merged, tmp_path), ours),
                               ("base F32", llamacpp_logits(plain, tmp_path), base),
                               ("base + adapter", llamacpp_logits(plain, tmp_path, tmp_path / "adapter.gguf"), ours)):
        error = (theirs - want).abs().max().item()
        print(f"{model_type} {name}: max |llama.cpp - minilora| = {error:.2e} (logits up to {want.abs().max():.2f})")
        # llama.cpp keeps its KV cache in F16: to about 0.2% of the largest logit (SmolLM2's F32 file: 0.3%)
        assert error <= 1e-2 * want.abs().max().item() and torch.equal(theirs.argmax(-1), want.argmax(-1))


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "The three primary colors are"]


def _greedy_both(path, prompts_ids, n, tmp_path):
    import json

    from minilora.generate import generate_ids
    from minilora.loading.weights import load_model
    model = load_model(path, keep_quantized=True)
    ours = [generate_ids(model, [ids], [model.config.eos_token_id] if isinstance(model.config.eos_token_id, int)
                         else list(model.config.eos_token_id or []), 0, max_new_tokens=n)[0] for ids in prompts_ids]
    theirs = [json.loads(llamacpp("greedy", path, ",".join(map(str, ids)), n)) for ids in prompts_ids]
    return ours, theirs


def test_real_gemma3_270m_continues_as_llamacpp_does(gemma3_270m_path, tmp_path):
    """Greedy continuations of the real Gemma 3 270M (kept in its Q4_K_M blocks here), token for token
    against llama.cpp's on the same file (llama.cpp rounds activations to 8 bits: a near tie may flip)."""
    from minilora.loading.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(gemma3_270m_path)
    ours, theirs = _greedy_both(gemma3_270m_path, [tokenizer.encode(p) for p in PROMPTS], 12, tmp_path)
    for prompt, a, b in zip(PROMPTS, ours, theirs):
        print(f"{prompt!r}: minilora {tokenizer.decode(a)!r} | llama.cpp {tokenizer.decode(b)!r}")
    same = sum(a == b for a, b in zip(ours, theirs))
    assert same >= len(PROMPTS) - 1
    _diverge_only_at_near_ties(gemma3_270m_path, [tokenizer.encode(p) for p in PROMPTS], ours, theirs)


def _diverge_only_at_near_ties(path, prompts_ids, ours, theirs):
    """Where the two continuations part, llama.cpp's token is minilora's second choice, within a logit
    of its first: a near tie that llama.cpp's 8-bit activations tip, not a different model."""
    from minilora.loading.weights import load_model
    model = load_model(path, keep_quantized=True)
    for ids, a, b in zip(prompts_ids, ours, theirs):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([ids + a[:k]]))[0, -1]
        top = logits.topk(2)
        print(f"parted after {k} tokens: minilora's top two {top.indices.tolist()} ({top.values[0] - top.values[1]:.3f} "
              f"apart), llama.cpp took {b[k]}")
        assert top.indices.tolist() == [a[k], b[k]] and (top.values[0] - top.values[1]).item() < 1.0


def test_real_qwen25_chat_answers_as_llamacpp_does(qwen25_05b_path, tmp_path):
    """Qwen2.5-Coder-0.5B-Instruct's greedy chat answers, its ChatML template rendered here, against
    llama.cpp's greedy continuation of the same ids."""
    from minilora.loading.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(qwen25_05b_path)
    questions = ["What is the capital of France?", "Write a Python function that adds two numbers.",
                 "Name three primary colors."]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]),
                                add_special_tokens=False) for q in questions]
    ours, theirs = _greedy_both(qwen25_05b_path, prompts, 24, tmp_path)
    for q, a, b in zip(questions, ours, theirs):
        print(f"{q!r}: minilora {tokenizer.decode(a)!r} | llama.cpp {tokenizer.decode(b)!r}")
    assert "Paris" in tokenizer.decode(ours[0])
    same = sum(a == b for a, b in zip(ours, theirs))
    assert same >= len(questions) - 1
    _diverge_only_at_near_ties(qwen25_05b_path, prompts, ours, theirs)
