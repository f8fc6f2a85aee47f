"""Pure-PyTorch self-supervised models: encoders, heads, objectives and methods.

Never imports Ray. A method is an ``nn.Module`` whose ``forward(batch)`` returns a dict with a
scalar ``"loss"`` (the interface: :class:`ssl_models.protocol.Method`); each method class declares
what the platform needs to know about it in ``spec`` (:class:`ssl_models.spec.MethodSpec`).
``METHODS`` maps a name to its class and ``build_method`` builds one.
"""

from __future__ import annotations

from torch import nn

from ssl_models import distributed, losses
from ssl_models.methods import BERT, BYOL, CLIP, CPC, DINO, GPT, BarlowTwins, RotNet, SigLIP, SimCLR, VICReg
from ssl_models.protocol import Method
from ssl_models.spec import MethodSpec, spec_problems

# What each method eats (batch keys), its data kind and the rest are in its ``spec``; the
# platform's data pipeline produces those batches.
METHODS: dict[str, type[nn.Module]] = {
    "clip": CLIP,            # image-caption: "image", "text"
    "siglip": SigLIP,        # image-caption
    "simclr": SimCLR,        # two views: "view1", "view2"
    "byol": BYOL,            # two views
    "barlow_twins": BarlowTwins,  # two views
    "vicreg": VICReg,        # two views
    "rotnet": RotNet,        # one view: "view1", rotated four ways in forward
    "dino": DINO,            # multi-crop: "view1", "view2" global, "view3".."view6" local
    "cpc": CPC,              # audio: "audio" (+ "lengths")
    "bert": BERT,            # text: "input_ids", "mlm_labels", "nsp_labels", ...
    "gpt": GPT,              # text: "input_ids" (+ "attention_mask")
}


def build_method(name: str, **kwargs) -> nn.Module:
    """Build the method registered as ``name`` with ``kwargs`` passed to its constructor."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](**kwargs)


__all__ = ["BERT", "BYOL", "CLIP", "CPC", "DINO", "GPT", "METHODS", "BarlowTwins", "Method", "MethodSpec", "RotNet",
           "SigLIP", "SimCLR", "VICReg", "build_method", "distributed", "losses", "spec_problems"]
