"""The training loop: accumulation equals one big batch, the schedule equals its formula, resume
continues the same loss curve, checkpoints are atomic, frozen weights never move."""

import json
import math
import warnings

import pytest
import torch

import minilora.train
from minilora.adapter import write_atomically
from minilora.data import Example, collate
from minilora.errors import CheckpointError, ConfigError
from minilora.lora import apply_lora
from minilora.train import TrainConfig, accumulate_gradients, bf16_enabled, checkpoint_folders, lr_factor, train
from minilora.weights import load_model


class Tok:
    pad_token_id = 0
    eos_token_id = 1


def examples(n=24, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 15, (1,), generator=g))
        ids = torch.randint(2, vocab, (length,), generator=g).tolist()
        labels = [-100] * (length // 3) + ids[length // 3:]  # some prompt tokens masked
        out.append(Example(ids, labels))
    return out


def lora_model(saved_tiny, kind="llama-gqa", dropout=0.0):
    _, folder = saved_tiny[kind]
    torch.manual_seed(0)
    model = load_model(folder)
    apply_lora(model, "all-linear", r=4, alpha=8, dropout=dropout)
    with torch.no_grad():  # B != 0, so A gets gradients too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2"])
def test_accumulation_equals_one_big_batch(saved_tiny, kind):
    model = lora_model(saved_tiny, kind)
    data = examples(8)
    assert len({len(e.input_ids) for e in data}) > 3  # unequal lengths
    accumulate_gradients(model, [collate(data, 0)])
    big = grads(model)
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, [collate(data[i:i + 2], 0) for i in range(0, 8, 2)])
    small = grads(model)
    assert big.keys() == small.keys() and len(big) > 0
    for n in big:
        assert (big[n] - small[n]).abs().max().item() <= 1e-6, n


def test_accumulated_loss_is_the_token_mean(saved_tiny):
    model = lora_model(saved_tiny)
    data = examples(6)
    loss, count = accumulate_gradients(model, [collate(data[:1], 0), collate(data[1:], 0)])
    batch = collate(data, 0)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(loss - expected.item()) < 1e-5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_equals_the_formula(saved_tiny, tmp_path, schedule):
    model = lora_model(saved_tiny)
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=10, micro_batch_size=2, batch_size=4, lr=1e-2,
                      warmup_steps=4, lr_schedule=schedule, progress=False)
    lrs = [h["lr"] for h in train(model, Tok, examples(8), None, cfg).history]
    assert lrs[0] == 0.0                                    # step 0: warmup starts at zero
    assert lrs[2] == pytest.approx(1e-2 * 2 / 4)            # halfway through warmup
    assert lrs[4] == pytest.approx(1e-2)                    # warmup end: the peak
    progress = (9 - 4) / (10 - 4)                           # the last step
    last = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    assert lrs[9] == pytest.approx(1e-2 * last)
    assert lr_factor(10, 4, 10, schedule) == pytest.approx(0.0)


def run(saved_tiny, out, **kw):
    model = lora_model(saved_tiny, dropout=0.1)  # dropout: resume must restore the RNG too
    cfg = TrainConfig(output_dir=str(out), epochs=3, micro_batch_size=2, batch_size=4, lr=5e-3, warmup_steps=2,
                      save_every=2, keep_last=2, progress=False, eval_every=3, **kw)
    return model, train(model, Tok, examples(10), examples(4, seed=1), cfg)


def losses(result):
    return {h["step"]: h["loss"] for h in result.history if "loss" in h}


