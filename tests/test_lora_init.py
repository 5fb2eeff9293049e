"""init_lora_weights under PEFT's names, against peft 0.21 (the oracle) on the tiny random Llama:
PiSSA and OLoRA give the same A, B and residual base weight as peft's (fp32, same SVD and QR calls,
so the same signs), and the same outputs; the start is the base model; gaussian draws A with std 1/r;
a trained PiSSA/OLoRA adapter saved by either library loads in the other onto the original base and
gives the trained model's outputs; bad settings get named errors."""

import copy

import pytest
import torch
from minilora.errors import CheckpointError, ConfigError
from minilora.loading.weights import load_model
from minilora.lora.config import LoRAConfig
from minilora.lora.inject import apply_lora, lora_modules
from minilora.lora.peft_files import load_adapter, save_adapter

IDS = torch.tensor([[5, 9, 13, 2, 40, 7], [3, 3, 8, 21, 60, 11]])
TOL = 1e-5


def peft_lora(hf, **settings):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                        **settings)).eval()


def peft_layers(peft_model):
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
            and "default" in getattr(m, "lora_A", {})}


def nudge(model, seed=3):
    """The same change to every lora_B (as training would make), in either library: by sorted name."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n.removeprefix("base_model.model.").replace(".default", ""), p)
                           for n, p in model.named_parameters() if "lora_B" in n):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_pissa_and_olora_equal_peft(saved_tiny, init, rslora):
    hf, folder = saved_tiny["llama-gqa"]
    theirs = peft_lora(hf, init_lora_weights=init, use_rslora=rslora)
    ours = load_model(folder)
    apply_lora(ours, "all-linear", r=4, alpha=8, init_lora_weights=init, use_rslora=rslora)
    layers = peft_layers(theirs)
    assert set(layers) == {n for n, _ in lora_modules(ours)} and len(layers) > 10
    for name, m in layers.items():
        mine = ours.get_submodule(name)
        assert (mine.lora_A.weight - m.lora_A["default"].weight).abs().max() < TOL, name
        assert (mine.lora_B.weight - m.lora_B["default"].weight).abs().max() < TOL, name
        assert (mine.weight - m.base_layer.weight).abs().max() < TOL, name
        assert (mine.lora_B.weight.abs().max() > 0.01)  # not the zero start: the principal directions
    with torch.no_grad():
        start = hf(IDS).logits
        assert (ours(IDS) - start).abs().max() < 1e-4 and (theirs(IDS).logits - start).abs().max() < 1e-4
        nudge(ours), nudge(theirs)
        assert (ours(IDS) - theirs(IDS).logits).abs().max() < 1e-4
        assert (ours(IDS) - start).abs().max() > 1e-2


def test_pissa_niter_is_an_approximate_svd_and_the_start_is_the_base(saved_tiny):
    hf, folder = saved_tiny["llama-gqa"]
    exact, fast = load_model(folder), load_model(folder)
    apply_lora(exact, "all-linear", r=4, alpha=8, init_lora_weights="pissa")
    apply_lora(fast, "all-linear", r=4, alpha=8, init_lora_weights="pissa_niter_16")
    original = dict(hf.named_parameters())
    for name, _ in lora_modules(fast):
        f, e = fast.get_submodule(name), exact.get_submodule(name)
        w = original[name + ".weight"]
        assert (f.weight + f.delta_weight() - w).abs().max() < TOL  # residual + s·B A is W
        best, approx = (w - e.delta_weight()).norm(), (w - f.delta_weight()).norm()  # Eckart-Young: SVD's is least
        assert best - 1e-4 <= approx <= 1.05 * best


def test_gaussian_draws_a_with_std_one_over_r_and_b_zero(saved_tiny):
    _, folder = saved_tiny["llama-gqa"]
    torch.manual_seed(0)
    model = apply_lora(load_model(folder), "all-linear", r=4, alpha=8, init_lora_weights="gaussian")
    a = torch.cat([m.lora_A.weight.flatten() for m in dict(lora_modules(model)).values()])
    assert abs(a.std().item() - 0.25) < 0.01 and abs(a.mean().item()) < 0.01
    assert all(not m.lora_B.weight.any() for m in dict(lora_modules(model)).values())
    assert model.lora_state.config.init_lora_weights == "gaussian"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_trained_pissa_adapter_loads_either_way_on_the_original_base(saved_tiny, tmp_path, init):
    from peft import PeftModel
    hf, folder = saved_tiny["llama-gqa"]
    ours = load_model(folder)
    apply_lora(ours, "all-linear", r=4, alpha=8, init_lora_weights=init)
    nudge(ours)
    with torch.no_grad():
        trained = ours(IDS)
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    again = load_adapter(load_model(folder), tmp_path / "ours")
    with torch.no_grad():
        assert (theirs(IDS).logits - trained).abs().max() < 1e-4
        assert (again(IDS) - trained).abs().max() < 1e-4
    peft_trained = peft_lora(hf, init_lora_weights=init)
    nudge(peft_trained)
    peft_trained.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = peft_trained(IDS).logits
        assert (load_adapter(load_model(folder), tmp_path / "peft")(IDS) - expected).abs().max() < 1e-4


def test_bad_initialisations_get_named_errors(saved_tiny, tmp_path):
    _, folder = saved_tiny["llama-gqa"]
    with pytest.raises(ConfigError, match=r'init_lora_weights must be true, false, "gaussian", "pissa", '
                                          r'"pissa_niter_K" .* got \'svd\''):
        LoRAConfig(init_lora_weights="svd")
    with pytest.raises(ConfigError, match=r"positive number of iterations.*got 'pissa_niter_0'"):
        LoRAConfig(init_lora_weights="pissa_niter_0")
    with pytest.raises(ConfigError, match=r"init_lora_weights 'loftq' needs loftq_config"):
        LoRAConfig(init_lora_weights="loftq")
    quantized = load_model(folder, load_in_8bit=True)
    with pytest.raises(ConfigError, match=r"model.layers.0.self_attn.q_proj: init_lora_weights 'pissa' changes "
                                          r"the base weight, which is quantized here"):
        apply_lora(quantized, ["q_proj"], r=4, alpha=8, init_lora_weights="pissa")
    assert not lora_modules(quantized)  # refused before any layer changed
    with pytest.raises(ConfigError, match=r"q_proj: LoRA rank r=64 is above min\(d, k\) = 32"):
        apply_lora(load_model(folder), ["q_proj"], r=64, alpha=8, init_lora_weights="pissa")
    with pytest.raises(ConfigError, match=r"init_lora_weights 'olora' with use_dora is not supported"):
        apply_lora(load_model(folder), ["q_proj"], r=4, alpha=8, init_lora_weights="olora", use_dora=True)
    model = apply_lora(load_model(folder), ["q_proj"], r=4, alpha=8, init_lora_weights="pissa_niter_2")
    save_adapter(model, tmp_path / "fast")
    fresh = load_model(folder)
    with pytest.raises(CheckpointError, match=r"adapter_config.json: init_lora_weights 'pissa_niter_2' is "
                                              r"randomized"):
        load_adapter(fresh, tmp_path / "fast")
    assert not lora_modules(fresh)


def test_a_pissa_adapter_merges_to_the_trained_model_and_is_not_exported_alone(saved_tiny, tmp_path):
    from minilora.lora.inject import merge_lora
    from minilora.ship.gguf_export import export_adapter
    _, folder = saved_tiny["llama-gqa"]
    model = apply_lora(load_model(folder), "all-linear", r=4, alpha=8, init_lora_weights="pissa")
    nudge(model)
    with torch.no_grad():
        trained = model(IDS)
        with pytest.raises(ConfigError, match=r"init_lora_weights 'pissa': the adapter is relative to the residual "
                                              r"base .* export the merged model instead"):
            export_adapter(model, tmp_path / "a.gguf")
        assert not (tmp_path / "a.gguf").exists()
        merge_lora(model)
        assert (model(IDS) - trained).abs().max() < 1e-4
