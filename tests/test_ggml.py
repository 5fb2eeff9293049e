"""ggml's block formats against the gguf package's own dequantization (the oracle), on random blocks of
every type; GGMLLinear against the float product of its dequantized weight."""

import numpy as np
import pytest
import torch
from minilora.errors import ConfigError
from minilora.formats import ggml_blocks as ggml
from minilora.formats.ggml_blocks import BLOCKS, NAMES, QUANTIZED, dequantize_blocks, dequantize_blocks_into
from minilora.quant.ggml import GGMLEmbedding, GGMLLinear

gguf = pytest.importorskip("gguf")

# where each type keeps its fp16 scales (d, and dmin or m): random bytes there could be NaN or inf
F16_FIELDS = {ggml.Q4_0: (0,), ggml.Q4_1: (0, 2), ggml.Q5_0: (0,), ggml.Q5_1: (0, 2), ggml.Q8_0: (0,),
              ggml.Q2_K: (80, 82), ggml.Q3_K: (108,), ggml.Q4_K: (0, 2), ggml.Q5_K: (0, 2), ggml.Q6_K: (208,)}


def random_blocks(kind, n=64, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, BLOCKS[kind][1]), dtype=np.uint8)
    for at in F16_FIELDS[kind]:
        raw[:, at:at + 2] = (rng.standard_normal(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw


@pytest.mark.parametrize("kind", sorted(QUANTIZED), ids=lambda k: NAMES[k])
def test_dequantization_equals_the_gguf_package(kind):
    raw = random_blocks(kind)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(kind)).reshape(len(raw), -1)
    got = dequantize_blocks(torch.from_numpy(raw), kind)
    assert got.shape == expected.shape == (len(raw), BLOCKS[kind][0])
    assert np.array_equal(got.numpy(), expected.astype(np.float32)), np.abs(got.numpy() - expected).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", sorted(QUANTIZED), ids=lambda k: NAMES[k])
def test_dequantization_into_a_buffer_equals_the_plain_one(kind, dtype):
    """What the products rebuild their rows with (dequantize_blocks_into, its steps in buffers reused
    between calls): bit for bit dequantize_blocks' values rounded to the dtype, call after call on other
    blocks (a reused step buffer holds nothing of the last call)."""
    for seed, n in ((0, 64), (1, 40), (2, 64)):
        raw = torch.from_numpy(random_blocks(kind, n=n, seed=seed))
        out = torch.full((n, BLOCKS[kind][0]), float("nan"), dtype=dtype)
        assert dequantize_blocks_into(raw, kind, out) is out
        assert torch.equal(out, dequantize_blocks(raw, kind).to(dtype))


@pytest.mark.parametrize("row_block", [None, 4096], ids=["one-block", "row-blocks"])
@pytest.mark.parametrize("kind", [ggml.Q4_K, ggml.Q6_K, ggml.Q8_0, ggml.Q4_0, ggml.Q4_1], ids=lambda k: NAMES[k])
def test_ggml_linear_is_the_product_of_its_dequantized_weight(kind, row_block, monkeypatch):
    """Forward and input gradient against the float products of the dequantized weight, with the whole
    weight rebuilt at once and (a smaller kernels.ROW_BLOCK) a block of rows at a time."""
    if row_block is not None:
        monkeypatch.setattr("minilora.kernels.ROW_BLOCK", row_block)
    d, k = 96, 512
    raw = torch.from_numpy(random_blocks(kind, n=d * k // BLOCKS[kind][0], seed=1))
    bias = torch.randn(d)
    layer = GGMLLinear(k, d, kind, raw, bias)
    w = layer.dequantize()
    x = torch.randn(3, 5, k, requires_grad=True)
    y = layer(x)
    x64, w64 = x.detach().double(), w.double()
    close = lambda a, b: ((a.double() - b).norm() / b.norm()).item() <= 1e-6  # noqa: E731 (fp32 sums of 512)
    assert close(y, x64 @ w64.t() + bias.double())
    g = torch.randn_like(y)
    y.backward(g)
    assert close(x.grad, g.double() @ w64)
    assert layer.weight.grad is None


def write_kquant_gguf(path, kinds, seed=0, embedding=None):
    """A tiny Llama GGUF (hidden 256: whole K-quant blocks per row) with random raw blocks of the given
    type for each block weight, F32 norms and an F16 embedding (or one of random blocks of `embedding`)."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter
    hidden, ffn, layers, heads, vocab = 256, 512, 2, 4, 97
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    rng = np.random.default_rng(seed)
    shapes = {"attn_q": (hidden, hidden), "attn_k": (128, hidden), "attn_v": (128, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    if embedding is None:
        writer.add_tensor("token_embd.weight", (rng.standard_normal((vocab, hidden)) * 0.05).astype(np.float16))
    else:
        raw = random_blocks(embedding, n=vocab * hidden // BLOCKS[embedding][0], seed=seed + 1)
        writer.add_tensor("token_embd.weight", raw.reshape(vocab, -1), raw_dtype=T(embedding))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        for j, (name, (rows, cols)) in enumerate(shapes.items()):
            kind = kinds[(i * len(shapes) + j) % len(kinds)]
            raw = random_blocks(kind, n=rows * cols // BLOCKS[kind][0], seed=seed + 10 * i + j)
            writer.add_tensor(f"blk.{i}.{name}.weight", raw.reshape(rows, -1), raw_dtype=T(kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_base_kept_in_its_blocks_computes_what_the_dequantized_base_computes(tmp_path):
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    from minilora.lora.peft_files import load_adapter, save_adapter
    from minilora.lora.report import param_report
    kinds = [ggml.Q4_K, ggml.Q5_K, ggml.Q6_K, ggml.Q8_0, ggml.Q4_0, ggml.Q4_1, ggml.Q3_K, ggml.Q2_K, ggml.Q5_0]
    path = write_kquant_gguf(tmp_path / "k.gguf", kinds)
    dense, kept = load_model(path), load_model(path, keep_quantized=True)
    layers = {n: m for n, m in kept.named_modules() if isinstance(m, GGMLLinear)}
    assert len(layers) == 14 and {m.kind for m in layers.values()} == set(kinds)
    assert type(kept.model.embed_tokens) is torch.nn.Embedding and kept.lm_head.weight.dtype == torch.float32
    for name, m in layers.items():  # the q/k row permutation undone on the raw rows, as on the floats
        assert torch.equal(m.dequantize(), dense.get_submodule(name).weight), name
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (kept(ids) - dense(ids)).abs().max().item() <= 1e-5
    assert param_report(kept).total == param_report(dense).total  # logical elements
    stored = sum(m.weight.numel() for m in layers.values())
    assert stored < 0.3 * sum(m.in_features * m.out_features * 4 for m in layers.values())
    apply_lora(kept, ["q_proj", "down_proj"], r=4, alpha=8)
    with torch.no_grad():
        for n, p in kept.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    kept(ids).square().mean().backward()
    assert all(p.grad is not None for n, p in kept.named_parameters() if p.requires_grad)
    save_adapter(kept, tmp_path / "a")
    with torch.no_grad():
        assert (load_adapter(dense, tmp_path / "a")(ids) - kept(ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", [ggml.Q8_0, ggml.Q4_K])
def test_quantized_embedding_and_its_tied_head_stay_in_blocks(tmp_path, kind):
    """A quantized token embedding (SmolLM2's is Q8_0) is kept too, with the head tied to it reading the
    same blocks: the logits, the fused head loss and the LoRA gradients equal the dequantized model's."""
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    from minilora.lora.report import memory_rows, param_report
    from minilora.training.objectives.causal_lm import causal_lm_loss
    path = write_kquant_gguf(tmp_path / "e.gguf", [ggml.Q4_K], embedding=kind)
    dense, kept = load_model(path), load_model(path, keep_quantized=True)
    emb = kept.model.embed_tokens
    assert isinstance(emb, GGMLEmbedding) and emb.kind == kind and emb.weight.dtype == torch.uint8
    assert isinstance(kept.lm_head, GGMLLinear) and kept.lm_head.weight is emb.weight  # tied: one copy
    assert torch.equal(emb.dequantize(), dense.model.embed_tokens.weight)
    assert param_report(kept).total == param_report(dense).total
    assert memory_rows(kept) == memory_rows(dense)  # the report sizes the logical weights either way
    ids = torch.randint(0, 97, (3, 11))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        assert (kept(ids) - dense(ids)).abs().max().item() <= 1e-5
    grads = []
    for model in (kept, dense):
        torch.manual_seed(0)  # not q/k: this random model's softmax saturates, their gradients are rounding noise
        apply_lora(model, ["v_proj", "down_proj"], r=4, alpha=8)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        loss, count = causal_lm_loss(model, batch)
        loss.backward()
        grads.append((loss.item(), count, [p.grad for p in model.parameters() if p.requires_grad]))
    (a, n_a, ga), (b, n_b, gb) = grads
    assert n_a == n_b == 3 * 7 and abs(a - b) <= 1e-5 * abs(b)
    ga, gb = torch.cat([x.flatten() for x in ga]), torch.cat([y.flatten() for y in gb])
    assert ((ga - gb).norm() / gb.norm()).item() <= 1e-4
    with pytest.raises(ConfigError, match="embed_tokens"):  # a quantized table is not a LoRA target
        apply_lora(load_model(path, keep_quantized=True), ["embed_tokens"], r=4, alpha=8)


def test_keep_quantized_needs_a_gguf_file(saved_tiny):
    from minilora.errors import ConfigError
    from minilora.loading.weights import load_model
    _, folder = saved_tiny["llama-gqa"]
    with pytest.raises(ConfigError, match="keep_quantized keeps a .gguf file's own blocks: .* is not one"):
        load_model(folder, keep_quantized=True)


def test_real_smollm2_q4_1_kept_in_its_blocks(smollm2_path):
    """The real Q4_1 file: every block weight stays Q4_1 and the embedding Q8_0 (the base 5.6x smaller
    than in fp32), and the
    logits are those of the dequantized model; LoRA trains on top."""
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    kept, dense = load_model(smollm2_path, keep_quantized=True), load_model(smollm2_path)
    layers = [m for m in kept.modules() if isinstance(m, GGMLLinear)]
    assert len(layers) == 30 * 7 + 1 and {m.kind for m in layers[:-1]} == {ggml.Q4_1}  # and the tied head

    def held(model):
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    print(f"base weights: {held(kept) / 1e6:.0f} MB kept in blocks, {held(dense) / 1e6:.0f} MB in fp32")
    assert held(kept) < 0.2 * held(dense)  # 97 MB of 538: the Q8_0 embedding and its tied head kept too
    assert kept.model.embed_tokens.kind == ggml.Q8_0 and kept.lm_head.weight is kept.model.embed_tokens.weight
    ids = torch.tensor([[1, 9690, 314, 253, 3575, 28, 2], [1, 504, 3575, 282, 4649, 314, 2]])
    with torch.no_grad():
        assert (kept(ids) - dense(ids)).abs().max().item() <= 1e-3
    apply_lora(kept, ["q_proj", "v_proj"], r=4, alpha=8)
    kept(ids).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in kept.parameters() if p.requires_grad)


def test_kept_blocks_with_a_nan_scale_or_overlapping_data_are_refused(tmp_path):
    """What the float path refuses, the kept-blocks path refuses too: a NaN scale names the tensor; a
    header whose type makes one tensor's bytes run into the next one's is refused as corrupt."""
    from minilora.errors import CheckpointError
    from minilora.formats.gguf import read_gguf
    from minilora.loading.weights import load_model
    path = write_kquant_gguf(tmp_path / "k.gguf", [ggml.Q4_0])
    file = read_gguf(path)
    _, kind, offset = file.infos["blk.0.attn_q.weight"]
    data = bytearray(path.read_bytes())
    data[file.data_start + offset:file.data_start + offset + 2] = np.array([np.nan], np.float16).tobytes()
    (tmp_path / "nan.gguf").write_bytes(bytes(data))
    for keep in (False, True):
        with pytest.raises(CheckpointError, match=r"nan.gguf: tensor blk.0.attn_q.weight holds NaN or infinite "
                                                  r"values|model.layers.0.self_attn.q_proj.weight holds NaN"):
            load_model(tmp_path / "nan.gguf", keep_quantized=keep)
    # the type of blk.0.attn_q.weight changed in the header from Q4_0 (18-byte blocks) to Q8_0 (34)
    header = bytes(path.read_bytes())
    at = header.index(b"blk.0.attn_q.weight") + len(b"blk.0.attn_q.weight") + 4 + 8 * 2  # n_dims, two dims
    assert int.from_bytes(header[at:at + 4], "little") == ggml.Q4_0
    (tmp_path / "overlap.gguf").write_bytes(header[:at] + ggml.Q8_0.to_bytes(4, "little") + header[at + 4:])
    with pytest.raises(CheckpointError, match=r"overlap.gguf: tensor blk.0.attn_q.weight's data overlaps tensor "):
        load_model(tmp_path / "overlap.gguf", keep_quantized=True)
