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
    "loftq"     Li et al. 2023 (LoftQ, alg. 1): the base becomes Q, W quantized (NF4 or int8, loftq_config),
                and B A the best rank-r fit of W − Q, alternating: Q = quant(W − B A), then (B, A) from
                the SVD of W − Q, loftq_iter times; the layer starts at Q + s·B A ≈ W where s = 1

PiSSA and OLoRA change the base weight and LoftQ quantizes it, so all three need the base in floating
point here (a base quantized already would have to be requantized). The factorisations run in fp32 and
the results are cast back to the weight's and the adapter's dtypes, as PEFT does. SVD signs:
torch.linalg.svd, as PEFT calls it, so the same weights give the same A and B.

LoftQ as PEFT has it (peft.utils.loftq_utils.loftq_init): B = U_r √S_r and A = √S_r V_rᵀ are not
divided by the scaling s (PiSSA's are), so the start is ≈ W only when alpha/r = 1; a warning says so
otherwise. PEFT quantizes with bitsandbytes' NF4 with fp32 absmaxes and keeps Q in floating point;
here Q is what the layer then computes with: an NF4Linear (QLoRA's double-quantized absmaxes) or an
Int8Linear, holding the codes of the last quantization, so the adapter fits the base it trains beside.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..quant.int8 import int8_round_trip
from ..quant.nf4 import nf4_round_trip

CHANGES_THE_BASE = ("pissa", "olora")  # prefixes: pissa_niter_K too. The base keeps a float residual
LATER = {"corda": "CorDA is not supported", "eva": "EVA is not supported", "lora_ga": "LoRA-GA is not supported"}
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}  # PEFT's LoftQConfig
ROUND_TRIPS = {4: nf4_round_trip, 8: int8_round_trip}  # loftq_bits -> W ↦ (dequant(quant(W)), the quantized layer)
RoundTrip = Callable[[torch.Tensor], tuple[torch.Tensor, object]]


def check_init(value: object) -> bool | str:
    """`init_lora_weights` as PEFT spells it, or a ConfigError saying what is accepted."""
    if isinstance(value, bool) or value in ("gaussian", "pissa", "olora", "loftq"):
        return value
    if isinstance(value, str) and re.fullmatch(r"pissa_niter_[1-9][0-9]*", value):
        return value
    if isinstance(value, str) and value.lower() in LATER:
        raise ConfigError(f"init_lora_weights {value!r}: {LATER[value.lower()]}")
    raise ConfigError(f"init_lora_weights must be true, false, \"gaussian\", \"pissa\", \"pissa_niter_K\" "
                      f"(K a positive number of iterations), \"olora\" or \"loftq\", got {value!r}")


def check_loftq_config(value: object, how: bool | str) -> dict[str, int]:
    """PEFT's `loftq_config` ({"loftq_bits": 4 | 8, "loftq_iter": n >= 1}, or its LoftQConfig), with its
    defaults filled in; {} where `how` is not "loftq". A ConfigError for a missing or a stray one (PEFT:
    "`loftq_config` must be specified when `init_lora_weights` is 'loftq'"; it drops a stray one with a
    warning, here it is refused, as a setting that would do nothing)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # peft's LoftQConfig(...)
        value = dataclasses.asdict(value)
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"loftq_config must be a table {{loftq_bits = 4 or 8, loftq_iter = n}}, got {value!r}")
    if how != "loftq":
        if value:
            raise ConfigError(f"loftq_config is set but init_lora_weights is {how!r}: LoftQ runs only with "
                              "init_lora_weights = \"loftq\"; set both, or neither")
        return {}
    if not value:
        raise ConfigError("init_lora_weights 'loftq' needs loftq_config = {loftq_bits = 4 or 8, loftq_iter = n} "
                          "(PEFT's LoftQConfig): the bits the base is quantized to, the alternating steps")
    unknown = [k for k in value if k not in LOFTQ_DEFAULTS]
    if unknown:
        raise ConfigError(f"loftq_config: unknown key {unknown[0]!r}; its keys are {', '.join(LOFTQ_DEFAULTS)}")
    config = {**LOFTQ_DEFAULTS, **value}
    bits, iters = config["loftq_bits"], config["loftq_iter"]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ROUND_TRIPS:
        raise ConfigError(f"loftq_config.loftq_bits must be 4 (NF4) or 8 (int8), got {bits!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters <= 0:
        raise ConfigError(f"loftq_config.loftq_iter must be a positive integer (alternating quantize/SVD steps), "
                          f"got {iters!r}")
    return config


def changes_the_base(value: bool | str) -> bool:
    """PiSSA's and OLoRA's: the base keeps a float residual W − s·B A (LoftQ, which quantizes it, is not one)."""
    return isinstance(value, str) and value.startswith(CHANGES_THE_BASE)


def replaces_the_base(value: bool | str) -> bool:
    """Does the init put another base weight in W's place (a residual, or LoftQ's quantized Q)?"""
    return changes_the_base(value) or value == "loftq"


def check_base(how: bool | str, quantized: bool, use_dora: bool) -> None:
    """A ConfigError where `how` would change a base it cannot: a quantized one, or under DoRA."""
    if how == "loftq" and quantized:
        raise ConfigError("init_lora_weights 'loftq' quantizes the base weight, which is quantized already here "
                          "(int8, NF4 or GGUF blocks): load the base in floating point; LoftQ quantizes it")
    if changes_the_base(how) and quantized:
        raise ConfigError(f"init_lora_weights {how!r} changes the base weight, which is quantized here: "
                          "load the base in floating point to initialise")
    if replaces_the_base(how) and use_dora:
        raise ConfigError(f"init_lora_weights {how!r} with use_dora is not supported")


def check_loftq_target(in_features: int, loftq_config: dict[str, int]) -> None:
    """A ConfigError where LoftQ cannot quantize a layer to the bits asked: NF4 packs two codes a byte."""
    if loftq_config["loftq_bits"] == 4 and in_features % 2:
        raise ConfigError(f"init_lora_weights 'loftq' with loftq_bits 4: NF4 packs two codes a byte, so "
                          f"in_features must be even, not {in_features}: leave the layer out or use loftq_bits 8")


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
def loftq(weight: torch.Tensor, r: int, iters: int,
          round_trip: RoundTrip) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """LoftQ (Li et al. 2023, alg. 1) on a weight W (d×k), in fp32: (Q, A, B, stored) with Q + B A ≈ W.

    Each of `iters` steps quantizes what the adapter does not hold, Q = round_trip(W − B A) (B A = 0 at
    first), then refits B A to the quantization error, the rank-r SVD of W − Q. round_trip(w) returns
    (dequant(quant(w)) in fp32, what the quantizer stored): `stored` of the last step comes back, the
    base whose Q this is."""
    w = weight.detach().to(torch.float32)
    residual = w
    for _ in range(iters):
        q, stored = round_trip(residual)
        b, a = factors(w - q, r, 1.0, "pissa")  # U_r √S_r, √S_r V_rᵀ: undivided by the scaling, as PEFT's
        residual = w - b @ a
    return q, a, b, stored


@torch.no_grad()
def loftq_base(layer: nn.Module, adapter: str, loftq_config: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ on a LoRALinear's float base W: the layer's base becomes the quantized Q (NF4Linear for
    loftq_bits 4, Int8Linear for 8, holding the codes of the last quantization); returns (A0, B0), the
    adapter's start, in fp32, and leaves the adapter as it is. Deterministic (no random draw), so the
    base a LoftQ adapter was trained beside is rebuilt from the original float base: load_adapter
    calls this, then keeps the trained A and B."""
    config = check_loftq_config(loftq_config, "loftq")
    a = layer.adapters[adapter]
    check_base("loftq", layer.quantized is not None, a.use_dora)
    check_loftq_target(layer.in_features, config)
    _, a0, b0, base = loftq(layer.weight, a.r, config["loftq_iter"], ROUND_TRIPS[config["loftq_bits"]])
    layer.set_base(base)
    return a0, b0


@torch.no_grad()
def initialise(layer: nn.Module, adapter: str, how: bool | str, loftq_config: dict[str, int] | None = None) -> None:
    """Give `layer.adapters[adapter]` (a LoRALinear's, just made) its starting A and B; PiSSA and OLoRA
    also replace the layer's base weight by the residual, LoftQ by its quantization Q."""
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
    if how == "loftq":
        if not math.isclose(a.scaling, 1.0):
            warnings.warn(f"init_lora_weights 'loftq' with the LoRA scaling {a.scaling:g} (alpha / r), not 1: the "
                          f"layer starts at Q + {a.scaling:g}·B A, not ≈ W, since B A fits W − Q unscaled (as "
                          "PEFT's LoftQ does); set alpha = r (alpha = √r with use_rslora) for LoftQ's start",
                          stacklevel=2)
        a_, b = loftq_base(layer, adapter, loftq_config)
        A.copy_(a_)
        B.copy_(b)
        return
    b, a_ = factors(layer.weight, a.r, a.scaling, how)
    A.copy_(a_)
    B.copy_(b)
    keep_the_residual(layer, adapter, B, A)
