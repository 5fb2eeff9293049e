"""How an adapter starts: PEFT's `init_lora_weights`, on a linear layer's fresh adapter.

    True        A Kaiming-uniform (as nn.Linear is), B = 0: the layer starts equal to its base (Hu et al. 2021)
    False       A and B both Kaiming-uniform: the layer starts changed (for tests of merging and saving)
    "gaussian"  A ~ N(0, 1/r²), B = 0
    "pissa"     Meng et al. 2024: W = U S Vᵀ; with S_r the top r singular values over the scaling s,
                B = U_r √S_r, A = √S_r V_rᵀ, and the base keeps the residual W − s·B A, so the layer
                starts equal to W and the adapter trains the principal directions
    "pissa_niter_K"  the same from torch.svd_lowrank(W, r, niter=K) (fast, approximate, random)
    "olora"     Büyükakyüz 2024: W = Q R; B = Q_r (orthonormal columns), A = R_r (its first r rows), the
                base keeps W − s·B A

PiSSA and OLoRA change the base weight, so they need the base in floating point here (a quantized
base would have to be requantized: LoftQ's job). The factorisations run in fp32 and the results are
cast back to the weight's and the adapter's dtypes, as PEFT does. SVD signs: torch.linalg.svd, as
PEFT calls it, so the same weights give the same A and B.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..errors import ConfigError

CHANGES_THE_BASE = ("pissa", "olora")  # prefixes: pissa_niter_K too
LATER = {"loftq": "LoftQ (quantizing the residual of an SVD) is not supported yet",
         "corda": "CorDA is not supported", "eva": "EVA is not supported", "lora_ga": "LoRA-GA is not supported"}


def check_init(value: object) -> bool | str:
    """`init_lora_weights` as PEFT spells it, or a ConfigError saying what is accepted."""
    if isinstance(value, bool) or value in ("gaussian", "pissa", "olora"):
        return value
    if isinstance(value, str) and re.fullmatch(r"pissa_niter_[1-9][0-9]*", value):
        return value
    if isinstance(value, str) and value.lower() in LATER:
        raise ConfigError(f"init_lora_weights {value!r}: {LATER[value.lower()]}")
    raise ConfigError(f"init_lora_weights must be true, false, \"gaussian\", \"pissa\", \"pissa_niter_K\" "
                      f"(K a positive number of iterations) or \"olora\", got {value!r}")


def changes_the_base(value: bool | str) -> bool:
    return isinstance(value, str) and value.startswith(CHANGES_THE_BASE)


def check_base(how: bool | str, quantized: bool, use_dora: bool) -> None:
    """A ConfigError where `how` would change a base it cannot: a quantized one, or under DoRA."""
    if changes_the_base(how) and quantized:
        raise ConfigError(f"init_lora_weights {how!r} changes the base weight, which is quantized here: "
                          "load the base in floating point to initialise")
    if changes_the_base(how) and use_dora:
        raise ConfigError(f"init_lora_weights {how!r} with use_dora is not supported")


def factors(w: torch.Tensor, r: int, scaling: float, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) in fp32 that PiSSA or OLoRA start an adapter of rank r and scaling s from, for weight w (d×k)."""
    w = w.to(torch.float32)
    if how == "olora":
        q, upper = torch.linalg.qr(w)
        return q[:, :r], upper[:r]
    if how == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, r, niter=int(how.rsplit("_", 1)[1]))
        vh = v.t()
    root = torch.sqrt(s / scaling)
    return u * root, root[:, None] * vh


@torch.no_grad()
def keep_the_residual(layer: nn.Module, adapter: str, b: torch.Tensor, a: torch.Tensor) -> None:
    """The layer's base weight becomes W − s·B A (in the weight's dtype)."""
    s = layer.adapters[adapter].scaling
    layer.weight.data = (layer.weight.to(torch.float32) - s * (b.float() @ a.float())).to(layer.weight.dtype)


@torch.no_grad()
def initialise(layer: nn.Module, adapter: str, how: bool | str) -> None:
    """Give `layer.adapters[adapter]` (a LoRALinear's, just made) its starting A and B; PiSSA and OLoRA
    also replace the layer's base weight by the residual."""
    a = layer.adapters[adapter]
    A, B = a.lora_A.weight, a.lora_B.weight
    if how is True:
        return  # the adapter's own: Kaiming-uniform A, zero B
    if how is False:
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        return
    if how == "gaussian":
        nn.init.normal_(A, std=1 / a.r)
        return
    b, a_ = factors(layer.weight, a.r, a.scaling, how)
    A.copy_(a_)
    B.copy_(b)
    keep_the_residual(layer, adapter, B, A)
