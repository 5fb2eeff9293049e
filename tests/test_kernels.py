"""The speed kernels against the plain torch expressions they replace: the fused LM-head loss against
F.cross_entropy over the logits (and float64), frozen weights cast once against autocast's casts,
ShortAttention against float64 attention."""

import pytest
import torch
import torch.nn.functional as F
from conftest import examples, grads, lora_model
from minilora.data.batching import collate
from minilora.kernels import LinearCrossEntropy, frozen_weights_in, prepared_head
from minilora.models.common import attend, attention_mask
from minilora.training.loop import accumulate_gradients
from minilora.training.objectives.causal_lm import causal_lm_loss


@pytest.mark.parametrize("kind", ["gpt2", "gptj", "llama-tied"])
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_head_and_loss_equal_the_plain_ones(saved_tiny, kind, bf16):
    """The fused LM-head cross-entropy against F.cross_entropy over the model's logits (the oracle)."""
    model = lora_model(saved_tiny, kind)
    batch = collate(examples(6), 0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        fused, n = causal_lm_loss(model, batch)
    fused.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    plain = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum")
    plain.backward()
    expected = grads(model)
    tol = 2e-2 if bf16 else 1e-5
    assert n == int((labels != -100).sum())
    assert abs(fused.item() - plain.item()) <= tol * abs(plain.item())
    for name in expected:
        assert ((got[name] - expected[name]).norm() / expected[name].norm()).item() <= (5e-2 if bf16 else 1e-5), name


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa"])
def test_frozen_weights_cast_once_give_the_same_gradients(saved_tiny, kind):
    """frozen_weights_in (bf16 runs) changes where the cast happens, not a bit of the result."""
    model = lora_model(saved_tiny, kind)
    micro = [collate(examples(4, seed=s), 0) for s in range(2)]
    loss, _ = accumulate_gradients(model, micro, bf16=True)
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with frozen_weights_in(model, torch.bfloat16):
        assert model.lm_head.weight.dtype == (torch.float32 if kind == "gpt2" else torch.bfloat16)  # tied: untouched
        again, _ = accumulate_gradients(model, micro, bf16=True)
    got = grads(model)
    assert again == loss and all(torch.equal(got[n], expected[n]) for n in expected)
    assert all(torch.equal(p, before[n]) and p.dtype == before[n].dtype for n, p in model.named_parameters())


@pytest.mark.parametrize("padded", [False, True])
def test_short_attention_against_sdpa_in_float64(padded):
    """bf16 training attention on CPU (ShortAttention): outputs and q/k/v gradients as close to the exact
    (float64) attention of the same bf16 inputs as SDPA's own bf16 kernel is, with grouped-query heads."""
    g = torch.Generator().manual_seed(0)
    B, H, Hk, T, D = 3, 8, 2, 24, 16
    q, k, v = (torch.randn(B, h, T, D, generator=g) * s for h, s in ((H, 1.5), (Hk, 1.5), (Hk, 1.0)))
    dout = torch.randn(B, H, T, D, generator=g)
    pad = torch.ones(B, T, dtype=torch.long)
    pad[1, :5] = 0  # a left-padded row
    mask = attention_mask(pad, T, 0, "cpu") if padded else None

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(dout.to(dtype))
        return [out.detach().double()] + [t.grad.double() for t in leaves], type(out.grad_fn).__name__
    sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    exact, _ = run(sdpa, torch.float64)
    ours, path = run(lambda a, b, c: attend(a, b, c, mask, 0), torch.bfloat16)
    theirs, _ = run(sdpa, torch.bfloat16)
    assert path == "ShortAttentionBackward"
    for mine, sdpa_bf16, ref in zip(ours, theirs, exact):
        err = lambda x: float((x - ref).norm() / ref.norm())
        assert err(mine) <= max(1.5 * err(sdpa_bf16), 4e-3), (err(mine), err(sdpa_bf16))


def head_case(seed, vocab, d, ignore_every):
    """A random head (vocab, d), its bias, 1100 labels with every ignore_every-th ignored, and the generator."""
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(vocab, d, generator=g), torch.randn(vocab, generator=g)
    labels = torch.randint(0, vocab, (1100,), generator=g)
    labels[::ignore_every] = -100
    return weight, bias, labels, g


def check_fused_loss(weight, bias, labels, g, rows=None):
    """LinearCrossEntropy (the head given whole, or as `rows`) against float64 F.cross_entropy(F.linear)."""
    h = torch.randn(labels.shape[0], weight.shape[1], generator=g, dtype=torch.float64)
    h32 = h.float().requires_grad_()
    loss = LinearCrossEntropy.apply(h32, weight, bias, labels, -100, rows)
    loss.backward()
    h64 = h.clone().requires_grad_()
    expected = F.cross_entropy(F.linear(h64, weight.double(), None if bias is None else bias.double()), labels,
                               reduction="sum")
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-6 * abs(expected.item())
    assert ((h32.grad.double() - h64.grad).norm() / h64.grad.norm()).item() <= 1e-5


def test_fused_loss_over_chunks_padding_and_a_changed_head():
    """LinearCrossEntropy against float64 F.cross_entropy(F.linear(...)): several chunks (1100 rows, 512 a
    chunk), a vocabulary padded from 50257 to 50304, a bias, ignored targets; and the head it keeps
    prepared between calls is remade when the weight changes in place or is given new data."""
    vocab, d = 50257, 16
    weight, bias, labels, g = head_case(0, vocab, d, 7)

    def check():
        for b in (bias, None):  # the padding's -inf comes with the bias, or is written into the logits
            check_fused_loss(weight, b, labels, g)

    check()
    w, b = prepared_head(weight, bias, torch.float32, 512)[:2]
    assert w.shape == (50304, d) and torch.isinf(b[vocab:]).all() and torch.equal(w[:vocab], weight)
    assert prepared_head(weight, bias, torch.float32, 100)[0] is w  # another batch size: the same kept copy
    assert prepared_head(weight, None, torch.float32, 512)[1] is None
    with torch.no_grad():
        weight.mul_(0.5)  # in place: the kept copy must follow
    check()
    weight.data = torch.randn(vocab, d, generator=g)  # new data, same Parameter-like tensor
    check()


def test_fused_loss_over_a_head_given_by_blocks_of_rows():
    """A quantized head comes as rows(r0, r1, dtype, out): the loss and its gradient equal float64
    F.cross_entropy over the whole weight, with several token chunks, ignored targets and a bias; the
    head is asked for whole blocks of rows only, never all of them at once, each written into the one
    buffer the loss hands it (reused, not allocated per block)."""
    vocab = 50001
    weight, bias, labels, g = head_case(1, vocab, 48, 5)
    asked, buffers = [], set()

    def rows(r0, r1, dtype, out):
        asked.append(r1 - r0)
        assert out.shape == (r1 - r0, weight.shape[1]) and out.dtype == dtype
        buffers.add(out.untyped_storage().data_ptr())
        return out.copy_(weight[r0:r1])
    for b in (None, bias):
        check_fused_loss(weight, b, labels, g, rows)
    assert max(asked) < vocab and sum(asked) == 2 * 2 * 3 * vocab  # 2 calls x 3 chunks x (logits, gradient)
    assert len(buffers) == 1  # the same buffer for every block, chunk and call


def test_scratch_buffers_are_reused_per_name_dtype_and_thread():
    """hardware.scratch: the same memory each time a thread asks for a name in a dtype (grown when asked
    for more), other memory for another name, dtype or thread; a new tensor off the CPU."""
    import threading

    from minilora.hardware import scratch
    a = scratch("test.a", 100, torch.float32, torch.device("cpu"))
    assert a.shape == (100,) and scratch("test.a", 60, torch.float32, "cpu").data_ptr() == a.data_ptr()
    assert scratch("test.b", 100, torch.float32, "cpu").data_ptr() != a.data_ptr()
    assert scratch("test.a", 100, torch.bfloat16, "cpu").data_ptr() != a.data_ptr()
    grown = scratch("test.a", 1000, torch.float32, "cpu")
    assert grown.shape == (1000,) and scratch("test.a", 10, torch.float32, "cpu").data_ptr() == grown.data_ptr()
    other = []
    thread = threading.Thread(target=lambda: other.append(scratch("test.a", 10, torch.float32, "cpu").data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != grown.data_ptr()
    meta = scratch("test.a", 10, torch.float32, torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == (10,)
