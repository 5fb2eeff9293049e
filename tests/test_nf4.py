"""NF4 with double quantization (QLoRA) against bitsandbytes' own quantize_4bit/dequantize_4bit on CPU,
and the 4-bit layer against the float product on its dequantized weight."""

import copy
import os

import pytest
import torch
import torch.nn as nn
from conftest import load_peak
from minilora.errors import ConfigError
from minilora.loading.weights import load_model
from minilora.lora.inject import apply_lora, merge_lora
from minilora.lora.layers import LoRALinear
from minilora.lora.report import param_report
from minilora.quant.nf4 import (
    NF4,
    NF4Linear,
    block_absmax,
    dequantize_nf4,
    dynamic_map,
    quantize_nf4,
)

bnb = pytest.importorskip("bitsandbytes.functional")


def weights(shape, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(shape) * 0.05
    w.view(-1)[:3] = torch.tensor([1.5, -2.0, 0.0])  # an outlier block and an exact zero
    return w


def dequantize_4bit(packed, state):
    """bitsandbytes' dequantization. Its CPU kernel takes blocks of 64 within each row, though its
    quantizer cuts the flat tensor (a (96, 80) weight comes back off by 0.1 there, bitsandbytes 0.50):
    rows that are not a multiple of 64 take its generic kernel, which reads the layout it wrote."""
    if state.shape[-1] % 64 == 0:
        return bnb.dequantize_4bit(packed, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, state.code, 64, state.shape, torch.float32)


@pytest.mark.parametrize("shape", [(64, 256), (300, 128), (1024, 1024), (7, 64), (96, 80)])
def test_nf4_double_quantization_equals_bitsandbytes(shape):
    w = weights(shape)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w)
    assert torch.equal(NF4, bnb.get_4bit_type("nf4", device="cpu"))  # the 16 values
    assert torch.equal(dynamic_map(), state.state2.code)  # the 8-bit map of the absmaxes
    assert torch.equal(ours["packed"], packed.flatten())  # every 4-bit code, and the nibble order
    assert torch.equal(ours["absmax_scale"], state.state2.absmax) and ours["absmax_offset"] == state.offset
    absmax = block_absmax(ours["absmax_code"], ours["absmax_scale"], ours["absmax_offset"])
    # bitsandbytes dequantizes our state to exactly our values
    mine = copy.deepcopy(state)
    mine.absmax = ours["absmax_code"].clone()
    assert torch.equal(dequantize_4bit(packed, mine).flatten(), dequantize_nf4(ours["packed"], absmax))
    # The 8-bit absmax codes: bitsandbytes' CPU search is not exactly "nearest" near some midpoints
    # (about 1 block in 800 here); ours is, so where they differ ours is the closer one, never farther.
    true = w.reshape(-1, 64).abs().amax(dim=1) if w.numel() % 64 == 0 else None
    theirs = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    differ = ours["absmax_code"] != state.absmax
    assert differ.float().mean() < 0.05
    if true is not None:
        assert ((absmax - true).abs() <= (theirs - true).abs() + 1e-9).all()
        reference = dequantize_4bit(packed, state).flatten()
        error = (dequantize_nf4(ours["packed"], absmax) - w.flatten()).norm()
        assert error <= 1.001 * (reference - w.flatten()).norm()  # the weights' error: the same, to 0.1%


@pytest.mark.parametrize("k, d, row_block", [(256, 384, None), (256, 384, 4096), (34, 7, None)],
                         ids=["whole-blocks", "row-blocks", "a-short-last-block"])
