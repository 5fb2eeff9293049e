"""init_lora_weights="loftq" (Li et al. 2023) against peft 0.21's loftq_init (the oracle), run on the CPU:
with bitsandbytes' own quantize/dequantize round trip (NF4 with fp32 absmaxes, int8 rows) our `loftq`
gives PEFT's Q, A and B to the bit; our int8 round trip is bitsandbytes' but for its fp16 cast (and
ties); on the tiny Llama every target's base becomes the NF4Linear/Int8Linear holding the Q the
algorithm fitted to, the start is closer to W than plain quantization is, layer by layer and in the
logits; it trains; it saves its settings; its base rebuilds from the float one; bad settings get
named errors."""

import json
import warnings

import pytest
import torch
from conftest import RECIPE, Tok, examples, tiny_model_with_tokenizer
from minilora.errors import ConfigError
from minilora.loading.weights import load_model
from minilora.lora.config import LoRAConfig
from minilora.lora.initialise import loftq, loftq_base
from minilora.lora.inject import apply_lora, lora_modules
from minilora.lora.peft_files import save_adapter
from minilora.lora.report import param_report
from minilora.quant.int8 import Int8Linear, int8_round_trip, quantize_rows
from minilora.quant.nf4 import NF4Linear, nf4_round_trip, quantize_nf4
from minilora.recipe import load_recipe

bnb = pytest.importorskip("bitsandbytes")
KINDS = {4: (NF4Linear, nf4_round_trip, "load_in_4bit"), 8: (Int8Linear, int8_round_trip, "load_in_8bit")}


@pytest.fixture
def peft_loftq_init(monkeypatch):
    """peft's loftq_init on the CPU: it sends the weight to "cuda" (or "xpu") to compute, so that device
    is read as "cpu" here (tensors and bitsandbytes' parameters), and its cache clearing is skipped."""
    import peft.utils.loftq_utils as loftq_utils

    def on_cpu(to):
        def moved(self, *args, **kwargs):
            gpu = lambda d: isinstance(d, (str, torch.device)) and torch.device(d).type in ("cuda", "xpu")
            args = tuple("cpu" if gpu(a) else a for a in args)
            kwargs = {k: "cpu" if k == "device" and gpu(v) else v for k, v in kwargs.items()}
            return to(self, *args, **kwargs)
        return moved
    for owner in (torch.Tensor, bnb.nn.Params4bit, bnb.nn.Int8Params):
        monkeypatch.setattr(owner, "to", on_cpu(owner.to))
    monkeypatch.setattr(loftq_utils, "clear_device_cache", lambda: None)
    return loftq_utils.loftq_init


def bnb_nf4(w):
    """bitsandbytes' NF4 round trip as PEFT's LoftQ calls it (blocks of 64, fp32 absmaxes). Its CPU
    dequantizer is right only for rows that are whole blocks (tests/test_nf4.py): the weights here are."""
    p = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
    return bnb.functional.dequantize_4bit(p.data, p.quant_state), None


def bnb_int8(w):
    """bitsandbytes' int8 round trip as PEFT's LoftQ calls it (Int8Params: row absmax, from fp16)."""
    p = bnb.nn.Int8Params(w.clone(), requires_grad=False).to("cpu")
    return bnb.functional.int8_vectorwise_dequant(p.data, p.SCB), None


def weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.2


