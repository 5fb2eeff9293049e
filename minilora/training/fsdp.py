"""Fully sharded data parallelism (TrainConfig.fsdp): PyTorch's own FSDP2 (`fully_shard`) around LoRA.

Data parallelism (distributed.py) keeps the whole frozen model on every rank; for a base bigger than
one device that is the limit. Under FSDP2 each rank keeps only its 1/N slice (along the first dim) of
every weight, the frozen base's included. Each transformer block is its own unit: just before its
forward (and again before its backward) its slices are all-gathered into whole weights, which are
dropped again right after; the root unit holds what lies outside the blocks (the embeddings, the last
norm, the head). The frozen base is thereby gathered but never reduced: only the LoRA parameters have
gradients, which FSDP reduce-scatters, so each rank ends a step holding the gradient slice of its own
parameter slices, and AdamW updates those slices alone (its moments are sharded alike).

What stays as in the data-parallel path, so that a run equals one process running the whole batch:
  - the gradients are summed over the ranks (FSDP's divide factor set to 1, and sums only, which gloo
    needs) and divided once by the target count of the whole step, not averaged per rank;
  - the reduce-scatter runs once a step, after the last micro-batch (`set_requires_gradient_sync`);
  - the clipping norm is the norm of the whole gradient, over every rank's slices.
Every rank must take part in every all-gather: so every rank runs the same number of forward passes
in a step (a rank short of micro-batches runs a stand-in whose loss counts zero times) and in an
evaluation (the evaluation set is padded with rows that have no target).

The adapter is saved from whole tensors (each gathered with DTensor.full_tensor(), LoRA only, never
the base), by rank 0, in PEFT's format: the same file a single process writes. A checkpoint holds
every rank's optimizer slice, one file each (optimizer-rank<r>.pt), so it resumes only under the same
number of processes (checkpoint.py refuses any other, by name).

A quantized base (int8, NF4) shards too: its layers' scales and codes, buffers that FSDP would leave
whole on every rank, are made frozen parameters, and each quantized layer is its own unit (gathered
for its own forward and backward), so that under bf16 its fp32 scales are not cast.

A model loaded in placeholders (load_model(..., shard=True)) is sharded on `meta` and then filled,
each rank reading only its slices (fsdp_load.py).

The token embedding and the output head are units of their own too, gathered only while used: in the
root unit they would stay whole from the first block's forward to the last one's backward (for
Qwen2.5-1.5B, 0.43 GiB of its 2.88 on every rank, however many ranks): fsdp_head.py. On CPU, freed
gathers are returned to the system at once (_return_freed_blocks). After the run the model is handed
back whole on every rank where that fits; where it does not (a base that needed FSDP to fit), it stays
sharded, and the command line loads base and adapter in one process for its samples.

With bf16, a mixed-precision policy gathers the weights in bf16 (half the traffic; the frozen weights
are cast once per gather, not per matmul) and reduces gradients in fp32 into the fp32 LoRA slices.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..data.records import IGNORE, Example
from ..errors import CheckpointError, ConfigError
from ..lora.layers import LoRALinear, is_adapter_tensor
from ..quant.base import QuantizedLinear
from ..quant.ggml import GGMLEmbedding, GGMLLinear
from . import distributed, fsdp_head, fsdp_load

# torch.distributed.fsdp and .tensor are imported by the functions that shard, not here (distributed.sharded_type)

LAUNCH = "torchrun --nproc_per_node N -m minilora train RECIPE (several machines: --nnodes, --node_rank, " \
         "--rdzv_backend c10d --rdzv_endpoint HOST:PORT)"


def refuse_without_torchrun() -> None:
    """fsdp = true in one process: named when the config is made, before anything loads."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise ConfigError(f"fsdp = true shards the model over several processes, but this is one process "
                          f"(WORLD_SIZE is {os.environ.get('WORLD_SIZE', 'unset')}): launch it with {LAUNCH}; "
                          "or set fsdp = false")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: those the model runs one by one through models.common.run_blocks, in the
    ModuleList of each module that offers gradient checkpointing (the flag run_blocks is called with)."""
    return [block for m in model.modules() if hasattr(m, "gradient_checkpointing")
            for child in m.children() if isinstance(child, nn.ModuleList) for block in child]


def refuse_what_cannot_shard(model: nn.Module, cfg, objective: Any) -> None:
    """What fsdp = true cannot train (yet), named before the model is sharded or anything written."""
    from .objectives import CausalLM
    if not cfg.fsdp:
        return
    if not blocks(model):
        raise ConfigError(f"fsdp = true: {type(model).__name__} has no transformer blocks to shard (FSDP shards the "
                          "blocks that a model runs through models.common.run_blocks, a ModuleList beside a "
                          "gradient_checkpointing flag; the encoders have none): train it with fsdp = false")
    kept = [n for n, m in model.named_modules() if _quantized(m) is GGMLLinear or isinstance(m, GGMLEmbedding)]
    if kept:
        raise ConfigError(f"fsdp = true with a base kept in a GGUF file's own blocks ({kept[0]}, ...; keep_quantized): "
                          "not sharded yet (its tied embedding and head share one byte table, which is not tested "
                          "under FSDP); load the GGUF dequantized (no keep_quantized), or an int8 / NF4 base, "
                          "or set fsdp = false")
    if not isinstance(objective, CausalLM):
        raise ConfigError(f"fsdp = true trains language modelling (objective causal_lm) for now, not "
                          f"{type(objective).__name__}: its reference passes and rollouts run a different number "
                          "of forward passes on each rank, and under FSDP every rank must take part in each; "
                          "set fsdp = false")
    if cfg.optim == "lorafa":
        raise ConfigError("fsdp = true with optim \"lorafa\": LoRA-FA projects B's gradient through the whole A, "
                          "which FSDP holds in slices; use optim \"adamw_torch\" or fsdp = false")
    if not distributed.rank_and_world()[1] > 1:
        raise ConfigError(f"fsdp = true, but torch.distributed holds no process group of several ranks: launch "
                          f"with {LAUNCH}, and in a script of your own call distributed.init_from_env(device) "
                          "before train()")


def shard(model: nn.Module, cfg, bf16: bool) -> None:
    """With cfg.fsdp: fully_shard each block, then the root (what lies outside the blocks); gradients are
    summed, not averaged, over the ranks."""
    if not cfg.fsdp:
        return
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    if next(model.parameters()).device.type == "cpu":
        _return_freed_blocks()
    reader = fsdp_load.pending(model)  # a model loaded in placeholders (shard=True): its slices read below
    adapter = fsdp_load.to_meta(model) if reader is not None else {}
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for p in model.parameters():  # GPT-2's Conv1D weights are transposed views; FSDP slices rows of storage
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    for block in blocks(model):
        for layer in _state_made_parameters(block):  # its own unit: its fp32 scales are never cast to bf16
            fully_shard(layer, mp_policy=MixedPrecisionPolicy())
        fully_shard(block, mp_policy=policy)
    fsdp_head.shard_embedding_and_head(model, policy)
    fully_shard(model, mp_policy=policy)
    if reader is not None:
        fsdp_load.fill(model, reader, adapter, next(iter(adapter.values())).device)
    if hasattr(model, "hidden_states"):  # the fused head loss calls it in place of forward: gather there too
        register_fsdp_forward_method(model, "hidden_states")
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # gloo has no pre-multiplied sum; 1 needs none
            m.set_force_sum_reduction_for_comms(True)


def _return_freed_blocks() -> None:
    """glibc's malloc keeps freed blocks below its mmap threshold for reuse, and raises that threshold to
    the size of each large block freed (up to 32 MB): the gathered weights of the blocks, freed after each
    use, are of those sizes, and a step's gathers stayed resident, about one whole model per rank (a
    Qwen2.5-1.5B shape on 2 ranks: 4.65 GiB peak per rank, against 3.15 GiB with this). A fixed threshold
    of 1 MiB returns every block larger than that when it is freed (the next gather faults its pages in
    again: a small cost beside the all-gather). Left as it is where the user set MALLOC_MMAP_THRESHOLD_,
    and where the C library is not glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _quantized(m: nn.Module) -> type[QuantizedLinear] | None:
    """The quantized base class whose product `m` computes (itself, or the base a LoRALinear wraps)."""
    return type(m) if isinstance(m, QuantizedLinear) else m.quantized if isinstance(m, LoRALinear) else None