def test_nf4_linear_forward_and_input_gradient_are_the_dequantized_products(k, d, row_block, monkeypatch):
    """Against the products of the dequantized weight: rebuilt whole, a block of rows at a time (a
    smaller kernels.ROW_BLOCK), and with a last block of codes shorter than 64."""
    if row_block is not None:
        monkeypatch.setattr("minilora.kernels.ROW_BLOCK", row_block)
    torch.manual_seed(1)
    linear = nn.Linear(k, d)
    layer = NF4Linear.from_linear(linear)
    w = layer.dequantize()
    assert w.shape == (d, k) and layer.weight.dtype == torch.uint8 and layer.weight.numel() == d * k // 2
    assert (w - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()  # 4 bits: coarse but close
    x = torch.randn(5, 7, k, requires_grad=True)
    y = layer(x)
    assert torch.allclose(y, x @ w.t() + linear.bias, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ w, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast, in bf16
        assert layer(x).dtype == torch.bfloat16


def test_lora_on_an_nf4_base_trains_and_refuses_to_merge(saved_tiny):
    _, folder = saved_tiny["llama-gqa"]
    model = load_model(folder, load_in_4bit=True)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, NF4Linear) and isinstance(model.lm_head, nn.Linear)  # the head stays in float
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.weight.dtype == torch.uint8
    ids = torch.randint(0, 97, (2, 9))
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    assert layer.lora_A.weight.grad is not None and layer.weight.grad is None
    with pytest.raises(ConfigError, match=r"cannot merge into a quantized \(int8 or 4-bit\) base"):
        merge_lora(model)


def test_load_in_4bit_equals_the_float_model_with_dequantized_weights(saved_tiny):
    """The 4-bit model computes exactly what the float model computes with each weight replaced by its
    NF4 dequantization; the parameter report counts logical elements, as for the float model."""
    _, folder = saved_tiny["qwen2"]
    four = load_model(folder, load_in_4bit=True)
    float_model = load_model(folder)
    with torch.no_grad():
        for name, module in four.named_modules():
            if isinstance(module, NF4Linear):
                float_model.get_submodule(name).weight.copy_(module.dequantize())
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert (four(ids) - float_model(ids)).abs().max().item() <= 1e-5
    assert param_report(four).total == param_report(load_model(folder)).total
    with pytest.raises(ConfigError, match="load_in_8bit and load_in_4bit: choose one"):
        load_model(folder, load_in_4bit=True, load_in_8bit=True)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_4bit_load_peaks_near_the_4bit_size(tmp_path):
    """A 126M-parameter fp32 checkpoint (504 MB): loading it in 4-bit never holds it in fp32 (the
    weights are quantized one by one, a million at a time, as they stream in). The forward pass then
    needs a few MB more per layer at most: it dequantizes 2M weights at a time."""
    size, base, peak = load_peak(tmp_path, n_layer=10, forward=False, load_in_4bit=True)
    print(f"4-bit load: peak {(peak - base) / 1e6:.0f} MB over baseline for a {size / 1e6:.0f} MB fp32 checkpoint")
    assert peak - base < 0.35 * size  # the 4-bit weights are 0.13 of it; then ~70 MB of scratch and float head


@pytest.fixture
def odd_llama(tmp_path):
    """A Llama whose down_proj has 51 inputs: NF4 (two codes a byte) leaves it in float."""
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=40, intermediate_size=51, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    model.save_pretrained(tmp_path / "odd")
    return tmp_path / "odd"


@pytest.mark.parametrize("kind", ["llama-tied", "odd"])
def test_memory_report_equals_the_bytes_each_loaded_model_holds(saved_tiny, odd_llama, kind):
    """From shapes alone (a meta model, as `minilora params` builds it), the report's fp32, int8 and nf4
    totals are the bytes of the tensors that load_model then really holds in each format."""
    from minilora.loading.weights import load_config
    from minilora.lora.report import FORMATS, memory_rows
    from minilora.models import build_model
    folder = odd_llama if kind == "odd" else saved_tiny[kind][1]
    with torch.device("meta"):
        meta = build_model(load_config(folder))
    rows = memory_rows(meta)
    totals = {f: sum(r[1 + i] for r in rows.values()) for i, f in enumerate(FORMATS)}
    if kind == "llama-tied":
        assert rows["model.layers.*.self_attn.q_proj"][0] == 2 and "lm_head" not in rows  # tied: counted once

    def held(model):  # every parameter and buffer, each tensor once
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())
    for fmt, kwargs in (("fp32", {}), ("int8", dict(load_in_8bit=True)), ("nf4", dict(load_in_4bit=True))):
        assert held(load_model(folder, **kwargs)) == totals[fmt], fmt