def test_resume_after_stop_equals_uninterrupted(saved_tiny, tmp_path):
    model_a, full = run(saved_tiny, tmp_path / "a")
    # The second run stops itself after step 4 (as SIGTERM would), saving a checkpoint; then resumes.
    import minilora.train as T
    model_b = lora_model(saved_tiny, dropout=0.1)
    cfg = TrainConfig(output_dir=str(tmp_path / "b"), epochs=3, micro_batch_size=2, batch_size=4, lr=5e-3,
                      warmup_steps=2, save_every=2, keep_last=2, progress=False, eval_every=3)
    calls = {"n": 0}
    real_accumulate = T.accumulate_gradients

    def counting(*a, **k):
        calls["n"] += 1
        out = real_accumulate(*a, **k)
        if calls["n"] == 5:
            stopper.requested = True
        return out
    stopper = None
    real_init = T._StopRequest

    class Stopper(real_init):
        def __init__(self):
            nonlocal stopper
            super().__init__()
            stopper = self
    T._StopRequest, T.accumulate_gradients = Stopper, counting
    try:
        stopped = train(model_b, Tok, examples(10), examples(4, seed=1), cfg)
    finally:
        T._StopRequest, T.accumulate_gradients = real_init, real_accumulate
    assert stopped.stopped_early and stopped.adapter_dir is None
    assert checkpoint_folders(tmp_path / "b")[-1].name == "checkpoint-5"
    model_c = lora_model(saved_tiny, dropout=0.1)
    torch.manual_seed(123)  # whatever the RNG is now, resume restores the checkpoint's
    cfg.resume_from_checkpoint = "latest"
    resumed = train(model_c, Tok, examples(10), examples(4, seed=1), cfg)
    a, c = losses(full), losses(resumed)
    assert sorted(c) == list(range(6, 10))
    for step in c:
        assert abs(a[step] - c[step]) <= 1e-6, step
    evals_a = [h for h in full.history if "eval_loss" in h]
    evals_c = [h for h in resumed.history if "eval_loss" in h]
    assert evals_c and all(abs(x["eval_loss"] - y["eval_loss"]) <= 1e-6 for x, y in zip(evals_a[-len(evals_c):], evals_c))
    for (n, p), (_, q) in zip(model_a.named_parameters(), model_c.named_parameters()):
        assert (p - q).abs().max().item() <= 1e-6, n
    # the metrics file of the resumed run reads as one uninterrupted run
    lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == list(range(1, 10))
    # only the last K=2 checkpoints remain
    assert [f.name for f in checkpoint_folders(tmp_path / "b")] == ["checkpoint-6", "checkpoint-8"]


def test_crash_during_a_checkpoint_leaves_the_previous_one_loadable(saved_tiny, tmp_path, monkeypatch):
    import minilora.train as T
    real_save, calls = torch.save, {"n": 0}

    def failing_save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # the second checkpoint, after its adapter file and while saving the optimizer
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(T.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        run(saved_tiny, tmp_path)
    monkeypatch.setattr(T.torch, "save", real_save)
    assert [f.name for f in checkpoint_folders(tmp_path)] == ["checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "metrics.jsonl"]
    _, resumed = run(saved_tiny, tmp_path, resume_from_checkpoint="latest")
    assert min(losses(resumed)) == 3


def test_resume_with_changed_settings_is_refused(saved_tiny, tmp_path):
    run(saved_tiny, tmp_path)
    model = lora_model(saved_tiny)
    cfg = TrainConfig(output_dir=str(tmp_path), epochs=3, micro_batch_size=2, batch_size=2, lr=5e-3,
                      resume_from_checkpoint="latest", progress=False)
    with pytest.raises(CheckpointError, match=r"cannot resume, the run's settings changed \(batch_size: checkpoint 4 vs now 2"):
        train(model, Tok, examples(10), None, cfg)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "checkpoint-2"
    write_atomically(folder, lambda d: (d / "a.txt").write_text("good"))

    def crash(d):
        (d / "a.txt").write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        write_atomically(folder, crash)
    assert (folder / "a.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]  # no temporary left behind


def test_only_lora_parameters_change(saved_tiny, tmp_path):
    model = lora_model(saved_tiny, dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    train(model, Tok, examples(8), None, TrainConfig(output_dir=str(tmp_path), max_steps=3, micro_batch_size=4,
                                                     lr=1e-2, weight_decay=0.1, progress=False))
    after = model.state_dict()
    for n in before:
        if "lora_" in n:
            assert not torch.equal(before[n], after[n]), n
        else:
            assert torch.equal(before[n], after[n]), n  # bit-identical


def test_best_model_is_loaded_at_the_end(saved_tiny, tmp_path):
    model = lora_model(saved_tiny)
    scores = iter([0.5, 0.9, 0.7, 0.6])  # peaks at the second evaluation
    seen = {}

    def evaluate_fn(m):
        score = next(scores)
        seen[score] = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        return {"eval_accuracy": score}
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=4, micro_batch_size=4, lr=1e-2, eval_every=1,
                      best_metric="eval_accuracy", load_best_at_end=True, progress=False)
    result = train(model, Tok, examples(8), None, cfg, evaluate_fn=evaluate_fn)
    assert result.best_step == 2 and result.best_metric == 0.9
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, seen[0.9][n]), n
    assert json.loads((tmp_path / "best" / "minilora.json").read_text())["best_step"] == 2


def test_non_finite_loss_stops_with_the_step(saved_tiny, tmp_path):
    from minilora.errors import TrainingError
    model = lora_model(saved_tiny)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_A.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"step 1: the loss is nan"):
        train(model, Tok, examples(8), None, TrainConfig(output_dir=str(tmp_path), max_steps=2, progress=False))


def test_gradient_checkpointing_gives_the_same_gradients(saved_tiny):
    from minilora.train import set_gradient_checkpointing
    model = lora_model(saved_tiny)
    batch = collate(examples(4), 0)
    accumulate_gradients(model, [batch])
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    set_gradient_checkpointing(model, True)
    model.train()
    accumulate_gradients(model, [batch])
    checkpointed = grads(model)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], atol=1e-6), n