def _state_made_parameters(block: nn.Module) -> list[nn.Module]:
    """The quantized layers of a block, each one's scales and codes (the buffers its product reads, `state`)
    made frozen parameters in place, so that FSDP shards and gathers them with the packed weight (a
    parameter already); a 0-dim one (NF4's absmax offset: FSDP shards dim 0) stays a buffer, whole."""
    layers = []
    for m in block.modules():
        kind = _quantized(m)
        if kind is None:
            continue
        for name in kind.state:
            t = m._buffers.get(name)
            if t is not None and t.dim() > 0:
                del m._buffers[name]
                m.register_parameter(name, nn.Parameter(t, requires_grad=False))
        layers.append(m)
    return layers


def is_sharded(model: nn.Module) -> bool:
    return distributed.sharded_type("FSDPModule", model)


def accumulate(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], objective: Any, bf16: bool = False,
               done: Callable[[int], None] | None = None) -> tuple[float, int, dict[str, float]]:
    """gradients.accumulate under FSDP, handed all the step's micro-batches: this rank runs micro-batches
    rank, rank + N, ...; every rank makes the same number of passes (a rank short of one runs the first
    micro-batch again, its loss times zero), gradients are reduce-scattered after the last, and the
    summed gradient, loss and metrics are divided by the whole step's count."""
    from .gradients import _check_what_loss_returned, _tokens
    rank, world = distributed.rank_and_world()
    mine, turns = micro_batches[rank::world], math.ceil(len(micro_batches) / world)
    device = next(model.parameters()).device
    total, count, sums = 0.0, 0, dict.fromkeys(objective.metrics, 0.0)
    for i in range(turns):
        model.set_requires_gradient_sync(i == turns - 1)
        batch = mine[i] if i < len(mine) else micro_batches[0]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, n, metrics = objective.loss(model, batch)
        _check_what_loss_returned(objective, loss, n, metrics, sums)
        if i >= len(mine):  # a stand-in: its all-gathers pair with the other ranks', its gradient is zero
            (loss * 0.0).backward()
            continue
        loss.backward()
        total, count = total + float(loss.detach()), count + n
        for name, value in metrics.items():
            sums[name] += float(value)
        if done is not None:
            done(_tokens(batch))
    for _ in range(len(micro_batches) - len(mine)) if done is not None else ():
        done(0)  # the other ranks' micro-batches: the bar moves a whole step
    summed = torch.tensor([total, count, *sums.values()], dtype=torch.float64, device=device)
    distributed.sum_across_ranks([summed])
    total, count = float(summed[0]), int(round(float(summed[1])))
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(max(count, 1))
    return total / max(count, 1), count, {name: float(v) / max(count, 1) for name, v in zip(sums, summed[2:])}


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ for plain or sharded gradients: the norm of the whole gradient over every rank's
    slices (a sharded norm is a partial one until reduced), each gradient scaled by the same factor."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if distributed.sharded_type("DTensor", norm):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def with_empty_rows(data: list[Example], world: int) -> list[Example]:
    """The evaluation set padded to a multiple of `world` with rows that have no target (they add 0 to
    the loss and its count): every rank then evaluates as many batches as every other."""
    extra = -len(data) % world
    return data + [Example(data[0].input_ids, [IGNORE] * len(data[0].input_ids)) for _ in range(extra)]


