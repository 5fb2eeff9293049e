"""Int8Linear against the fp32 layer it replaces, LLM.int8()'s outlier decomposition, quantizing while
loading, and LoRA trained on an 8-bit base."""

import os

import pytest
import torch
import torch.nn as nn
from conftest import load_peak
from minilora.errors import ConfigError
from minilora.loading.weights import load_model
from minilora.lora.inject import apply_lora
from minilora.lora.layers import LoRALinear
from minilora.lora.report import param_report
from minilora.quant.int8 import (
    Int8Linear,
    int8_matmul,
    int8_matmul_in_float,
    quantize_model,
    quantize_rows,
)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def layer(k=512, d=384, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, d)


def test_quantize_rows_is_absmax_per_row():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [127.0, 1.0, -0.4]])
    q, s = quantize_rows(w)
    assert s.tolist() == pytest.approx([2 / 127, 1.0, 1.0])
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0] and q[2].tolist() == [127, 1, 0]


def test_int8_products_are_the_exact_integers():
    # oracle: the int64 product. K = 3001 with rows and columns of +-127: sums reach 127² · 3001, an odd
    # number beyond 2^24 that no fp32 holds, so one fp32 product without the 1024-wide blocks is off.
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (40, 3001), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (3001, 24), dtype=torch.int8, generator=g)
    a[0], a[1], b[:, 0] = 127, -127, 127
    exact = a.long() @ b.long()
    assert int(exact.abs().max()) > 2 ** 24 and not torch.equal((a.float() @ b.float()).long(), exact)
    assert torch.equal(int8_matmul_in_float(a, b).long(), exact)
    assert torch.equal(int8_matmul(a, b).long(), exact)  # whichever kernel this machine gets
    assert torch.equal(int8_matmul(a[:, :1000], b[:1000].t().contiguous().t()).long(), a[:, :1000].long() @ b[:1000].long())
    assert int8_matmul_in_float(a[:, :0], b[:0]).shape == (40, 24)


def test_int8_output_close_to_fp32():
    fp = layer()
    q = Int8Linear.from_linear(fp, threshold=0.0)
    assert q.weight.dtype == torch.int8 and q.weight.shape == fp.weight.shape
    x = torch.randn(4, 33, 512)
    assert rel(q(x), fp(x)) <= 1e-2


def test_outlier_decomposition_rescues_planted_outliers():
    fp = layer(seed=1)
    x = torch.randn(64, 512)
    x[:, [3, 100, 377]] *= 50  # a few huge feature columns, as LLM.int8() found in large models
    plain = Int8Linear.from_linear(fp, threshold=0.0)
    decomposed = Int8Linear.from_linear(fp, threshold=6.0)
    assert rel(plain(x), fp(x)) > 1e-2
    assert rel(decomposed(x), fp(x)) <= 1e-2


