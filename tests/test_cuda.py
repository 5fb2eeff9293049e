"""The same code on CUDA (skipped where torch sees no GPU): models, LoRA's written-out backward, int8
products, the fused head loss and a training run give on the GPU what the CPU (or float64) gives."""

import pytest
import torch
import torch.nn.functional as F
from conftest import Tok, examples, lora_model
from minilora.data.batching import collate
from minilora.generate import generate_ids
from minilora.kernels import LinearCrossEntropy
from minilora.loading.weights import load_model
from minilora.lora.layers import LoRALinear
from minilora.quant.int8 import Int8Linear, int8_matmul, quantize_rows
from minilora.training.loop import TrainConfig, accumulate_gradients, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """Compare fp32 with fp32: no TF32 in matmuls or convolutions during these tests."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa", "gptj", "distilbert"])
def test_logits_on_cuda_equal_transformers_on_cuda(saved_tiny, kind):
    hf, folder = saved_tiny[kind]
    ours = load_model(folder, device="cuda")
    assert all(p.device.type == "cuda" for p in ours.parameters())
    ids = torch.randint(0, 97, (3, 11), device=CUDA)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = hf.to(CUDA)(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    hf.to("cpu")
    keep = mask.bool() if got.dim() == 3 else slice(None)
    assert (got[keep] - expected[keep]).abs().max().item() <= 1e-4


def test_greedy_generation_on_cuda_equals_cpu(saved_tiny):
    _, folder = saved_tiny["llama-gqa"]
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    cpu = generate_ids(load_model(folder), prompts, [1], 0, max_new_tokens=8)
    assert generate_ids(load_model(folder, device="cuda"), prompts, [1], 0, max_new_tokens=8) == cpu


@pytest.mark.parametrize("bf16", [False, True])
def test_lora_backward_on_cuda_equals_float64(bf16):
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48).to(CUDA)
    layer = LoRALinear(base, r=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(2, 5, 64, device=CUDA, requires_grad=True)
    g = torch.randn(2, 5, 48, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = layer(x)
    out.backward(g.to(out.dtype))
    x64 = x.detach().double().requires_grad_()
    W0, b, A, B = (t.detach().double().requires_grad_() for t in
                   (layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight))
    expected = x64 @ W0.T + b + layer.scaling * (x64 @ A.T @ B.T)
    expected.backward(g.double())
    tol = 2e-2 if bf16 else 1e-5
    assert ((out.double() - expected).norm() / expected.norm()).item() <= tol
    for got, ref in ((x.grad, x64.grad), (layer.lora_A.weight.grad, A.grad), (layer.lora_B.weight.grad, B.grad)):
        assert ((got.double() - ref).norm() / ref.norm()).item() <= tol
    assert layer.weight.grad is None


@pytest.mark.parametrize("rows", [8, 64])  # cuBLASLt's int8 product wants more than 16 rows; fewer take the float path
def test_int8_products_on_cuda_are_the_exact_integers(rows):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (rows, 512), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (512, 96), generator=g, dtype=torch.int8)
    expected = a.long() @ b.long()
    assert torch.equal(int8_matmul(a.to(CUDA), b.to(CUDA)).cpu().long(), expected)


def test_int8_linear_on_cuda_equals_cpu():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(40, 256)
    x[:, 3] *= 20  # an outlier column (LLM.int8() keeps it in floating point)
    cpu = Int8Linear.from_linear(linear)
    q, _ = quantize_rows(linear.weight.detach())
    cuda = Int8Linear.from_linear(linear.to(CUDA))
    assert torch.equal(cuda.weight.cpu(), q)
    with torch.no_grad():
        assert torch.allclose(cuda(x.to(CUDA)).cpu(), cpu(x), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_head_loss_on_cuda_equals_cross_entropy(bf16):
    g = torch.Generator(device=CUDA).manual_seed(0)
    weight = torch.randn(1000, 32, device=CUDA, generator=g)
    h = torch.randn(700, 32, device=CUDA, generator=g, requires_grad=True)
    labels = torch.randint(0, 1000, (700,), device=CUDA, generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = LinearCrossEntropy.apply(h, weight, None, labels)
    loss.backward()
    h64 = h.detach().double().requires_grad_()
    expected = F.cross_entropy(h64 @ weight.double().T, labels, reduction="sum")
    expected.backward()
    tol = 2e-2 if bf16 else 1e-5
    assert abs(loss.item() - expected.item()) <= tol * abs(expected.item())
    assert ((h.grad.double() - h64.grad).norm() / h64.grad.norm()).item() <= tol


@pytest.mark.parametrize("bf16", [False, "auto"])
def test_training_on_cuda_lowers_the_loss_and_the_adapter_loads_on_cpu(saved_tiny, tmp_path, bf16):
    model = lora_model(saved_tiny).to(CUDA)
    data = examples(16)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=8, micro_batch_size=8, lr=2e-2, bf16=bf16, progress=False)
    result = train(model, Tok, data, None, cfg)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert not result.stopped_early and losses[-1] < losses[0]
    from minilora.lora.peft_files import load_adapter
    cpu = load_adapter(load_model(saved_tiny["llama-gqa"][1]), result.adapter_dir)
    batch = collate(data[:4], 0)
    with torch.no_grad():
        on_cuda = model(batch["input_ids"].to(CUDA), attention_mask=batch["attention_mask"].to(CUDA)).cpu()
        on_cpu = cpu(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert (on_cuda - on_cpu).abs().max().item() <= 1e-4
    model.zero_grad(set_to_none=True)
    loss, n = accumulate_gradients(model, [{k: v.to(CUDA) for k, v in batch.items()}])
    assert n > 0 and all(p.grad.device.type == "cuda" for p in model.parameters() if p.grad is not None)


def test_more_processes_than_gpus_is_a_named_error(monkeypatch):
    """torchrun with more processes than GPUs: each rank wants GPU LOCAL_RANK; refused before any work."""
    from minilora.errors import ConfigError
    from minilora.training import distributed
    n = torch.cuda.device_count()
    monkeypatch.setenv("WORLD_SIZE", str(n + 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(n + 1))
    monkeypatch.setenv("LOCAL_RANK", str(n))
    with pytest.raises(ConfigError, match=rf"torchrun started {n + 1} processes on this machine but it has {n} GPU\(s\)"):
        distributed.init_from_env(CUDA)
    assert not torch.distributed.is_initialized()


def test_the_same_seed_gives_the_same_lora_init_on_cuda_and_cpu():
    """A is drawn from the CPU's RNG whatever the device, so a seeded run starts from the same adapter."""
    layers = {}
    for device in ("cpu", "cuda"):
        base = torch.nn.Linear(64, 32).to(device)
        torch.manual_seed(0)
        layers[device] = LoRALinear(base, r=4, alpha=8)
    assert layers["cuda"].lora_A.weight.device.type == "cuda"
    assert torch.equal(layers["cuda"].lora_A.weight.cpu(), layers["cpu"].lora_A.weight)


