"""Against llama.cpp itself (opt-in: `make test-llamacpp`, which builds llama-cpp-python from source in
its own venv and points MINILORA_LLAMACPP_PYTHON at it; skipped otherwise).

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


def llamacpp(*args):
    subprocess.run([LLAMA_PY, str(TOOL), *map(str, args)], check=True, stderr=subprocess.DEVNULL)


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
    from minilora.weights import load_model
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
    from minilora import ggml
    from minilora.ggml import GGMLLinear
    from minilora.inject import apply_lora
    from minilora.weights import load_model
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
