"""Which matrix products are fast on this device: the one place that asks.

On CUDA, and on CPUs with AMX or AVX-512 (VNNI, BF16), bf16 and int8 products run 1.5-4x faster than
fp32. On a CPU with AVX2 alone torch has no kernel for them and runs a plain loop, about 100x slower
than fp32 (seen on such a machine: int8 0.5 GFLOP/s, bf16 0.9, fp32 170). The training loop (bf16
autocast), the loader (a warning for bf16/fp16 weights) and the int8 layer (which kernel to call)
all decide by `matmul_is_fast`.

Memory, too, is a matter of the device: `release_freed_memory` hands freed memory back to the OS, and
`scratch` keeps the buffers a quantized product rewrites at every call instead.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings

import torch


@functools.lru_cache(maxsize=None)
def matmul_is_fast(dtype: torch.dtype, device_type: str) -> bool:
    """Does this machine multiply int8 (torch._int_mm) or bf16/fp16 matrices at least about as fast as fp32?

    Measured once per process on a small product: well under a millisecond where the kernel is fast,
    ~0.1 s where it is not."""
    if device_type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return True  # other accelerators: leave it to torch
    m, k, n = 64, 1024, 256
    if dtype == torch.int8:
        a, b = torch.randint(-127, 128, (m, k), dtype=torch.int8), torch.randint(-127, 128, (k, n), dtype=torch.int8)
        low = functools.partial(torch._int_mm, a, b)
    else:
        low = functools.partial(torch.mm, torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype))
    fp32 = functools.partial(torch.mm, torch.randn(m, k), torch.randn(k, n))

    def seconds(f) -> float:
        start = time.perf_counter()
        f()
        return time.perf_counter() - start
    try:
        low()
    except RuntimeError:
        return False
    fp32()
    return min(seconds(low) for _ in range(3)) <= 2 * min(seconds(fp32) for _ in range(3))


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """A bf16 setting (true, false or "auto") on this device. "auto" is on where bf16 matrix products
    are fast and off elsewhere; an explicit true is obeyed, with a warning where they are slow."""
    fast = matmul_is_fast(torch.bfloat16, device.type)
    if setting == "auto":
        return fast
    if setting and not fast:
        warnings.warn(f"bf16 = true on a {device.type} whose bf16 matrix products are much slower than fp32 "
                      f"(torch has no fast bf16 kernel for it: {_what_it_has(torch.bfloat16, device.type)}); "
                      "training will be slow. "
                      "Use bf16 = \"auto\" or false", stacklevel=3)
    return bool(setting)


def warn_if_slow(dtype: torch.dtype | None, device: torch.device | str, source: str) -> None:
    """Warn when weights are about to be held in bf16/fp16 on a device that multiplies them slowly."""
    device_type = torch.device(device).type
    if dtype in (torch.bfloat16, torch.float16) and not matmul_is_fast(dtype, device_type):
        warnings.warn(f"{source}: loading in {dtype} on a {device_type} whose {dtype} matrix products are much "
                      f"slower than fp32 ({_what_it_has(dtype, device_type)}); use float32", stacklevel=3)


# What a fast product of each dtype needs on a CPU; the flags (as /proc/cpuinfo names them) worth naming
_FAST_ON_CPU = {torch.bfloat16: "AVX-512 BF16 or AMX", torch.float16: "AVX-512 FP16 or AMX-FP16"}
_FEATURES = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"), ("avx512_bf16", "AVX-512 BF16"),
             ("avx512_fp16", "AVX-512 FP16"), ("amx_tile", "AMX"))


def _what_it_has(dtype: torch.dtype, device_type: str) -> str:
    """What the slow device has, said as it is: "this CPU has AVX2, AVX-512; fast float16 products need
    AVX-512 FP16 or AMX-FP16" (the measurement in matmul_is_fast decided; this only explains it)."""
    if device_type != "cpu":
        return f"no fast {dtype} kernel on this {device_type}"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    has = ", ".join(name for flag, name in _FEATURES if flag in flags) or "none of AVX2, AVX-512, AMX"
    need = _FAST_ON_CPU.get(dtype, "a kernel torch does not have here")
    return (f"this CPU has {has}" if flags else "this CPU's features are unknown") + \
        f"; fast {str(dtype).removeprefix('torch.')} products need {need}"



def release_freed_memory() -> None:
    """Hand memory freed by Python/torch back to the OS (glibc keeps it otherwise, and a quantizing load
    that frees one large tensor per step would see its resident size creep up by their sum)."""
    global _libc
    if _libc is None:
        try:
            import ctypes
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


_scratch = threading.local()


def scratch(name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat tensor of n elements to overwrite, the same one each time this thread asks for `name` in
    this dtype on a CPU (grown when n grows): for the temporaries a blockwise product makes at every
    call (dequantized rows, their fp32 or index steps). A fresh tensor of a few MB comes from the OS a
    page at a time, each page faulted in and zeroed: on the machines here that costs as much as the
    dequantization itself. The caller is done with it before it asks for `name` again; nothing it
    returns may be a view of it. On other devices the caching allocator already reuses memory: there
    it is a new tensor."""
    if torch.device(device).type != "cpu":
        return torch.empty(n, dtype=dtype, device=device)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (name, dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < n:
        buffers.pop(key, None)  # freed before the larger one is made
        buffer = buffers[key] = torch.empty(n, dtype=dtype)
    return buffer[:n]
