"""Regional compilation (models/compile.py): one block of every family compiles to one graph, forward
and backward, with plain LoRA, LoRA with dropout, DoRA, padded and packed masks and every quantized base
(int8, NF4, ggml's blocks); compiled training equals eager training; a new micro-batch length compiles
nothing new.

How breaks are counted: the block is compiled with an AOTAutograd backend that counts the forward and
backward graphs it is handed (`counting_backend`). A graph break would split the block's forward into
two or more graphs, each with its own backward; one forward graph and one backward graph, with
torch._dynamo's graph-break counter empty, is a block with no break in either pass. (aot_eager's
backward graph is the one AOTAutograd derives from that forward graph; compiled autograd is not used.)"""

import copy
import re

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn as nn
from conftest import examples
from minilora.data.batching import collate
from minilora.formats.ggml_blocks import Q4_0, Q8_0, quantize_blocks
from minilora.lora.inject import apply_lora
from minilora.models import MODEL_TYPES, build_model
from minilora.models.compile import compile_blocks
from minilora.quant.ggml import GGMLLinear
from minilora.quant.int8 import Int8Linear
from minilora.quant.nf4 import NF4Linear
from minilora.training.objectives.causal_lm import causal_lm_loss
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

LLAMA = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
GEMMA = dict(LLAMA, head_dim=16, sliding_window=4, query_pre_attn_scalar=16)
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
FAMILIES = {  # tiny configs, every linear's in_features a multiple of 32 (ggml's blocks), no dropout of their own
    "gpt2": dict(model_type="gpt2", vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, **NO_DROPOUT),
    "gptj": dict(model_type="gptj", vocab_size=97, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
    "llama": dict(LLAMA, model_type="llama"),
    "mistral": dict(LLAMA, model_type="mistral", sliding_window=5),
    "qwen2": dict(LLAMA, model_type="qwen2"),
    "qwen3": dict(LLAMA, model_type="qwen3", head_dim=16, use_sliding_window=True, sliding_window=4,
                  max_window_layers=1),
    "gemma2": dict(GEMMA, model_type="gemma2", attn_logit_softcapping=4.0, final_logit_softcapping=5.0),
    "gemma3": dict(GEMMA, model_type="gemma3_text", sliding_window_pattern=2),
    "bert": dict(model_type="bert", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "distilbert": dict(model_type="distilbert", vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                       dropout=0.0, attention_dropout=0.0),
}
ENCODERS = ("bert", "distilbert")
PADDED = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0, 0]])
PACKED = torch.tensor([[1, 1, 1, 2, 2, 3, 3, 3, 0], [1, 1, 1, 1, 2, 2, 2, 2, 2]])  # example numbers, then padding


def ggml(kind):
    def make(m: nn.Linear) -> GGMLLinear:
        raw = quantize_blocks(m.weight.detach(), kind)
        return GGMLLinear(m.in_features, m.out_features, kind, raw, None if m.bias is None else m.bias.detach())
    return make


# a block's linears in order get these bases in turn: every kind in every family's first block, and float too
BASES = [Int8Linear.from_linear, NF4Linear.from_linear, ggml(Q8_0), None, ggml(Q4_0)]


def quantize_mixed(model: nn.Module) -> None:
    for block in model.transformer_blocks():
        linears = [(n, m) for n, m in block.named_modules() if type(m) is nn.Linear]
        for i, (name, linear) in enumerate(linears):
            make = BASES[i % len(BASES)]
            if make is not None:
                parent, _, attr = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, attr, make(linear))


def tiny(family: str, quantized: bool = False, layers: int = 2, **lora) -> nn.Module:
    torch.manual_seed(0)
    config = dict(FAMILIES[family])
    config[next(k for k in ("n_layer", "num_hidden_layers", "n_layers") if k in config)] = layers
    model = build_model(config)
    if quantized:
        quantize_mixed(model)
    apply_lora(model, "all-linear", r=4, alpha=8, **lora)
    with torch.no_grad():  # B not zero: every path carries a signal and a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def block_inputs(model: nn.Module, mask: torch.Tensor) -> tuple:
    """What the first block is called with in an eager forward over a batch with this mask."""
    seen = {}

    def keep(module, args):
        seen.setdefault("args", args)
    handle = model.transformer_blocks()[0].register_forward_pre_hook(keep)
    with torch.no_grad():
        model(torch.randint(2, 97, mask.shape, generator=torch.Generator().manual_seed(0)), mask)
    handle.remove()
    return seen["args"]


def counting_backend():
    """An aot_eager-like backend counting the forward and backward graphs it compiles."""
    counts = {"forward": 0, "backward": 0}

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            counts[kind] += 1
            return make_boxed_func(gm.forward)
        return compile_graph
    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward")), counts


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    dynamo.utils.counters.clear()
    yield
    dynamo.reset()


CASES = {  # name: (settings for tiny(), the mask)
    "lora": (dict(), PADDED),  # the reported break: LoRAFunction given x twice when there is no dropout
    "qlora-dropout-packed": (dict(quantized=True, dropout=0.1), PACKED),
    "dora-qlora-dropout-packed": (dict(quantized=True, use_dora=True, dropout=0.1), PACKED),
    "dora": (dict(use_dora=True), PADDED),
}
SLOW = pytest.mark.slow  # the same code as the cases left in, in the families whose blocks are alike
MATRIX = [pytest.param(family, case, marks=SLOW if case.startswith("dora") and family not in ("llama", "gpt2", "bert")
                       or case == "dora" and family != "llama" else ())
          for family in FAMILIES for case in CASES]


