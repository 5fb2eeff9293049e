"""Speed without new math: each kernel here computes what a plain torch expression computes, in fewer
passes or copies, and is tested against that expression.

  LoRAFunction         a LoRA layer's W0 x + b + s·B A x with its backward written out (LoRALinear's fast path)
  LinearCrossEntropy   sum of cross-entropies of a frozen LM head's logits, a chunk of rows at a time
  frozen_weights_in    frozen linear weights cast to bf16 once per run, not once per micro-batch
  ShortAttention       attention for bf16 training on CPU with short sequences
  row_blocks           the row ranges a blockwise-stored weight is rebuilt in (quant/blockwise.py)
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn as nn

from .hardware import scratch

HEAD_ROWS_MULTIPLE = 64  # the head's rows (vocab) are padded to this: GPT-2's 50257 rows multiply up to


_prepared_heads: dict[int, list] = {}  # id(weight) -> entry, dropped when the weight is freed


def prepared_head(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, rows: int):
    """What LinearCrossEntropy needs of a frozen head (vocab, d), made once and kept while the weight
    lives and is not changed (in place or by a new .data): the weight in `dtype` with its rows padded;
    the bias, if any, in fp32 and -inf on the padding; and logits buffers of at least `rows` rows of
    the padded vocab, in fp32 and, for bf16/fp16, in that dtype too. Reused rather than allocated per
    chunk, because a fresh buffer of this size (100 MB for GPT-2 at 512 rows) comes from the OS page
    by page, zeroed, every time. A larger `rows` grows the buffers only."""
    stamp = tuple((t.data_ptr(), t.dtype, t._version) for t in (weight, bias) if t is not None) + (dtype,)
    entry = _prepared_heads.get(id(weight))
    if entry is None:
        weakref.finalize(weight, _prepared_heads.pop, id(weight), None)
    vocab, d = weight.shape
    padded = -(-vocab // HEAD_ROWS_MULTIPLE) * HEAD_ROWS_MULTIPLE
    if entry is None or entry[0] != stamp:
        _prepared_heads.pop(id(weight), None)  # free the old copies before making new ones
        with torch.no_grad():
            w = weight.to(dtype) if padded == vocab else \
                torch.cat([weight.to(dtype), weight.new_zeros(padded - vocab, d, dtype=dtype)])
            b = None if bias is None else torch.cat([bias.float(), bias.new_full((padded - vocab,), float("-inf"),
                                                                                 dtype=torch.float32)])
        entry = [stamp, w, b, None, None]
        _prepared_heads[id(weight)] = entry
    return (entry[1], entry[2], *_logits_buffers(entry, rows, padded, dtype, weight.device))


def logits_buffers(weight: torch.Tensor, dtype: torch.dtype, rows: int, vocab: int):
    """prepared_head's logits buffers alone, kept the same way, for a head read by rows (a quantized
    one, whose float rows are rebuilt at each use)."""
    entry = _prepared_heads.get(id(weight))
    if entry is None:
        weakref.finalize(weight, _prepared_heads.pop, id(weight), None)
        entry = _prepared_heads[id(weight)] = [None] * 5
    return _logits_buffers(entry, rows, vocab, dtype, weight.device)


def _logits_buffers(entry: list, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
    low_dtype = None if dtype == torch.float32 else dtype
    if entry[3] is None or entry[3].shape[0] < rows or entry[3].shape[1] != cols \
            or (None if entry[4] is None else entry[4].dtype) != low_dtype:
        entry[3:] = None, None  # free before allocating
        entry[3] = torch.empty(rows, cols, dtype=torch.float32, device=device)
        entry[4] = None if low_dtype is None else torch.empty(rows, cols, dtype=dtype, device=device)
    return entry[3], entry[4]


def release_prepared_head(weight: torch.Tensor) -> None:
    """Drop the cast or padded copy prepared_head keeps of `weight` (its logits buffers stay): for a
    weight whole only while it is used (FSDP gathers it), which the copy would otherwise keep whole."""
    entry = _prepared_heads.get(id(weight))
    if entry is not None:
        entry[:3] = None, None, None


class LinearCrossEntropy(torch.autograd.Function):
    """sum_t CE(h_t W^T + b, y_t) for a frozen W (vocab, d), a chunk of tokens at a time; targets equal
    to `ignore_index` count for nothing, as in F.cross_entropy.

    Forward computes, per chunk, the logits, their log-softmax, the loss, and at once the gradient
    with respect to h: (softmax - onehot(y)) W. Backward only scales that stored (N, d) gradient.
    The same arithmetic as F.cross_entropy(F.linear(h, W, b)) in fewer passes over the logits.

    A quantized head (a GGUF embedding it is tied to) comes as `rows`, its float rows r0..r1 rebuilt
    on demand (`weight` is then its raw storage, for autograd only): each chunk's logits and gradient
    are made a block of vocabulary rows at a time, so no float copy of the head ever exists."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                ignore_index: int = -100, rows=None):
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        vocab = weight.shape[0]
        chunk = max(512, (1 << 23) // vocab)  # 8M logits (32 MB in fp32) at a time, or 512 rows:
        # fewer rows than that make the matmuls slower (256 rows: -10% at 32000 x 768 here)
        all_valid = bool((labels != ignore_index).all())  # once: a check per chunk would wait for the GPU each time
        if rows is None:
            w, b, logits_buffer, low_buffer = prepared_head(weight, bias, dtype, min(chunk, h.shape[0]))
        else:  # the buffers are kept as for a float head; the rows are rebuilt into one reused buffer
            w, b, logits_buffer, low_buffer = None, None if bias is None else bias.float(), \
                *logits_buffers(weight, dtype, min(chunk, h.shape[0]), vocab)
            blocks, k = row_blocks(vocab, h.shape[1], 1), h.shape[1]
            block = scratch("head.rows", (blocks[0][1] - blocks[0][0]) * k, dtype, h.device)
            head_rows = lambda v0, v1: rows(v0, v1, dtype, block[:(v1 - v0) * k].view(v1 - v0, k))  # noqa: E731
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.shape[0], chunk):
                y = labels[i:i + chunk]
                logp = logits_buffer[:len(y)]
                low = logp if low_buffer is None else low_buffer[:len(y)]
                if rows is not None:  # (c, vocab) logits, a block of the head's rows at a time
                    hc = h[i:i + chunk].to(dtype)
                    for v0, v1 in blocks:
                        torch.mm(hc, head_rows(v0, v1).t(), out=low[:, v0:v1])
                else:
                    torch.mm(h[i:i + chunk].to(dtype), w.t(), out=low)  # (c, padded vocab) logits
                if low is not logp:
                    logp.copy_(low)
                if b is not None:
                    logp.add_(b)
                elif rows is None:
                    logp[:, vocab:] = float("-inf")  # the padding (a bias carries its own -inf)
                torch._log_softmax(logp, -1, False, out=logp)  # in place: one fused kernel
                valid = y != ignore_index
                target = y.clamp(min=0)
                total -= (logp.gather(1, target[:, None]).squeeze(1) * valid).sum()
                probs = logp.exp_()  # softmax, in place
                probs[torch.arange(len(y), device=y.device), target] -= 1.0
                if not all_valid:  # causal_lm_loss passes only targets; other callers may not
                    probs *= valid[:, None]
                if rows is not None:
                    g, p = grad_h[i:i + chunk].zero_(), probs if low is logp else low.copy_(probs)
                    for v0, v1 in blocks:
                        g += p[:, v0:v1] @ head_rows(v0, v1)
                elif low is logp:
                    torch.mm(probs, w, out=grad_h[i:i + chunk])
                else:
                    grad_h[i:i + chunk] = low.copy_(probs) @ w
        ctx.save_for_backward(grad_h)
        ctx.h_dtype = h.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_total).to(ctx.h_dtype), None, None, None, None, None


