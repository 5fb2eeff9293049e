"""LoRA+ and LoRA-FA (TrainConfig.optim, loraplus_lr_ratio) against peft 0.21's create_loraplus_optimizer
and create_lorafa_optimizer on the tiny random models: the same parameter groups with the same learning
rates and decays, the same weights after several steps from the same start; in train() they resume
exactly, and bad settings get named errors."""

import copy
import re

import pytest
import torch
from conftest import Tok, examples
from minilora.errors import CheckpointError, ConfigError
from minilora.loading.weights import load_model
from minilora.lora.inject import apply_lora
from minilora.training.loop import TrainConfig, train
from minilora.training.optimizers import freeze_for, make_optimizer

IDS = torch.tensor([[5, 9, 13, 2, 40, 7, 3, 3], [3, 3, 8, 21, 60, 11, 50, 1]])
SETUPS = {"llama-gqa": (["q_proj", "v_proj", "down_proj", "embed_tokens"], ["norm"]),
          "gpt2": (["c_attn", "c_fc", "wte"], ["ln_f"])}


def ours_name(peft_name: str) -> str:
    """peft's name of a trainable tensor -> ours (the adapter's tensors sit under adapters.<name>)."""
    n = peft_name.removeprefix("base_model.model.")
    n = re.sub(r"\.lora_([AB])\.default\.weight$", r".adapters.default.lora_\1.weight", n)
    n = re.sub(r"\.lora_embedding_([AB])\.default$", r".adapters.default.lora_embedding_\1", n)
    return n.replace(".modules_to_save.default.", ".")


def twins(saved_tiny, kind, saved=True, **settings):
    """Our model and peft's with LoRA on the same layers and the same trainable tensors (every B random)."""
    from peft import LoraConfig, get_peft_model
    hf, folder = saved_tiny[kind]
    targets, to_save = SETUPS[kind]
    to_save = to_save if saved else []
    torch.manual_seed(0)
    ours = apply_lora(load_model(folder), targets, r=4, alpha=8, modules_to_save=to_save, **settings)
    theirs = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          modules_to_save=to_save or None, **settings))
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in mine.items():
            if "_B" in n:
                p.normal_(0, 0.1)
        trainable = [(n, p) for n, p in theirs.named_parameters() if p.requires_grad]
        for n, p in trainable:
            p.copy_(mine[ours_name(n)])
    assert {ours_name(n) for n, _ in trainable} == {n for n, p in mine.items() if p.requires_grad}
    return ours.eval(), theirs.eval()  # no dropout: the same numbers


def lm_loss(logits):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))


def steps(model, optimizer, n, peft=False):
    """n optimizer steps on the same batch; the trainable tensors after each, by our names."""
    seen = []
    for _ in range(n):
        out = model(IDS)
        lm_loss(out.logits if peft else out).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen.append({ours_name(k) if peft else k: p.detach().clone() for k, p in model.named_parameters()
                     if "lora" in k or p.requires_grad})
    return seen


def worst(a, b):
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def names_of(model, group, peft=False):
    index = {id(p): n for n, p in model.named_parameters()}
    return sorted(ours_name(index[id(p)]) if peft else index[id(p)] for p in group["params"])


@pytest.mark.parametrize("kind", list(SETUPS))
def test_loraplus_groups_and_steps_equal_peft(saved_tiny, kind):
    """Groups in peft's order: A and matrices at lr, embedding adapters at loraplus_lr_embedding, B and
    vectors at lr·ratio (a LayerNorm's and biases undecayed); three AdamW steps give the same weights."""
    from peft.optimizers import create_loraplus_optimizer
    ours, theirs = twins(saved_tiny, kind)
    cfg = TrainConfig(lr=1e-2, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-3, weight_decay=0.1)
    mine = make_optimizer(ours, cfg)
    peft_opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16,
                                         loraplus_lr_embedding=1e-3, loraplus_weight_decay=0.1)
    assert len(mine.param_groups) == len(peft_opt.param_groups) == 4
    for g, h in zip(mine.param_groups, peft_opt.param_groups):
        assert names_of(ours, g) == names_of(theirs, h, peft=True)
        assert (g["lr"], g["weight_decay"]) == (h["lr"], h["weight_decay"])
    sizes = [len(g["params"]) for g in mine.param_groups]
    assert all(sizes[:3]) and (sizes[3] > 0) == (kind == "gpt2")  # ln_f's weight and bias: no decay
    assert [g["lr"] for g in mine.param_groups] == pytest.approx([1e-2, 1e-3, 0.16, 0.16])
    a, b = steps(ours, mine, 3), steps(theirs, peft_opt, 3, peft=True)
    error = max(worst(x, y) for x, y in zip(a, b))
    print(f"LoRA+ {kind}: weights after 3 steps within {error:.1e} of peft's")
    assert error < 1e-4  # B's lr 0.16: Adam's m/√v turns fp32 noise into ~1e-3·lr