def test_input_gradient_matches_the_dequantized_layer():
    fp = layer(seed=2)
    q = Int8Linear.from_linear(fp, threshold=6.0)
    deq = nn.Linear(512, 384)
    with torch.no_grad():
        deq.weight.copy_(q.dequantize())
        deq.bias.copy_(fp.bias)
    x1 = torch.randn(8, 16, 512, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    upstream = torch.randn(8, 16, 384)
    (q(x1) * upstream).sum().backward()
    (deq(x2) * upstream).sum().backward()
    assert rel(x1.grad, x2.grad) <= 1e-2
    assert q.weight.grad is None and not q.weight.requires_grad


def test_bf16_autocast_gives_bf16_like_linear():
    q = Int8Linear.from_linear(layer())
    x = torch.randn(4, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16 and rel(y, q(x)) < 1e-2


def test_lora_on_int8_is_the_equation_and_trains_only_lora():
    fp = layer(seed=3)
    q = Int8Linear.from_linear(fp)
    model = nn.Sequential()
    model.add_module("proj", q)
    apply_lora(model, ["proj"], r=4, alpha=8)
    lora = model.proj
    assert isinstance(lora, LoRALinear) and lora.weight is q.weight
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(10, 512, requires_grad=True)
    expected = q(x) + 2.0 * lora.lora_B(lora.lora_A(x))
    out = lora(x)
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    assert lora.lora_A.weight.grad is not None and lora.weight.grad is None and x.grad is not None
    report = param_report(model)
    assert report.rows[0].frozen == 512 * 384  # logical elements, not bytes
    with pytest.raises(ConfigError, match="cannot merge into a quantized \\(int8 or 4-bit\\) base"):
        lora.merge()
    assert set(model.state_dict()) == {"proj.weight", "proj.bias", "proj.adapters.default.lora_A.weight",
                                       "proj.adapters.default.lora_B.weight"}


@pytest.mark.parametrize("kind", ["gptj", "llama-gqa"])
def test_quantize_on_load_equals_quantize_after_load(saved_tiny, kind):
    _, folder = saved_tiny[kind]
    on_load = load_model(folder, load_in_8bit=True)
    after = quantize_model(load_model(folder))
    assert sum(isinstance(m, Int8Linear) for m in on_load.modules()) > 0
    assert not isinstance(on_load.lm_head, Int8Linear)  # the output head stays in floating point
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        a, b, fp = on_load(ids), after(ids), load_model(folder)(ids)
    assert torch.equal(a, b)
    assert rel(a, fp) < 2e-2


@pytest.mark.parametrize("base, dora", [(dict(load_in_8bit=True), False), (dict(load_in_4bit=True), True)],
                         ids=["int8", "nf4-dora"])
def test_adapter_trained_on_a_quantized_base_saves_and_loads(saved_tiny, tmp_path, base, dora):
    from minilora.lora.peft_files import load_adapter, save_adapter
    _, folder = saved_tiny["gptj"]
    model = apply_lora(load_model(folder, **base), ["q_proj", "v_proj"], r=4, alpha=8, use_dora=dora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = model(ids)
    save_adapter(model, tmp_path / "a")
    again = load_adapter(load_model(folder, **base), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(ids), expected)


def test_save_model_refuses_an_int8_model_and_writes_nothing(saved_tiny, tmp_path):
    """An int8-loaded model's weights are not the checkpoint's any more (and transformers could not read
    them back): saving it as a checkpoint is refused by name, and the folder is not created."""
    from minilora.errors import CheckpointError
    from minilora.loading.weights import save_model
    _, folder = saved_tiny["llama-gqa"]
    with pytest.raises(CheckpointError, match=r"cannot save a quantized model as a checkpoint "
                                              r"\(model\.layers\.0\.self_attn\.q_proj\.weight is torch\.int8, 14 such weights\)"):
        save_model(load_model(folder, load_in_8bit=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_model(load_model(folder), tmp_path / "out")  # the float model saves
    assert torch.equal(load_model(tmp_path / "out")(torch.tensor([[1, 2, 3]])), load_model(folder)(torch.tensor([[1, 2, 3]])))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_8bit_load_peaks_well_under_the_fp32_size(tmp_path):
    """A 64M-parameter fp32 checkpoint (256 MB): loading it in 8-bit must never hold it in fp32."""
    size, base, peak = load_peak(tmp_path, n_layer=5, forward=True, load_in_8bit=True)
    print(f"8-bit load: peak {(peak - base) / 1e6:.0f} MB over baseline for a {size / 1e6:.0f} MB fp32 checkpoint")
    assert peak - base < 0.5 * size


@pytest.mark.parametrize("bits, dtype", [("8", torch.int8), ("4", torch.uint8)], ids=["int8", "nf4"])
def test_short_lora_run_on_a_quantized_smollm2_lowers_the_loss_on_real_alpaca(smollm2_path, alpaca_path, tmp_path,
                                                                                bits, dtype):
    """LoRA on the real model with an int8 base, and QLoRA (the same recipe with load_in_4bit)."""

    from minilora.recipe import RECIPES, load_recipe, run_recipe
    recipe = load_recipe(RECIPES / "alpaca_smollm2_8bit.toml", overrides={
        "model.name": str(smollm2_path), "model.load_in_8bit": str(bits == "8").lower(),
        "model.load_in_4bit": str(bits == "4").lower(), "data.train": str(alpaca_path), "data.limit": "48",
        "data.val_size": "24", "data.cutoff": "128", "train.output_dir": str(tmp_path), "train.batch_size": "8",
        "train.micro_batch_size": "4", "train.max_steps": "6", "train.warmup_steps": "1", "train.lr": "2e-3",
        "train.eval_every": "6", "train.eval_at_start": "true", "train.progress": "false"})
    model, tok, result = run_recipe(recipe)
    assert not result.stopped_early and result.adapter_dir is not None
    assert sum(isinstance(m.weight, torch.Tensor) and m.weight.dtype == dtype for m in model.modules()
               if hasattr(m, "weight")) == 30 * 7  # every linear of the 30 blocks is quantized
    evals = [h["eval_loss"] for h in result.history if "eval_loss" in h]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.05, evals
    assert all(p.dtype == dtype and p.grad is None for n, p in model.named_parameters() if n.endswith("proj.weight"))