@contextlib.contextmanager
def frozen_weights_in(model: nn.Module, dtype: torch.dtype):
    """Hold the frozen float32 weights of the linear layers in `dtype` while the block runs (bf16 training).

    Autocast casts a weight to bf16 at every use unless the weight requires grad (only those enter its
    cast cache): for the frozen base model that is a copy of every linear weight per micro-batch, about
    8% of a bf16 step here. Casting once gives the same numbers (the same rounding) without the copies.
    Peak memory does not grow: autocast's copies are kept for the backward pass anyway. Embeddings
    (and heads tied to them) stay as they are, and the float32 values come back on exit."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    kept = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Embedding) or not isinstance(w, nn.Parameter) or w.dim() != 2 or id(w) in embeddings:
            continue
        for p in (w, getattr(m, "bias", None)):
            if isinstance(p, nn.Parameter) and not p.requires_grad and p.dtype == torch.float32:
                kept.append((p, p.data))
                p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in kept:
            p.data = data


SHORT_ATTENTION = 1 << 22  # batch x heads x queries x keys up to which ShortAttention replaces SDPA in training


class ShortAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v for bf16/fp16 training on CPU: scores and softmax in fp32.

    SDPA's CPU flash kernel in bf16 takes four to five times its forward time for the backward pass
    (28 vs 6 ms for a GPT-2-medium layer at 8 x 128 tokens); with the probabilities kept for the
    backward (in bf16, at most 8 MB a layer: hence "short"), plain batched matmuls do both in about
    half the time. bias is 0 where a query may attend to a key and -inf where not; every row has a 0."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        B, H, T, S = *q.shape[:3], k.shape[2]
        q, k, v = (t.contiguous() for t in (q, k, v))  # one copy each here, not one per matmul below
        bias = bias.expand(B, H, T, S).reshape(B * H, T, S)  # a view for a (Tq, Tk) bias; a copy for (B, 1, Tq, Tk)
        scores = torch.baddbmm(bias, q.float().view(B * H, T, -1), k.float().view(B * H, S, -1).transpose(1, 2),
                               alpha=scale)  # bias + scale · q k^T in one pass, fp32
        p = torch.softmax(scores, dim=-1).to(v.dtype).view(B, H, T, S)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return p @ v  # (B, H, Tq, D)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, p = ctx.saved_tensors
        dout = dout.contiguous()
        dv = p.transpose(-1, -2) @ dout
        dp = (dout @ v.transpose(-1, -2)).float()
        p = p.float()
        ds = p.mul_(dp.sub_((dp * p).sum(-1, keepdim=True))).mul_(ctx.scale).to(q.dtype)  # softmax backward, fp32
        return ds @ k, ds.transpose(-1, -2) @ q, dv, None, None


ROW_BLOCK = 1 << 21  # weights rebuilt at a time: 8 MB in fp32


def row_blocks(d: int, k: int, multiple: int = 256) -> list[tuple[int, int]]:
    """Row ranges of about ROW_BLOCK weights, each a whole number of `multiple`-value blocks of the flat
    row-major layout (k is a multiple of 256 in every real model; otherwise the range grows to one)."""
    step = max(1, ROW_BLOCK // k)
    while (step * k) % multiple:
        step += 1
    return [(r, min(d, r + step)) for r in range(0, d, step)]


class LoRAFunction(torch.autograd.Function):
    """h = x W0^T + b + s · (x_d A^T) B^T with its gradients written out; x_d is x after LoRA's dropout,
    None where there is none (x itself: torch.compile cannot trace a Function given one tensor twice).

    With g = dL/dh, xa = x_d A^T (N×r) and gb = s · g B (N×r), the backward pass is
        dL/dB = s · g^T xa  (d×r)      dL/dA = gb^T x_d  (r×k)
        dL/dx = g W0 (+ gb A without dropout; else dL/dx_d = gb A)      W0, b: frozen, no gradient.
    Autograd through nn.Linear finds the same numbers, but takes dL/dB as a transposed (d×N)·(N×r)
    product, which MKL runs several times slower than the (r×N)·(N×d) one here, and keeps the two
    paths' outputs and input gradients as separate tensors to add; here the LoRA term is accumulated
    into the base output (and dL/dx) by the matmul itself. All in x's dtype, as autocast would have it.

    A quantized base comes as `base` (quant/blockwise.BlockwiseBase; `weight` and `bias` are then None):
    its own x W0ᵀ + b and g W0 take the place of the two products with W0, eager mode only."""

    @staticmethod
    def forward(ctx, x, x_d, weight, bias, lora_A, lora_B, scaling, base=None):
        dtype, k = x.dtype, x.shape[-1]
        x2 = x.reshape(-1, k)
        xd2 = x2 if x_d is None else x_d.reshape(-1, k)
        w, a, b = None if weight is None else weight.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
        if base is not None:
            out = base.forward(x2, dtype)
        else:
            out = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        xa = xd2 @ a.t()
        out.addmm_(xa, b.t(), alpha=scaling)
        # A's gradient alone needs x_d: with A frozen (LoRA-FA) it is not kept, LoRA-FA's saving
        ctx.save_for_backward(xd2 if ctx.needs_input_grad[4] else None, xa, w, a, b)
        ctx.scaling, ctx.same_input, ctx.dtypes, ctx.base = scaling, x_d is None, (lora_A.dtype, lora_B.dtype), base
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xd2, xa, w, a, b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)
        gb = (b.t() @ g.t()).t().mul_(ctx.scaling)  # = s·g B; as (r×d)(d×N), ~2x faster than (N×d)(d×r) in MKL
        grad_A = (gb.t() @ xd2).to(ctx.dtypes[0]) if xd2 is not None else None
        grad_B = (xa.t() @ g).mul_(ctx.scaling).t().to(ctx.dtypes[1])
        shape = (*grad_out.shape[:-1], a.shape[-1])
        grad_x = grad_xd = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ w if ctx.base is None else ctx.base.input_grad(g)
            if ctx.same_input:
                grad_x.addmm_(gb, a)
            grad_x = grad_x.view(shape)
        if not ctx.same_input and ctx.needs_input_grad[1]:
            grad_xd = (gb @ a).view(shape)
        return grad_x, grad_xd, None, None, grad_A, grad_B, None, None