@pytest.mark.parametrize("bits, round_trip", [(4, bnb_nf4), (8, bnb_int8)], ids=["nf4", "int8"])
@pytest.mark.parametrize("iters", [1, 2])
@pytest.mark.parametrize("shape", [(96, 128), (64, 192)])
def test_loftq_with_the_bitsandbytes_round_trip_equals_peft(peft_loftq_init, bits, round_trip, iters, shape):
    """Fed bitsandbytes' round trip, our loftq is PEFT's to the bit (the same SVD call, the same order of
    operations). With our own quantizer (NF4 with double-quantized absmaxes; int8 without the fp16 cast)
    Q moves a little, and the SVD's factors with it, but LoftQ's error ||W − Q − B A|| stays within 1%."""
    w = weight(shape)
    q, a, b = peft_loftq_init(w, num_bits=bits, reduced_rank=8, num_iter=iters)
    mine_q, mine_a, mine_b, _ = loftq(w, 8, iters, round_trip)
    assert mine_a.shape == (8, shape[1]) and mine_b.shape == (shape[0], 8)
    assert torch.equal(mine_q, q) and torch.equal(mine_a, a) and torch.equal(mine_b, b)
    error = (w - q - b @ a).norm()
    assert error < 0.9 * (w - round_trip(w)[0]).norm()  # the point of it
    own_q, own_a, own_b, _ = loftq(w, 8, iters, KINDS[bits][1])
    assert abs((w - own_q - own_b @ own_a).norm() / error - 1) < 0.01


def int8_gaps(w):
    """(where our int8 codes of w differ from bitsandbytes', by how much, our Q, |our Q − theirs|, s)."""
    ours, stored = int8_round_trip(w)
    codes, scale = quantize_rows(w)
    assert isinstance(stored, Int8Linear) and torch.equal(stored.weight, codes)
    assert torch.equal(ours, codes.float() * scale[:, None])
    theirs = bnb.nn.Int8Params(w.clone(), requires_grad=False).to("cpu").data
    return codes != theirs, (codes.int() - theirs.int()).abs().max(), ours, (ours - bnb_int8(w)[0]).abs(), scale


def test_our_int8_round_trip_is_bitsandbytes_but_for_its_fp16_cast_and_ties():
    """bitsandbytes' Int8Params rounds the weight to fp16, then takes round(w·(127/absmax)); ours takes
    round(w/s), s = absmax/127, of the weight itself. On a weight fp16 holds exactly, the codes differ
    only at exact ties w/s = n + 1/2 (ours rounds the exact quotient half to even; the product lands a
    hair off it): 2 codes of 12288 here, and Q is the same elsewhere. On an fp32 weight the fp16 cast
    moves about 1% of the codes, and every Q value by its absmax's fp16 rounding (2^-11 relative at
    most). A code that moves moves by one: Q differs there by one step s of its row, and that rounding."""
    exact = weight((96, 128)).half().float()
    moved, most, _, gap, _ = int8_gaps(exact)
    ties = (exact / (exact.abs().amax(1, keepdim=True) / 127.0)).frac().abs() == 0.5
    assert moved.sum() == 2 and most == 1 and ties[moved].all() and (gap[~moved] <= 1e-7).all()
    w = weight((96, 128))
    moved, most, ours, gap, scale = int8_gaps(w)
    assert 0.005 < moved.float().mean() < 0.02 and most == 1
    rounding = ours.abs() * 2 ** -11 + 1e-7
    assert (gap[~moved] <= rounding[~moved]).all()
    assert (gap[moved] <= (scale[:, None] + rounding)[moved]).all()