def test_dora_embeddings_and_named_adapters_on_cuda_equal_cpu(saved_tiny):
    """DoRA, LoRA on embeddings and a switch between named adapters: the same numbers on the GPU, and the
    gradients too; an adapter stored while the model moved comes back on the model's device."""
    from minilora.lora.adapters import add_adapter, set_adapter
    from minilora.lora.config import LoRAConfig
    from minilora.lora.inject import apply_lora
    _, folder = saved_tiny["llama-gqa"]
    ids = torch.randint(0, 97, (2, 9))
    outs = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = apply_lora(load_model(folder), LoRAConfig(["q_proj", "v_proj"], r=4, alpha=8, use_dora=True))
        add_adapter(model, "emb", LoRAConfig(["embed_tokens", "o_proj"], r=2, alpha=4))
        for name in ("emb", "default"):
            set_adapter(model, name)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        model.to(device)
        set_adapter(model, "emb")  # stored on the CPU, back on the model's device
        emb = model(ids.to(device)).float().cpu()
        set_adapter(model, "default")
        out = model(ids.to(device))
        out.square().mean().backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
        outs[device] = (emb, out.detach().cpu(), grads)
    for a, b in zip(outs["cpu"][:2], outs["cuda"][:2]):
        assert (a - b).abs().max().item() <= 1e-4
    assert outs["cpu"][2].keys() == outs["cuda"][2].keys() and any("magnitude" in n for n in outs["cpu"][2])
    for n, g in outs["cpu"][2].items():
        assert (g - outs["cuda"][2][n]).abs().max().item() <= 1e-4, n


def test_nf4_and_ggml_layers_on_cuda_equal_cpu():
    """The 4-bit layers' dequantization and blockwise products on the GPU: the CPU's numbers."""
    import numpy as np
    from minilora.formats import ggml_blocks as ggml
    from minilora.quant.ggml import GGMLLinear
    from minilora.quant.nf4 import NF4Linear
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 96)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(96 * 2, 144), dtype=np.uint8)
    raw[:, 0:4] = (rng.standard_normal((96 * 2, 2)) * 0.01).astype(np.float16).view(np.uint8)
    layers = {"nf4": NF4Linear.from_linear(linear),
              "q4_k": GGMLLinear(512, 96, ggml.Q4_K, torch.from_numpy(raw), torch.randn(96))}
    x = torch.randn(3, 7, 512)
    for name, layer in layers.items():
        outs = []
        for device in ("cpu", "cuda"):
            layer = layer.to(device)
            xi = x.detach().to(device).requires_grad_(True)  # a leaf on each device
            y = layer(xi)
            y.square().sum().backward()
            outs.append((y.detach().cpu(), xi.grad.cpu(), layer.dequantize().cpu()))
        for a, b in zip(*outs):
            assert (a - b).abs().max().item() <= 1e-4 * (1 + a.abs().max().item()), name


