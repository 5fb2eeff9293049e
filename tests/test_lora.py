"""LoRALinear against the paper's equation (Hu et al. 2021, eq. 3), computed by hand."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from minilora.errors import ConfigError
from minilora.loading.weights import load_model
from minilora.lora.inject import apply_lora, merge_lora, remove_lora, unmerge_lora
from minilora.lora.layers import LoRALinear
from minilora.lora.report import param_report


def trained_layer(r=4, alpha=8, rslora=False, bias=True):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 7, bias=bias), r=r, alpha=alpha, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # as after some training: B no longer zero
    return layer


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_the_papers_equation(rslora):
    layer = trained_layer(rslora=rslora)
    x = torch.randn(3, 5, 12)
    W0, b, A, B = layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    expected = x @ W0.T + b + scale * (x @ A.T @ B.T)
    assert A.shape == (4, 12) and B.shape == (7, 4)  # A: r x k, B: d x r
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_init_a_kaiming_uniform_b_zero_so_step0_is_base():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    x = torch.randn(4, 64)
    before = base(x)
    layer = LoRALinear(base, r=8, alpha=16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=sqrt(5): U(-1/sqrt(k), 1/sqrt(k))
    A = layer.lora_A.weight
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound and A.std() > 0.4 * bound
    assert torch.equal(layer(x), before)


def test_dropout_only_on_the_lora_path():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    layer = LoRALinear(base, r=2, alpha=2, dropout=0.5).train()
    x = torch.randn(8, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout on x must not touch the frozen path
    with torch.no_grad():
        layer.lora_B.weight.fill_(1.0)
    outs = {tuple(layer(x).flatten()[:4].tolist()) for _ in range(3)}
    assert len(outs) > 1                    # training: random
    layer.eval()
    assert torch.equal(layer(x), layer(x))  # eval: no dropout


def test_gradients_reach_only_lora_and_the_input():
    layer = trained_layer()
    x = torch.randn(5, 12, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert x.grad is not None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bf16", [False, True])
def test_written_out_gradients_equal_autograd_of_the_equation(bias, dropout, bf16):
    """LoRAFunction's hand-written backward against autograd of eq. 3 in float64, with the same dropout
    mask: dL/dx (through both paths), dL/dA, dL/dB; none for W0 and b. In bf16 autocast, the frozen
    weight held in bf16 as train() holds it, the error is bf16 rounding only."""
    layer = trained_layer(bias=bias)
    layer.adapter.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
    if bf16:
        layer.weight.data = layer.weight.data.bfloat16()
        if bias:
            layer.bias.data = layer.bias.data.bfloat16()
    x = torch.randn(3, 5, 12, requires_grad=True)
    g = torch.randn(3, 5, 7)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = layer(x)
    out.backward(g.to(out.dtype))
    got = [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)
    assert got[1].dtype == got[2].dtype == torch.float32

    assert_equation(layer, layer.weight, x, g, dropout, out, got, tol=2e-2 if bf16 else 1e-6)


def assert_equation(layer, W0, x, g, dropout, out, got, tol):
    """`out` and `got` (dL/dx, dL/dA, dL/dB) against autograd of eq. 3 in float64 over W0, with the same
    dropout mask (seed 1, as the layer's run)."""
    x64 = x.detach().double().requires_grad_()
    W0 = W0.detach().double()
    A, B = (t.detach().double().requires_grad_() for t in (layer.lora_A.weight, layer.lora_B.weight))
    torch.manual_seed(1)
    x_d = F.dropout(x64, dropout) if dropout else x64  # the same mask: same seed, same shape
    expected_out = x64 @ W0.T + layer.scaling * (x_d @ A.T @ B.T)
    if layer.bias is not None:
        expected_out = expected_out + layer.bias.detach().double()
    expected_out.backward(g.double())
    assert (out.double() - expected_out).norm() / expected_out.norm() <= tol
    for name, a, b in zip(("x", "A", "B"), got, (x64.grad, A.grad, B.grad)):
        assert ((a.double() - b).norm() / b.norm()).item() <= tol, name


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("base", ["nf4", "Q4_1"])
def test_lora_over_a_blockwise_base_takes_the_written_out_path_and_equals_the_equation(base, bf16, dropout, bias):
    """Over a quantized base stored in blocks (NF4, ggml's), eager LoRA layers take LoRAFunction too,
    the base's own blockwise products in place of the two with W0: the output and dL/dx, dL/dA, dL/dB
    against autograd of eq. 3 in float64 with W0 the dequantized weight (the same dropout mask)."""
    from minilora.formats.ggml_blocks import Q4_1, Q8_0, quantize_blocks
    from minilora.kernels import LoRAFunction
    from minilora.quant.ggml import GGMLLinear
    from minilora.quant.nf4 import NF4Linear
    torch.manual_seed(0)
    d, k = 48, 128
    linear = nn.Linear(k, d, bias=bias)
    if base == "nf4":
        quantized = NF4Linear.from_linear(linear)
    else:  # Q4_1 blocks: d·q + m, from Q8_0 codes of the weight remapped to 4 bits (any valid blocks do)
        raw = quantize_blocks(linear.weight.detach().reshape(-1, 32), Q8_0)
        q = (raw[:, 2:].view(torch.int8).to(torch.int16) + 128) >> 4  # 0..15
        packed = (q[:, :16] | (q[:, 16:] << 4)).to(torch.uint8)
        scales = torch.tensor([0.01, -0.08], dtype=torch.float16).view(torch.uint8).expand(raw.shape[0], 4)
        quantized = GGMLLinear(k, d, Q4_1, torch.cat([scales, packed], 1).reshape(d, -1),
                               None if not bias else linear.bias.detach().clone())
    layer = LoRALinear(quantized, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    layer.train()
    called = []
    original = LoRAFunction.forward
    x = torch.randn(3, 5, k, requires_grad=True)
    g = torch.randn(3, 5, d)
    torch.manual_seed(1)
    try:
        LoRAFunction.forward = staticmethod(lambda ctx, *a: called.append(a[-1]) or original(ctx, *a))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = layer(x)
    finally:
        LoRAFunction.forward = staticmethod(original)
    assert len(called) == 1 and called[0] is not None  # the blockwise base given to LoRAFunction
    out.backward(g.to(out.dtype))
    got = [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    assert_equation(layer, layer.base_weight(), x, g, dropout, out, got, tol=2e-2 if bf16 else 1e-6)


def test_apply_lora_keeps_every_name_and_freezes_the_rest(saved_tiny):
    _, folder = saved_tiny["llama-gqa"]
    model = load_model(folder)
    names_before = set(model.state_dict())
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(ids)
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    after_names = set(model.state_dict())
    assert names_before <= after_names
    new = after_names - names_before
    assert new == {f"model.layers.{i}.self_attn.{p}_proj.adapters.default.lora_{ab}.weight"
                   for i in range(2) for p in "qv" for ab in "AB"}  # each named adapter side by side
    assert {n for n, p in model.named_parameters() if p.requires_grad} == new
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # step 0 equals the base model


def test_targets_suffix_regex_all_linear(saved_tiny):
    _, folder = saved_tiny["gpt2"]
    m = apply_lora(load_model(folder), ["c_attn"], r=2)
    assert [n for n, x in m.named_modules() if isinstance(x, LoRALinear)] == ["transformer.h.0.attn.c_attn",
                                                                           "transformer.h.1.attn.c_attn"]
    m = apply_lora(load_model(folder), r"transformer\.h\.1\.(attn|mlp)\.c_proj", r=2)
    assert sorted(n for n, x in m.named_modules() if isinstance(x, LoRALinear)) == [
        "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]
    m = apply_lora(load_model(folder), "all-linear", r=2)
    lora = [n for n, x in m.named_modules() if isinstance(x, LoRALinear)]
    assert len(lora) == 8 and "lm_head" not in lora


def test_lora_on_gpt2_fused_c_attn_matches_hand_computation(saved_tiny):
    """LoRA on c_attn adapts q, k and v together: check against the equation on the Conv1D layout."""
    hf, folder = saved_tiny["gpt2"]
    model = apply_lora(load_model(folder), ["c_attn"], r=2, alpha=4)
    attn = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        attn.lora_B.weight.normal_()
    x = torch.randn(2, 3, 32)
    conv = hf.transformer.h[0].attn.c_attn  # HF Conv1D: x @ W + b with W (in, out)
    expected = x @ conv.weight + conv.bias + 2.0 * (x @ attn.lora_A.weight.T @ attn.lora_B.weight.T)
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_merge_whole_model_and_remove_lora(saved_tiny):
    _, folder = saved_tiny["qwen2"]
    model = apply_lora(load_model(folder), "all-linear", r=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        adapted = model(ids)
        merge_lora(model)
        assert torch.allclose(model(ids), adapted, atol=1e-5)
        unmerge_lora(model)
        assert torch.allclose(model(ids), adapted, atol=1e-5)
        plain = remove_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in plain.modules())
        assert not any("lora" in k for k in plain.state_dict())
        assert torch.allclose(plain(ids), adapted, atol=1e-5)


def test_report_numbers_equal_hand_computation():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(1000, 1000, bias=False))
    apply_lora(model, ["proj"], r=2, alpha=4)
    report = param_report(model)
    (row,) = report.rows
    assert (row.d, row.k, row.frozen, row.trainable) == (1000, 1000, 1_000_000, 4_000)
    assert report.trainable == 4_000 and report.total == 1_004_000
    assert "4,000" in str(report) and "1,000,000" in str(report)


def test_report_on_meta_gpt2_medium_from_config_alone():
    from minilora.loading.weights import load_config
    from minilora.models import build_model
    with torch.device("meta"):
        model = build_model(load_config("gpt2-medium"))
    apply_lora(model, ["c_attn"], r=4, alpha=32)
    report = param_report(model)
    assert report.total - report.trainable == 354_823_168  # gpt2-medium's published size
    assert report.trainable == 24 * 4 * (1024 + 3 * 1024) == 393_216
    assert report.rows[0].pattern == "transformer.h.*.attn.c_attn" and report.rows[0].count == 24


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_rank_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="rank r must be a positive integer"):
        apply_lora(nn.Sequential(nn.Linear(2, 2)), ["0"], r=bad)


def test_bad_alpha_and_dropout():
    with pytest.raises(ConfigError, match="alpha"):
        LoRALinear(nn.Linear(2, 2), r=1, alpha=0)
    with pytest.raises(ConfigError, match="dropout"):
        LoRALinear(nn.Linear(2, 2), r=1, alpha=1, dropout=1.0)


def test_target_that_matches_nothing_names_it(saved_tiny):
    _, folder = saved_tiny["llama-gqa"]
    model = load_model(folder)
    with pytest.raises(ConfigError, match=r"'query'.*matches no linear module.*q_proj"):
        apply_lora(model, ["q_proj", "query"])
    with pytest.raises(ConfigError, match=r"'input_layernorm'.*which is RMSNorm, not a linear"):
        apply_lora(model, ["input_layernorm"])
    with pytest.raises(ConfigError, match="regex"):
        apply_lora(model, r"nothing\..*")
    with pytest.raises(ConfigError, match="modules_to_save entry 'heads'"):
        apply_lora(model, ["q_proj"], modules_to_save=["heads"])
    # modules_to_save match as PEFT matches them, by the end of the name, dot or not: "head" is lm_head
    assert apply_lora(remove_lora(model), ["q_proj"], modules_to_save=["head"]).lm_head.weight.requires_grad


def test_apply_lora_keeps_eval_mode():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    apply_lora(model, ["0"], r=2, dropout=0.5)
    assert not model[0].training and not model[0].dropout.training