def test_the_first_nf4_codes_are_bitsandbytes(saved_tiny):
    """One LoftQ step quantizes W itself: the NF4 codes of each target are bitsandbytes' (what differs
    from PEFT's Q after that is QLoRA's double quantization of the absmaxes, which our base keeps)."""
    hf, folder = saved_tiny["llama-gqa"]
    model = apply_lora(load_model(folder), "all-linear", r=4, alpha=4, init_lora_weights="loftq",
                       loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    original = dict(hf.named_parameters())
    for name, layer in lora_modules(model):
        w = original[name + ".weight"].detach()
        packed, _ = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        assert torch.equal(layer.weight.flatten(), packed.flatten()), name
        assert torch.equal(layer.weight.flatten(), quantize_nf4(w)["packed"])


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_on_the_tiny_llama_quantizes_the_base_and_starts_closer_to_w(saved_tiny, bits):
    hf, folder = saved_tiny["llama-gqa"]
    kind, round_trip, load_in = KINDS[bits]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # alpha = r: no scaling warning
        model = apply_lora(load_model(folder), "all-linear", r=4, alpha=4, init_lora_weights="loftq",
                           loftq_config={"loftq_bits": bits, "loftq_iter": 2})
    assert model.lora_state.config.loftq_config == {"loftq_bits": bits, "loftq_iter": 2}
    original = dict(hf.named_parameters())
    layers = lora_modules(model)
    assert len(layers) == 14
    for name, layer in layers:
        w = original[name + ".weight"].detach()
        q, a, b, stored = loftq(w, 4, 2, round_trip)
        assert layer.quantized is kind and torch.equal(layer.weight, stored.weight), name  # the last codes
        assert torch.equal(layer.base_weight(), q) and torch.equal(stored.dequantize(), q)
        assert torch.equal(layer.lora_A.weight, a) and torch.equal(layer.lora_B.weight, b)
        assert not layer.weight.requires_grad and layer.lora_A.weight.requires_grad
        start = (w - (layer.base_weight() + layer.delta_weight())).norm()
        assert start < 0.85 * (w - round_trip(w)[0]).norm(), name  # LoftQ's claim, layer by layer
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (4, 16))
    plain = load_model(folder, **{load_in: True})
    with torch.no_grad():
        expected = hf(ids).logits
        rms = lambda m: (m(ids) - expected).pow(2).mean().sqrt().item()
        assert rms(model) < 0.9 * rms(plain)
    assert param_report(model).total == param_report(apply_lora(load_model(folder), "all-linear", r=4, alpha=4)).total


def test_a_scaling_other_than_one_is_warned_as_peft_ignores_it(saved_tiny):
    _, folder = saved_tiny["llama-gqa"]
    with pytest.warns(UserWarning, match=r"init_lora_weights 'loftq' with the LoRA scaling 2 \(alpha / r\), not 1: "
                                         r"the layer starts at Q \+ 2·B A, not ≈ W"):
        model = apply_lora(load_model(folder), ["q_proj"], r=4, alpha=8, init_lora_weights="loftq",
                           loftq_config={"loftq_bits": 4})
    layer = model.model.layers[0].self_attn.q_proj
    _, a, b, _ = loftq(load_model(folder).model.layers[0].self_attn.q_proj.weight, 4, 1, nf4_round_trip)
    assert torch.equal(layer.lora_A.weight, a) and torch.equal(layer.lora_B.weight, b)  # not divided by 2


def test_a_loftq_adapter_trains_saves_its_settings_and_its_base_rebuilds(saved_tiny, tmp_path):
    from minilora.training.loop import TrainConfig, train
    hf, folder = saved_tiny["llama-gqa"]
    settings = {"loftq_bits": 4, "loftq_iter": 1}
    model = apply_lora(load_model(folder), "all-linear", r=4, alpha=4, init_lora_weights="loftq", loftq_config=settings)
    layer = model.model.layers[0].self_attn.q_proj
    codes, start = layer.weight.clone(), layer.lora_A.weight.detach().clone()
    model.train()
    loss = model(torch.randint(0, 97, (2, 9))).logsumexp(-1).mean()
    loss.backward()
    assert layer.lora_A.weight.grad.abs().max() > 0 and layer.lora_B.weight.grad.abs().max() > 0
    assert layer.weight.grad is None
    model.zero_grad()
    result = train(model, Tok, examples(8), None, TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3,
                                                              micro_batch_size=4, lr=1e-2, progress=False))
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert torch.equal(layer.weight, codes) and not torch.equal(layer.lora_A.weight, start)
    save_adapter(model, tmp_path / "adapter")
    for folder_saved in (tmp_path / "adapter", result.adapter_dir):  # ours, and the one train() wrote
        config = json.loads((folder_saved / "adapter_config.json").read_text())
        assert config["init_lora_weights"] == "loftq" and config["loftq_config"] == settings
    # What load_adapter rebuilds: the same Q (codes and absmaxes) and A0, B0 from the original float base
    fresh = apply_lora(load_model(folder), "all-linear", r=4, alpha=4)
    again = apply_lora(load_model(folder), "all-linear", r=4, alpha=4, init_lora_weights="loftq", loftq_config=settings)
    for name, rebuilt in lora_modules(fresh):
        a0, b0 = loftq_base(rebuilt, "default", settings)
        made = again.get_submodule(name)
        assert rebuilt.quantized is NF4Linear and torch.equal(rebuilt.weight, made.weight), name
        assert all(torch.equal(getattr(rebuilt, k), getattr(made, k)) for k in NF4Linear.state)
        assert torch.equal(a0, made.lora_A.weight) and torch.equal(b0, made.lora_B.weight)