@pytest.mark.parametrize("family, case", MATRIX)
def test_a_block_compiles_to_one_graph_forward_and_backward(family, case):
    settings, mask = CASES[case]
    if family in ENCODERS and mask is PACKED:
        mask = PADDED  # the encoders take padding masks only
    model = tiny(family, **settings)
    block = model.transformer_blocks()[0]
    args = block_inputs(model, mask)
    x = args[0].detach().requires_grad_()
    backend, counts = counting_backend()
    block.compile(backend=backend, dynamic=False)
    block(x, *args[1:]).square().sum().backward()
    assert dict(dynamo.utils.counters["graph_break"]) == {}
    assert counts == {"forward": 1, "backward": 1}
    assert x.grad is not None and all(p.grad is not None for n, p in block.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_explain_finds_no_break(family):
    model = tiny(family, quantized=True, dropout=0.1)
    block = model.transformer_blocks()[0]
    explained = dynamo.explain(block)(*block_inputs(model, PADDED))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def train_losses(model: nn.Module, batches: list[dict], steps: int = 3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for batch in batches[:steps]:
        loss, count = causal_lm_loss(model, batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item() / count)
    return losses


def batches_of_lengths(seed: int = 0) -> list[dict]:
    """Three micro-batches of different lengths (the longest example decides), each padded."""
    data = examples(n=12, seed=seed)
    data.sort(key=lambda e: len(e.input_ids))
    return [collate(data[i:i + 4], pad_id=0) for i in (8, 0, 4)]


@pytest.mark.parametrize("family", ["llama", "gpt2", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_compiled_training_equals_eager_and_new_lengths_compile_nothing(family):
    batches = batches_of_lengths()
    assert len({b["input_ids"].shape[1] for b in batches}) == 3
    eager = tiny(family, layers=3)
    compiled = copy.deepcopy(eager)
    backend, counts = counting_backend()
    compile_blocks(compiled, backend=backend)
    expected, got = train_losses(eager, batches[:1]), train_losses(compiled, batches[:1])
    after_first = dict(counts)
    expected += train_losses(eager, batches[1:])
    got += train_losses(compiled, batches[1:])
    assert counts == after_first, "a new micro-batch length compiled again"
    # one graph for the first block (its input needs no gradient), one the other two share (Gemma: one a kind)
    assert after_first["forward"] == (3 if family == "gemma2" else 2)
    assert max(abs(a - b) for a, b in zip(expected, got)) <= 1e-5, (expected, got)
    assert dict(dynamo.utils.counters["graph_break"]) == {}
    for p, q in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_inductor_training_equals_eager():
    batches = batches_of_lengths(seed=1)
    eager = tiny("gpt2", layers=1)
    compiled = compile_blocks(copy.deepcopy(eager))  # the default backend: inductor, generated C++
    expected, got = train_losses(eager, batches, 2), train_losses(compiled, batches, 2)
    assert max(abs(a - b) for a, b in zip(expected, got)) <= 1e-5, (expected, got)


def test_gradient_checkpointing_over_compiled_blocks():
    batch = batches_of_lengths()[0]
    eager = tiny("llama")
    compiled = copy.deepcopy(eager)
    compiled.model.gradient_checkpointing = True
    backend, counts = counting_backend()
    compile_blocks(compiled, dynamic=False, backend=backend)
    for model in (eager, compiled):
        loss, _ = causal_lm_loss(model, batch)
        loss.backward()
    assert counts["forward"] >= 1 and dict(dynamo.utils.counters["graph_break"]) == {}
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_compile_blocks_keeps_every_name_and_each_family_names_its_blocks():
    for entry in MODEL_TYPES.values():
        for cls in entry.values() if isinstance(entry, dict) else [entry]:
            assert isinstance(cls.blocks, str), cls.__name__
    for family in FAMILIES:
        model = tiny(family)
        names = list(model.state_dict())
        compile_blocks(model, backend="eager")
        assert list(model.state_dict()) == names
        assert all(block._compiled_call_impl is not None for block in model.transformer_blocks())


def test_train_with_compile_equals_eager_and_the_compiled_model_still_generates(saved_tiny, tmp_path, monkeypatch, capsys):
    """[train] compile = true: train() compiles each block before the first step and says what that step took;
    the losses, the adapter and then greedy generation with the KV cache (after training, as the CLI's
    before/after comparison does) equal an eager run's. aot_eager stands in for inductor here (same graphs,
    no C++ to build on 2 cores; inductor's own training equality is test_inductor_training_equals_eager)."""
    import functools

    import minilora.models.compile as compiling
    from conftest import Tok, lora_model
    from minilora.generate import generate_ids
    from minilora.training.loop import TrainConfig, train
    monkeypatch.setattr(compiling, "compile_blocks", functools.partial(compile_blocks, backend="aot_eager"))
    runs = {}
    for compiled in (False, True):
        model = lora_model(saved_tiny, "llama-gqa")
        cfg = TrainConfig(output_dir=str(tmp_path / str(compiled)), max_steps=4, micro_batch_size=2, batch_size=4,
                          lr=1e-2, compile=compiled, progress=False)
        history = train(model, Tok, examples(12), None, cfg).history
        with torch.no_grad():
            new = generate_ids(model, [[5, 9, 13], [3, 8, 21, 60, 7]], [1], 0, max_new_tokens=6)
        runs[compiled] = ([h["loss"] for h in history], dict(model.named_parameters()), new)
    (eager_losses, eager_params, eager_new), (losses, params, new) = runs[False], runs[True]
    assert max(abs(a - b) for a, b in zip(eager_losses, losses)) <= 1e-5, (eager_losses, losses)
    for name, p in eager_params.items():
        if "lora_" in name:
            assert torch.allclose(p, params[name], atol=1e-5), name
    assert new == eager_new
    assert re.search(r"compile = true: the first step took \d+\.\d s, compiling included", capsys.readouterr().out)
    assert dict(dynamo.utils.counters["graph_break"]) == {}
