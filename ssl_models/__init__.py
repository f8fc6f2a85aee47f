"""Pure-PyTorch self-supervised models: encoders, heads, objectives and methods.

Never imports Ray. A method is an ``nn.Module`` whose ``forward(batch)`` returns a dict with a
scalar ``"loss"``; ``METHODS`` maps a name to its class and ``build_method`` builds one.
"""

from __future__ import annotations

from torch import nn

from ssl_models import distributed, losses
from ssl_models.methods import SimCLR

METHODS: dict[str, type[nn.Module]] = {"simclr": SimCLR}


def build_method(name: str, **kwargs) -> nn.Module:
    """Build the method registered as ``name`` with ``kwargs`` passed to its constructor."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](**kwargs)


__all__ = ["METHODS", "SimCLR", "build_method", "distributed", "losses"]
