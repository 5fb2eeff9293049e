"""hotswap_adapter (lora/hotswap.py): an adapter's weights replaced in place give the outputs of that
adapter loaded fresh, and of peft 0.21's hotswap_adapter; under torch.compile nothing recompiles
(dynamo's error_on_recompile); smaller ranks and other scalings swap in, larger ones after
prepare_model_for_compiled_hotswap; refusals name what does not fit and change nothing."""

import copy

import pytest
import torch
from minilora.errors import CheckpointError, ConfigError
from minilora.loading.weights import load_model
from minilora.lora.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from minilora.lora.inject import apply_lora
from minilora.lora.peft_files import load_adapter, save_adapter

IDS = torch.tensor([[5, 9, 13, 2, 40, 7], [3, 3, 8, 21, 60, 11]])


def saved(saved_tiny, folder, seed, targets=("q_proj", "v_proj"), **settings):
    """An adapter with random A and B, saved by minilora."""
    torch.manual_seed(seed)
    model = apply_lora(load_model(saved_tiny["llama-gqa"][1]), list(targets), **{"r": 4, "alpha": 8, **settings},
                       init_lora_weights=False)
    save_adapter(model, folder)
    return folder


def fresh(saved_tiny, folder):
    with torch.no_grad():
        return load_adapter(load_model(saved_tiny["llama-gqa"][1]), folder).eval()(IDS)


def test_a_swapped_adapter_is_the_adapter_loaded_fresh_and_peft_s_swap(saved_tiny, tmp_path):
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap
    first = saved(saved_tiny, tmp_path / "first", 0)
    other = saved(saved_tiny, tmp_path / "other", 1, alpha=20)           # another scaling, folded into B
    small = saved(saved_tiny, tmp_path / "small", 2, r=2, alpha=3)        # a smaller rank, padded
    model = load_adapter(load_model(saved_tiny["llama-gqa"][1]), first).eval()
    tensors = [p for n, p in model.named_parameters() if "lora_" in n]
    for folder in (other, small, first):
        hotswap_adapter(model, folder)
        with torch.no_grad():
            assert (model(IDS) - fresh(saved_tiny, folder)).abs().max() < 1e-5, folder.name
    assert [p for n, p in model.named_parameters() if "lora_" in n] == tensors  # the same tensors, refilled
    hf = saved_tiny["llama-gqa"][0]
    theirs = PeftModel.from_pretrained(copy.deepcopy(hf), first).eval()
    peft_hotswap(theirs, str(other), adapter_name="default", torch_device="cpu")
    hotswap_adapter(model, other)
    with torch.no_grad():
        assert (model(IDS) - theirs(IDS).logits).abs().max() < 1e-5


def test_a_compiled_model_does_not_recompile_after_a_swap(saved_tiny, tmp_path):
    import torch._dynamo
    first = saved(saved_tiny, tmp_path / "first", 0)
    other = saved(saved_tiny, tmp_path / "other", 1, alpha=20)
    big = saved(saved_tiny, tmp_path / "big", 3, r=8, alpha=8)
    model = load_adapter(load_model(saved_tiny["llama-gqa"][1]), first).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    with torch.no_grad():
        before = model(IDS)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        assert (compiled(IDS) - before).abs().max() < 1e-5  # padding changed nothing
        for folder in (other, big, first):
            hotswap_adapter(model, folder)
            assert (compiled(IDS) - fresh(saved_tiny, folder)).abs().max() < 1e-5, folder.name
    torch._dynamo.reset()
    # the padded adapter saves and loads as what it computes: rank 8, the same outputs
    save_adapter(model, tmp_path / "padded")
    assert (fresh(saved_tiny, tmp_path / "padded") - before).abs().max() < 1e-5


def test_swaps_that_cannot_fit_are_refused_by_name_and_change_nothing(saved_tiny, tmp_path):
    first = saved(saved_tiny, tmp_path / "first", 0)
    model = load_adapter(load_model(saved_tiny["llama-gqa"][1]), first).eval()
    with torch.no_grad():
        start = model(IDS)
    cases = [
        (saved(saved_tiny, tmp_path / "big", 1, r=8), r"big/adapter_config\.json: model\.layers\.0\.self_attn\.q_proj "
         r"has rank 8, the layer holds 4: call prepare_model_for_compiled_hotswap\(model, target_rank=8\)"),
        (saved(saved_tiny, tmp_path / "k", 1, targets=("q_proj", "k_proj")), r"needs the same targets as adapter "
         r"'default'; the file adapts model\.layers\.0\.self_attn\.k_proj.* which it does not; the file lacks "
         r"model\.layers\.0\.self_attn\.v_proj"),
        (saved(saved_tiny, tmp_path / "dora", 1, use_dora=True), r"swaps LoRA's A and B only; this adapter has DoRA"),
    ]
    for folder, message in cases:
        with pytest.raises(CheckpointError, match=message):
            hotswap_adapter(model, folder)
        with torch.no_grad():
            assert torch.equal(model(IDS), start)
    with pytest.raises(ConfigError, match=r"no adapter 'other' on the model to swap into; it has default"):
        hotswap_adapter(model, first, adapter_name="other")
    with pytest.raises(ConfigError, match=r"target_rank 2 is below the rank the adapter has already"):
        prepare_model_for_compiled_hotswap(model, target_rank=2)