@pytest.mark.parametrize("kind,rslora", [("llama-gqa", False), ("llama-gqa", True), ("gpt2", False)])
def test_lorafa_equals_peft(saved_tiny, monkeypatch, kind, rslora):
    """A frozen, B's gradient projected by (1/s²)(A Aᵀ)⁻¹, Adam as transformers' AdamW (eps 1e-6, decay
    after the step): the same weights as peft's LoraFAOptimizer after three steps (peft's product in fp32:
    on a CPU with bf16 it runs under bf16 autocast)."""
    import peft.optimizers.lorafa as lorafa
    monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)
    ours, theirs = twins(saved_tiny, kind, saved=False, use_rslora=rslora)
    cfg = TrainConfig(lr=1e-2, optim="lorafa", weight_decay=0.1)
    start = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_A" in n or "embedding_A" in n}
    freeze_for(ours, cfg)
    mine = make_optimizer(ours, cfg)
    peft_opt = lorafa.create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if n in start)
    a, b = steps(ours, mine, 3), steps(theirs, peft_opt, 3, peft=True)
    error = max(worst(x, y) for x, y in zip(a, b))
    print(f"LoRA-FA {kind} rslora={rslora}: weights after 3 steps within {error:.1e} of peft's")
    assert error < 1e-4  # Adam's m/√v turns fp32 noise into up to ~1e-3·lr
    assert all(torch.equal(a[-1][n], start[n]) for n in start)  # A never moves
    assert worst(a[-1], a[0]) > 1e-3                              # B does
    # plain AdamW from the same start moves differently: the projection is what is being compared
    ours_adam, _ = twins(saved_tiny, kind, saved=False, use_rslora=rslora)
    freeze_for(ours_adam, cfg)
    assert worst(steps(ours_adam, torch.optim.AdamW([p for p in ours_adam.parameters() if p.requires_grad],
                                                    lr=1e-2), 3)[-1], a[-1]) > 1e-3


def fit(saved_tiny, out, **kw):
    _, folder = saved_tiny["llama-gqa"]
    torch.manual_seed(0)
    model = apply_lora(load_model(folder), ["q_proj", "v_proj", "embed_tokens"], r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "_B" in n:
                p.normal_(0, 0.05)
    cfg = TrainConfig(**{**dict(output_dir=str(out), max_steps=6, micro_batch_size=2, batch_size=4, lr=5e-3,
                                save_every=3, warmup_steps=2, weight_decay=0.01, progress=False), **kw})
    return model, train(model, Tok, examples(12), None, cfg), cfg


@pytest.mark.parametrize("settings", [dict(loraplus_lr_ratio=8.0), dict(optim="lorafa")], ids=["loraplus", "lorafa"])
def test_each_optimizer_trains_and_resumes_exactly(saved_tiny, tmp_path, settings):
    full, result, _ = fit(saved_tiny, tmp_path / "a", **settings)
    _, stopped, cfg = fit(saved_tiny, tmp_path / "b", max_steps=6, **settings)
    resumed = load_model(saved_tiny["llama-gqa"][1])
    apply_lora(resumed, ["q_proj", "v_proj", "embed_tokens"], r=4, alpha=8)
    again = train(resumed, Tok, examples(12), None, TrainConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "c"),
                                                                   "resume_from_checkpoint": str(tmp_path / "b" / "checkpoint-3")}))
    first = {h["step"]: h["loss"] for h in result.history if "loss" in h}
    later = {h["step"]: h["loss"] for h in again.history if "loss" in h}
    assert sorted(later) == [4, 5, 6] and all(abs(first[s] - later[s]) < 1e-6 for s in later)
    mine = dict(resumed.named_parameters())
    assert max((p - mine[n]).abs().max().item() for n, p in full.named_parameters()) < 1e-6
    if "optim" in settings:
        assert not any(p.requires_grad for n, p in full.named_parameters() if n.endswith(("lora_A.weight", "embedding_A")))


@pytest.mark.parametrize("changed, message", [
    (dict(optim="lorafa"), "optim: checkpoint 'adamw_torch' vs now 'lorafa'.*loraplus_lr_ratio: checkpoint 8.0 vs now None"),
    (dict(loraplus_lr_ratio=4.0), "loraplus_lr_ratio: checkpoint 8.0 vs now 4.0"),
    (dict(loraplus_lr_ratio=8.0, loraplus_lr_embedding=1e-4), "loraplus_lr_embedding: checkpoint None vs now 0.0001"),
])
def test_resume_under_another_optimizer_is_refused_by_name(saved_tiny, tmp_path, changed, message):
    fit(saved_tiny, tmp_path, loraplus_lr_ratio=8.0)
    with pytest.raises(CheckpointError, match=rf"cannot resume, the run's settings changed \(.*{message}"):
        fit(saved_tiny, tmp_path, resume_from_checkpoint="latest", **changed)


@pytest.mark.parametrize("settings, message", [
    (dict(optim="adamw8bit"), r"optim 'adamw8bit': expected one of adamw_torch, lorafa"),
    (dict(loraplus_lr_ratio=0), r"loraplus_lr_ratio must be a positive finite number .* got 0"),
    (dict(loraplus_lr_ratio=-2.0), r"loraplus_lr_ratio must be a positive finite number .* got -2\.0"),
    (dict(loraplus_lr_ratio=float("inf")), r"loraplus_lr_ratio must be a positive finite number .* got inf"),
    (dict(loraplus_lr_ratio="16"), r"loraplus_lr_ratio must be"),
    (dict(loraplus_lr_embedding=1e-5), r"loraplus_lr_embedding is a setting of LoRA\+: set loraplus_lr_ratio too"),
    (dict(loraplus_lr_ratio=16, loraplus_lr_embedding=0.0), r"loraplus_lr_embedding must be a positive number"),
    (dict(optim="lorafa", loraplus_lr_ratio=16), r"loraplus_lr_ratio with optim \"lorafa\": LoRA-FA freezes A"),
])
def test_bad_optimizer_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)


def test_lorafa_with_dora_is_refused_before_any_step(saved_tiny, tmp_path):
    model = apply_lora(load_model(saved_tiny["llama-gqa"][1]), ["q_proj"], r=4, alpha=8, use_dora=True)
    with pytest.raises(ConfigError, match=r"optim \"lorafa\" with DoRA \(model\.layers\.0\.self_attn\.q_proj, adapter "
                                          r"'default'\) is not supported"):
        train(model, Tok, examples(4), None, TrainConfig(output_dir=str(tmp_path), max_steps=1, optim="lorafa",
                                                          progress=False))
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)  # nothing was changed
