"""Data-parallel training with torch.distributed: the few collective steps `train` needs.

Under `torchrun --nproc_per_node N`, every process (rank) holds the whole model. In each step,
rank r runs micro-batches r, r+N, r+2N, ... of the step's batch; after its backward passes, one
all-reduce sums the gradients of the trainable parameters (LoRA's few MB, never the frozen model),
the summed loss and the target-token count over the ranks. Dividing by that global count gives
every rank the gradient one process would compute for the whole batch, so all ranks take the same
optimizer step and stay identical without ever sending weights.

Why not torch's DistributedDataParallel wrapper: it averages gradients over ranks, which is the
token-weighted mean only when every rank sees as many target tokens as the others, and it reduces
during every micro-batch's backward unless told not to. Summing once per step is exact and simpler.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError


def sharded_type(name: str, x: Any) -> bool:
    """isinstance(x, torch's FSDPModule or DTensor, by `name`) without importing torch.distributed.fsdp
    or .tensor (about a second of start-up that runs without fsdp and other commands need not pay): until
    a run shards (fsdp.py imports them), nothing is either."""
    module = sys.modules.get("torch.distributed.fsdp" if name == "FSDPModule" else "torch.distributed.tensor")
    return module is not None and isinstance(x, getattr(module, name))


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment) and return this
    rank's device: for a CUDA `device`, nccl with GPU number LOCAL_RANK (one GPU per rank); for a CPU
    one, gloo. Not launched distributed: `device` as it is."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device
    cuda = device.type == "cuda"
    if cuda:
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:
            raise ConfigError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on this "
                              f"machine but it has {gpus} GPU(s): one GPU per process, so --nproc_per_node {gpus} "
                              "at most (or train on the CPU: --model.device cpu)")
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        try:
            dist.init_process_group("nccl" if cuda else "gloo")
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but the process group cannot form "
                              f"({str(e).splitlines()[0]}): launch with torchrun") from None
    return device


def shutdown(wait: bool = True) -> None:
    """Leave the process group. With `wait`, first wait for every rank to get here: a rank that tore its
    gloo connections down while another still used them was seen to abort at exit (SIGABRT,
    "terminate called without an active exception", one run in four)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def sum_across_ranks(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its sum over all ranks, in place, sent as one flat message (in the widest
    of their dtypes, float32 at least)."""
    if rank_and_world()[1] == 1 or not tensors:
        return
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat)
    i = 0
    for t in tensors:
        t.copy_(flat[i:i + t.numel()].view_as(t))
        i += t.numel()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one (e.g. a stop request seen by one)."""
    if rank_and_world()[1] == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_from_main(tensors: list[torch.Tensor]) -> None:
    """Give every rank rank 0's values (the trainable parameters at the start, so all ranks agree)."""
    if rank_and_world()[1] > 1:
        for t in tensors:
            dist.broadcast(t.data, src=0)


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others (what rank 0 alone writes)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()