@pytest.mark.parametrize("bad, message", [
    (dict(micro_batch_size=0), "micro_batch_size must be a positive integer"),
    (dict(micro_batch_size=3, batch_size=8), "batch_size=8 is not a multiple of micro_batch_size=3"),
    (dict(lr_schedule="exp"), "lr_schedule must be"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(load_best_at_end=True), "load_best_at_end needs best_metric"),
    (dict(bf16="yes"), 'bf16 must be true, false or "auto"'),
    (dict(bf16=1), 'bf16 must be true, false or "auto"'),
])
def test_bad_train_config(bad, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**bad)


def test_bf16_autocast_trains(saved_tiny, tmp_path):
    model = lora_model(saved_tiny)
    result = train(model, Tok, examples(16), None, TrainConfig(output_dir=str(tmp_path), max_steps=6, micro_batch_size=8,
                                                               lr=2e-2, bf16=True, progress=False))
    l = losses(result)
    assert all(math.isfinite(v) for v in l.values()) and l[6] < l[1]


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_auto_follows_the_machine_and_true_warns_where_bf16_is_slow(saved_tiny, tmp_path, monkeypatch, fast):
    # a machine with or without fast bf16 products (the measurement itself: quant.matmul_is_fast)
    monkeypatch.setattr(minilora.train, "matmul_is_fast", lambda dtype, device_type: fast)
    cpu = torch.device("cpu")
    assert bf16_enabled("auto", cpu) is fast and bf16_enabled(False, cpu) is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bf16_enabled(True, cpu) is True
    assert [str(w.message)[:40] for w in caught] == ([] if fast else ["bf16 = true on a cpu whose bf16 matrix p"])
    runs = {}
    for setting in ("auto", fast):  # "auto" trains exactly as the setting it resolves to
        cfg = TrainConfig(output_dir=str(tmp_path / str(setting)), max_steps=2, micro_batch_size=8, lr=2e-2,
                          bf16=setting, progress=False)
        runs[setting] = losses(train(lora_model(saved_tiny), Tok, examples(16), None, cfg))
    assert runs["auto"] == runs[fast]
    if not fast:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bf16 = losses(train(lora_model(saved_tiny), Tok, examples(16), None, TrainConfig(
                output_dir=str(tmp_path / "bf16"), max_steps=2, micro_batch_size=8, lr=2e-2, bf16=True, progress=False)))
        assert bf16 != runs["auto"]  # the comparison can tell bf16 from fp32


@pytest.mark.parametrize("kind", ["gpt2", "gptj", "llama-tied"])
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_head_and_loss_equal_the_plain_ones(saved_tiny, kind, bf16):
    """The fused LM-head cross-entropy against F.cross_entropy over the model's logits (the oracle)."""
    import torch.nn.functional as F
    from minilora.train import causal_lm_loss
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
    from minilora.train import frozen_weights_in
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
    import torch.nn.functional as F
    from minilora.models.common import attend, attention_mask
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


def test_fused_loss_over_chunks_padding_and_a_changed_head():
    """LinearCrossEntropy against float64 F.cross_entropy(F.linear(...)): several chunks (1100 rows, 512 a
    chunk), a vocabulary padded from 50257 to 50304, a bias, ignored targets; and the head it keeps
    prepared between calls is remade when the weight changes in place or is given new data."""
    import torch.nn.functional as F
    from minilora.train import LinearCrossEntropy, prepared_head
    g = torch.Generator().manual_seed(0)
    vocab, d = 50257, 16
    weight = torch.randn(vocab, d, generator=g)
    bias = torch.randn(vocab, generator=g)
    labels = torch.randint(0, vocab, (1100,), generator=g)
    labels[::7] = -100

    def check():
        for b in (bias, None):  # the padding's -inf comes with the bias, or is written into the logits
            h = torch.randn(1100, d, generator=g, dtype=torch.float64)
            h32 = h.float().requires_grad_()
            loss = LinearCrossEntropy.apply(h32, weight, b, labels)
            loss.backward()
            h64 = h.clone().requires_grad_()
            expected = F.cross_entropy(F.linear(h64, weight.double(), None if b is None else b.double()), labels,
                                       reduction="sum")
            expected.backward()
            assert abs(loss.item() - expected.item()) <= 1e-6 * abs(expected.item())
            assert ((h32.grad.double() - h64.grad).norm() / h64.grad.norm()).item() <= 1e-5

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