def _adapter_params(model: nn.Module) -> dict[int, nn.Parameter]:
    """{id: parameter} of what an adapter file holds: LoRA's tensors and whatever trains (modules_to_save)."""
    return {id(p): p for n, p in model.named_parameters(remove_duplicate=False)
            if distributed.sharded_type("DTensor", p) and (p.requires_grad or is_adapter_tensor(n))}


@contextlib.contextmanager
def whole_adapter(model: nn.Module) -> Iterator[None]:
    """While the block runs (entered on every rank), the adapter's parameters are whole tensors (the
    frozen base stays sharded), so the adapter code reads and writes them as in one process: saving one
    (rank 0 writes), loading one into them (every rank). On exit, each rank's slices take the values
    they hold. A model that is not sharded is left as it is."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.tensor import distribute_tensor
    for m in model.modules():
        if is_sharded(m):
            m.reshard()  # sharded everywhere, so FSDP's state-dict hook has nothing to swap back
    sharded = _adapter_params(model)
    whole = {i: nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
             for i, p in sharded.items()}
    held = [(m, name, id(p)) for m in model.modules() for name, p in m._parameters.items() if id(p) in sharded]
    for m, name, i in held:
        m._parameters[name] = whole[i]
    try:
        yield
    finally:
        now = {i: m._parameters[name] for m, name, i in held}  # a load may have put new tensors in
        with torch.no_grad():
            for i, p in sharded.items():
                p.to_local().copy_(distribute_tensor(now[i].detach().to(p.dtype), p.device_mesh, p.placements,
                                                     src_data_rank=None).to_local())
        for m, name, i in held:
            m._parameters[name] = sharded[i]


def optimizer_shard(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state_dict with this rank's slices as plain CPU tensors (what a file can hold)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: v.to_local().cpu() if distributed.sharded_type("DTensor", v) else v
                          for k, v in moments.items()}
                      for i, moments in state["state"].items()}
    return state


def as_sharded(optimizer: torch.optim.Optimizer, state: Any, file: os.PathLike) -> Any:
    """optimizer_shard's state made DTensors again, as this rank's slices of the run's parameters (each
    of the slice's shape, or a CheckpointError naming the file)."""
    from torch.distributed.tensor import DTensor
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        for i, moments in state["state"].items():
            for key, value in moments.items():
                p = params[i]
                if not (isinstance(p, DTensor) and isinstance(value, torch.Tensor) and value.dim()):
                    continue
                if value.shape != p.to_local().shape:
                    raise CheckpointError(f"{file}: {key} of parameter {i} is a slice of shape {tuple(value.shape)}, "
                                          f"this rank's slice {tuple(p.to_local().shape)}")
                moments[key] = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements, run_check=False,
                                                  shape=p.shape, stride=p.stride())
    except (KeyError, TypeError, IndexError, AttributeError):
        raise CheckpointError(f"{file}: not the optimizer state of this run's parameters") from None
    return state


