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
