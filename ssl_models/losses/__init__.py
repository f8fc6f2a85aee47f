"""Objectives: small modules that take embeddings (or logits) and return a scalar loss.

| loss | method | gathers across ranks |
|---|---|---|
| ``NTXentLoss`` | SimCLR | negatives (local anchors x all candidates) |
| ``CLIPLoss`` | CLIP | negatives (local images x all texts, and back) |
| ``SigLIPLoss`` | SigLIP | negatives (local images x all texts) |
| ``CPCLoss`` | CPC | negatives (local contexts x all frames) |
| ``BarlowTwinsLoss``, ``VICRegLoss`` | Barlow Twins, VICReg | the whole batch's statistics |
| ``BYOLLoss`` | BYOL | nothing: a per-sample regression |
| ``DINOLoss`` | DINO | the centre: the teacher's mean over the global batch, once per step |
| ``MaskedLMLoss``, ``NSPLoss``, ``CausalLMLoss`` | BERT, GPT | nothing: per-token cross-entropy |

Losses run in float32 even under bf16 autocast and keep float64 (the exactness tests): a method
raises its embeddings with :func:`ssl_models.losses.precision.at_least_fp32` before a loss.
"""

from ssl_models.losses.barlow_twins import BarlowTwinsLoss
from ssl_models.losses.byol import BYOLLoss
from ssl_models.losses.clip import CLIPLoss
from ssl_models.losses.cpc import CPCLoss
from ssl_models.losses.dino import DINOLoss
from ssl_models.losses.ntxent import NTXentLoss
from ssl_models.losses.siglip import SigLIPLoss
from ssl_models.losses.tokens import CausalLMLoss, MaskedLMLoss, NSPLoss
from ssl_models.losses.vicreg import VICRegLoss

__all__ = ["BYOLLoss", "BarlowTwinsLoss", "CLIPLoss", "CPCLoss", "CausalLMLoss", "DINOLoss", "MaskedLMLoss", "NSPLoss",
           "NTXentLoss", "SigLIPLoss", "VICRegLoss"]
