"""Property-based tests (hypothesis) over random shapes, ranks and dtypes: merge/unmerge round trips,
int8 error bounds, adapter save/load round trips."""

import math
import tempfile

import pytest
import torch
import torch.nn as nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st
from minilora.lora.inject import apply_lora  # noqa: E402
from minilora.lora.layers import LoRALinear  # noqa: E402
from minilora.lora.peft_files import load_adapter, save_adapter  # noqa: E402
from minilora.quant.int8 import Int8Linear  # noqa: E402

dims = st.integers(min_value=1, max_value=96)
FAST = settings(max_examples=40, deadline=None)


@FAST
@given(k=dims, d=dims, r=st.integers(1, 16), alpha=st.floats(0.5, 64), rslora=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_merge_unmerge_round_trip(k, d, r, alpha, rslora, dtype, seed):
    """The forward is eq. 3; merge() makes W = W0 + scale·B·A with the same outputs, survives mode
    switches (never a side effect of .eval()/.train()), and unmerge() gives back W0 and the outputs."""
    torch.manual_seed(seed)
    r = min(r, k, d)  # a rank above min(d, k) is refused (B·A cannot have it)
    layer = LoRALinear(nn.Linear(k, d, dtype=dtype), r=r, alpha=alpha, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    w0, x = layer.weight.detach().clone(), torch.randn(5, k, dtype=dtype)
    before = layer(x)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    assert torch.allclose(before, x @ w0.T + layer.bias + scale * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T),
                          atol=1e-4 * (1 + before.abs().max().item()))
    delta = scale * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    layer.merge()
    tol = (1e-4 if dtype == torch.float32 else 1e-10) * (1 + before.abs().max().item())
    assert layer.merged and torch.allclose(layer(x), before, atol=tol)
    eps = 1e-7 if dtype == torch.float32 else 1e-15  # rounding, relative to the largest weight or output
    w_scale, out_scale = 1 + (w0 + delta).abs().max().item(), 1 + before.abs().max().item()
    assert torch.allclose(layer.weight, w0 + delta, atol=20 * eps * w_scale)
    layer.eval()
    layer.train()
    assert layer.merged
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.weight, w0, atol=min(tol, 3 * eps * w_scale))
    assert torch.allclose(layer(x), before, atol=min(tol, 5 * eps * out_scale))


@FAST
@given(k=st.integers(16, 256), d=dims, rows=st.integers(1, 40), seed=st.integers(0, 2**16),
       outliers=st.booleans())
def test_int8_error_bound(k, d, rows, seed, outliers):
    """Per-row absmax int8 of weight and activation: each output is off by at most what the two
    roundings allow, |dy_i| <= s_x/2 sum_j |W_ij| + s_w,i/2 sum_j |x_j| + k s_x s_w,i / 4."""
    torch.manual_seed(seed)
    fp = nn.Linear(k, d)
    x = torch.randn(rows, k)
    if outliers:
        x[:, 0] *= 50
    q = Int8Linear.from_linear(fp, threshold=6.0 if outliers else 0.0)
    y, ref = q(x), fp(x)
    sw = q.weight_scale[None, :]                             # (1, d)
    xa = x.clone()
    if outliers:
        xa[:, (x.abs() > 6.0).any(0)] = 0                    # those columns go through floating point
    sx = (xa.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)  # (rows, 1)
    w = fp.weight.detach()
    # x W - (x - e_x)(W - e_w) = e_x W + x e_w - e_x e_w, with |e_x| <= s_x/2 and |e_w| <= s_w/2
    bound = sx / 2 * w.abs().sum(1)[None] + sw / 2 * x.abs().sum(1, keepdim=True) + k * sx * sw / 4
    assert ((y - ref).abs() <= bound + 1e-4).all()


@settings(max_examples=10, deadline=None)
@given(r=st.integers(1, 8), alpha=st.floats(1, 32), targets=st.sampled_from([["0"], ["2"], ["0", "2"]]),
       seed=st.integers(0, 2**16))
def test_adapter_save_load_round_trip(r, alpha, targets, seed):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    model = apply_lora(nn.Sequential(*[m for m in base]), targets, r=r, alpha=alpha)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_()
    x = torch.randn(3, 12)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp + "/a")
        fresh = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
        load_adapter(fresh, tmp + "/a")
    assert torch.equal(fresh(x), model(x))