def test_packed_rows_on_cuda_give_the_unpacked_loss_and_gradients(saved_tiny):
    """Packing's per-example attention mask and restarted positions on the GPU: the loss and the LoRA
    gradients of the same examples one per row (also on the GPU)."""
    from minilora.data.batching import pack
    from minilora.training.objectives.causal_lm import causal_lm_loss
    data = examples(n=12, seed=1)
    sums = []
    for batch in (collate(data, pad_id=0), collate(pack(data, 32), pad_id=0)):
        model = lora_model(saved_tiny).to(CUDA)
        loss, count = causal_lm_loss(model, {k: v.to(CUDA) for k, v in batch.items()})
        loss.backward()
        sums.append((loss.item(), count, {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}))
    (a, n_a, g_a), (b, n_b, g_b) = sums
    assert n_a == n_b and abs(a - b) <= 1e-5 * abs(a)
    assert g_a.keys() == g_b.keys() and all(torch.allclose(g_a[k], g_b[k], rtol=1e-4, atol=1e-6) for k in g_a)


def test_kept_gguf_embedding_and_quantized_head_on_cuda_equal_the_dequantized_model(tmp_path):
    """A GGUF kept in its blocks (Q4_K layers, a Q8_0 embedding and the head tied to it) on the GPU: the
    logits of the CPU, and the fused head loss and LoRA gradients of the dequantized model on the GPU.
    (Not the CPU's gradients: this random model's logits run to the hundreds, and its fp32 gradients differ
    from float64's by 35% on either device; kept and dequantized do the same arithmetic, so they agree.)"""
    pytest.importorskip("gguf")
    from minilora.formats import ggml_blocks as ggml
    from minilora.lora.inject import apply_lora
    from minilora.quant.ggml import GGMLLinear
    from minilora.training.objectives.causal_lm import causal_lm_loss
    from test_ggml import write_kquant_gguf
    path = write_kquant_gguf(tmp_path / "e.gguf", [ggml.Q4_K], embedding=ggml.Q8_0)
    ids = torch.randint(0, 97, (3, 11))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {k: v.to(CUDA) for k, v in
             {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()}
    with torch.no_grad():
        on_cpu = load_model(path, keep_quantized=True)(ids)
    outs = []
    for kept in (True, False):
        model = load_model(path, keep_quantized=kept, device=CUDA)
        assert isinstance(model.lm_head, GGMLLinear) == kept and model.lm_head.weight.is_cuda
        with torch.no_grad():
            logits = model(ids.to(CUDA)).cpu()
        assert (logits - on_cpu).abs().max().item() <= 1e-4 * (1 + on_cpu.abs().max().item())
        torch.manual_seed(0)
        apply_lora(model, ["v_proj", "down_proj"], r=4, alpha=8)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        loss, _ = causal_lm_loss(model, batch)
        loss.backward()
        outs.append((loss.item(), torch.cat([p.grad.flatten().cpu() for p in model.parameters() if p.requires_grad])))
    (loss_kept, g_kept), (loss_dense, g_dense) = outs
    assert abs(loss_kept - loss_dense) <= 1e-5 * abs(loss_dense)
    assert ((g_kept - g_dense).norm() / g_dense.norm()).item() <= 1e-4


def test_inspect_on_cuda_equals_cpu(saved_tiny):
    """The section-7 measurements of a model on the GPU: the CPU's (both in float64)."""
    from minilora.lora.analysis import inspect
    model = lora_model(saved_tiny, targets=["q_proj", "v_proj"])
    cpu = inspect(model, with_base=True)
    gpu = inspect(model.to(CUDA), with_base=True)
    assert cpu.keys() == gpu.keys() and len(cpu) == 4
    for name, row in cpu.items():
        for key, value in row.items():
            assert abs(value - gpu[name][key]) <= 1e-9 * (1 + abs(value)), (name, key)


def test_inspect_adapter_over_a_base_on_cuda_equals_cpu(saved_tiny, tmp_path):
    """The adapter's files on the CPU, the base model on the GPU: the CPU base's figures."""
    from minilora.lora.analysis import inspect_adapter
    from minilora.lora.peft_files import save_adapter
    save_adapter(lora_model(saved_tiny, targets=["q_proj", "v_proj"]), tmp_path / "a")
    folder = saved_tiny["llama-gqa"][1]
    cpu = inspect_adapter(tmp_path / "a", load_model(folder))
    gpu = inspect_adapter(tmp_path / "a", load_model(folder, device="cuda"))
    for name, row in cpu["modules"].items():
        assert gpu["modules"][name] == pytest.approx(row, rel=1e-9, abs=1e-12), name


def test_offloaded_activations_give_the_same_gradients_in_less_gpu_memory(saved_tiny):
    """offload_activations: the tensors the forward saves wait in CPU memory (save_on_cpu), so the GPU's peak
    falls, and the loss and the LoRA gradients are the very same."""
    from minilora.training.gradients import accumulate
    from minilora.training.objectives import as_objective
    model = lora_model(saved_tiny).to(CUDA)
    batch = {k: v.to(CUDA) for k, v in collate(examples(16), 0).items()}
    results = []
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss, _, _ = accumulate(model, [batch], as_objective(None), offload=offload)
        torch.cuda.synchronize()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((loss, grads, torch.cuda.max_memory_allocated() - start))
    (plain, g0, peak0), (off, g1, peak1) = results
    assert off == plain and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert peak1 < peak0, (peak0, peak1)