def test_bad_loftq_settings_get_named_errors(saved_tiny):
    _, folder = saved_tiny["llama-gqa"]
    with pytest.raises(ConfigError, match=r"init_lora_weights 'loftq' needs loftq_config = \{loftq_bits = 4 or 8, "
                                          r"loftq_iter = n\} \(PEFT's LoftQConfig\)"):
        LoRAConfig(init_lora_weights="loftq")
    for bits in (3, 4.0, "4"):
        with pytest.raises(ConfigError, match=rf"loftq_config.loftq_bits must be 4 \(NF4\) or 8 \(int8\), got {bits!r}"):
            LoRAConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": bits})
    for iters in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match=rf"loftq_config.loftq_iter must be a positive integer .*got {iters!r}"):
            LoRAConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": iters})
    with pytest.raises(ConfigError, match=r"loftq_config: unknown key 'bits'; its keys are loftq_bits, loftq_iter"):
        LoRAConfig(init_lora_weights="loftq", loftq_config={"bits": 4})
    with pytest.raises(ConfigError, match=r"loftq_config is set but init_lora_weights is 'pissa': LoftQ runs only "
                                          r"with init_lora_weights = \"loftq\""):
        LoRAConfig(init_lora_weights="pissa", loftq_config={"loftq_bits": 4})
    assert LoRAConfig(loftq_config={}).loftq_config == {}  # PEFT's files say {} for every other init
    assert LoRAConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8}).loftq_config == \
        {"loftq_bits": 8, "loftq_iter": 1}
    loftq4 = dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    for load_in in ("load_in_8bit", "load_in_4bit"):
        quantized = load_model(folder, **{load_in: True})
        with pytest.raises(ConfigError, match=r"model.layers.0.self_attn.q_proj: init_lora_weights 'loftq' quantizes "
                                              r"the base weight, which is quantized already here \(int8, NF4 or GGUF "
                                              r"blocks\): load the base in floating point; LoftQ quantizes it"):
            apply_lora(quantized, ["q_proj"], r=4, alpha=4, **loftq4)
        assert not lora_modules(quantized)
    with pytest.raises(ConfigError, match=r"q_proj: init_lora_weights 'loftq' with use_dora is not supported"):
        apply_lora(load_model(folder), ["q_proj"], r=4, alpha=4, use_dora=True, **loftq4)
    with pytest.raises(ConfigError, match=r"q_proj: LoRA rank r=64 is above min\(d, k\) = 32"):
        apply_lora(load_model(folder), ["q_proj"], r=64, alpha=64, **loftq4)
    with pytest.raises(ConfigError, match=r"embed_tokens: init_lora_weights 'loftq' on an embedding layer is not "
                                          r"supported"):
        apply_lora(load_model(folder), ["q_proj", "embed_tokens"], r=4, alpha=4, **loftq4)
    _, tied_folder = saved_tiny["llama-tied"]
    tied = load_model(tied_folder)
    with pytest.raises(ConfigError, match=r"lm_head: init_lora_weights 'loftq' would change the weight it shares "
                                          r"with model.embed_tokens: leave the tied layer out of the targets"):
        apply_lora(tied, ["q_proj", "lm_head"], r=4, alpha=4, **loftq4)
    assert not lora_modules(tied) and tied.lm_head.weight is tied.model.embed_tokens.weight
    odd = torch.nn.Sequential(torch.nn.Linear(33, 8))
    with pytest.raises(ConfigError, match=r"0: init_lora_weights 'loftq' with loftq_bits 4: NF4 packs two codes a "
                                          r"byte, so in_features must be even, not 33"):
        apply_lora(odd, ["0"], r=4, alpha=4, **loftq4)
    apply_lora(odd, ["0"], r=4, alpha=4, init_lora_weights="loftq", loftq_config={"loftq_bits": 8})
    assert odd[0].quantized is Int8Linear
    from minilora.lora.adapters import add_adapter
    twice = apply_lora(load_model(folder), ["q_proj"], r=4, alpha=4)
    with pytest.raises(ConfigError, match=r"q_proj: init_lora_weights 'loftq' on a layer with LoRA adapters already: "
                                          r"it would quantize their base too; put the LoftQ adapter on first"):
        add_adapter(twice, "second", LoRAConfig(["q_proj"], r=4, alpha=4, **loftq4))
    assert twice.model.layers[0].self_attn.q_proj.quantized is None