def gather_for_the_caller(model: nn.Module) -> None:
    """After the run: every weight whole on every rank (in the compute dtype; the adapter in its own), and
    kept so, so that the model runs with no collective (rank 0 generating alone, after the process
    group is gone), as the model handed to train() did. Its FSDP wrapping stays: model.state_dict()
    would shard it again (FSDP's hook), so save it with save_adapter before, not after, a state_dict.
    A model that is not sharded is left as it is."""
    if not is_sharded(model):
        return
    if not _agreed(_whole_fits(model), next(model.parameters()).device):
        if distributed.is_main():
            print(f"fsdp: the trained model stays sharded over the ranks: whole on each of them it would take "
                  f"{_whole_bytes(model) / 2**30:.1f} GiB per rank, more than this machine has free (the adapter is "
                  "saved; load it onto the base in one process to generate: minilora generate --adapter ...)")
        return
    with whole_adapter(model):
        adapter = {(id(m), name): p for m in model.modules() for name, p in m._parameters.items()
                   if p is not None and not distributed.sharded_type("DTensor", p)}
    for m in model.modules():
        if is_sharded(m):
            m.set_reshard_after_forward(False)
            m.set_reshard_after_backward(False)
            m.unshard()
    for m in model.modules():
        for name in list(m._parameters):
            if (id(m), name) in adapter:
                m._parameters[name] = adapter[(id(m), name)]
    # FSDP's wrapper of hidden_states (shard()) ends the state of a forward that calls it (forward does),
    # and that forward's end then reshards the root: without the wrapper, gathered is gathered for good
    model.__dict__.pop("hidden_states", None)
    fsdp_head.restore_heads(model)


def left_sharded(model: nn.Module) -> bool:
    """Whether train() left `model` sharded (gather_for_the_caller found no room for it whole)."""
    return is_sharded(model) and any(distributed.sharded_type("DTensor", p) for p in model.parameters())


def _whole_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _whole_fits(model: nn.Module) -> bool:
    """Whether every rank of this machine can hold the model whole beside its slices: on CUDA in its own
    GPU's free memory, on CPU the processes on this machine (LOCAL_WORLD_SIZE) in its available memory
    (/proc/meminfo; elsewhere assumed)."""
    need = _whole_bytes(model)
    device = next(model.parameters()).device
    if device.type == "cuda":
        return need <= 0.9 * torch.cuda.mem_get_info(device)[0]
    try:
        available = int(open("/proc/meminfo").read().split("MemAvailable:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return True
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * need <= 0.9 * available


def _agreed(fits: bool, device: torch.device) -> bool:
    """True only if every rank says so (the gathers are collective: all ranks do them or none)."""
    votes = torch.tensor([0.0 if fits else 1.0], dtype=torch.float64, device=device)
    distributed.sum_across_ranks([votes])
    return float(votes[0]) == 0.0
