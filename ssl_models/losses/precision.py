"""The precision losses run in: float32 even under bf16/fp16 autocast, float64 kept."""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is bf16/fp16 (autocast), unchanged if float32 or float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