def test_a_peft_loftq_config_object_is_read():
    from peft import LoftQConfig
    assert LoRAConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=8, loftq_iter=3)).loftq_config \
        == {"loftq_bits": 8, "loftq_iter": 3}


def test_a_recipe_takes_loftq_config_and_refuses_a_base_quantized_already(saved_tiny, tmp_path):
    model = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    (tmp_path / "data.jsonl").write_text('{"author": "w2", "quote": "w3 w4"}\n' * 8)
    lora = '[lora]\ninit_lora_weights = "loftq"\nloftq_config = { loftq_bits = 8, loftq_iter = 2 }\nalpha = 4\n'
    text = RECIPE.format(model=model, data=tmp_path / "data.jsonl", out=tmp_path / "run")
    (tmp_path / "r.toml").write_text(text.replace("[lora]\n", lora).replace("alpha = 8\n", ""))
    recipe = load_recipe(tmp_path / "r.toml")
    assert recipe.lora.init_lora_weights == "loftq" and recipe.lora.loftq_config == {"loftq_bits": 8, "loftq_iter": 2}
    (tmp_path / "r.toml").write_text(text.replace("[lora]\n", lora).replace("alpha = 8\n", "")
                                     .replace("[model]\n", "[model]\nload_in_4bit = true\n"))
    with pytest.raises(ConfigError, match=r"r.toml: \[model\].load_in_4bit with \[lora\] init_lora_weights = "
                                          r"\"loftq\": LoftQ quantizes the float base itself \(loftq_bits 8\); "
                                          r"remove load_in_4bit"):
        load_recipe(tmp_path / "r.toml")


def test_a_saved_loftq_adapter_loads_on_the_float_base_and_is_refused_where_it_cannot_be(saved_tiny, tmp_path):
    """load_adapter rebuilds Q from the original float base (LoftQ is deterministic), giving the trained
    model's logits; on a base loaded quantized, in llama.cpp's adapter format and in the PiSSA/OLoRA
    conversion it is refused by name."""
    from minilora.errors import CheckpointError
    from minilora.lora.peft_files import load_adapter
    from minilora.ship.gguf_export import export_adapter
    _, folder = saved_tiny["llama-gqa"]
    settings = {"loftq_bits": 4, "loftq_iter": 2}
    model = apply_lora(load_model(folder), "all-linear", r=4, alpha=4, init_lora_weights="loftq", loftq_config=settings)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)  # as training would change it
    save_adapter(model, tmp_path / "adapter")
    ids = torch.tensor([[5, 9, 13, 2, 40, 7]])
    loaded = load_adapter(load_model(folder), tmp_path / "adapter")
    assert all(m.quantized is NF4Linear for _, m in lora_modules(loaded))
    with torch.no_grad():
        trained, again = model(ids), loaded(ids)
    assert (trained - again).abs().max() < 1e-5
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: a LoftQ adapter trains beside the quantized base "
                                              r"Q .* load the base in floating point"):
        load_adapter(load_model(folder, load_in_4bit=True), tmp_path / "adapter")
    with pytest.raises(ConfigError, match=r"init_lora_weights 'loftq': the adapter trains beside the quantized base Q"):
        export_adapter(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
    with pytest.raises(ConfigError, match=r"converts a PiSSA/OLoRA adapter; a LoftQ adapter trains beside"):
        save_adapter(model, tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "adapter")
