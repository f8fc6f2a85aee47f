"""SigLIP: CLIP's towers trained with the pairwise sigmoid loss, a learnable scale and bias."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssl_models.losses.precision import at_least_fp32
from ssl_models.losses.siglip import SigLIPLoss
from ssl_models.methods.clip import (
    build_towers,
    encode_image,
    encode_text,
    image_text_pairs,
    retrieval_accuracy,
    tokenize,
)
from ssl_models.spec import MethodSpec


class SigLIP(nn.Module):
    """SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"): CLIP's image
    and text towers, but each image-caption pair of the batch is scored on its own with a
    sigmoid, positives against negatives, instead of a softmax over the batch.

    The towers, encoders and batch checks are CLIP's building blocks (``ssl_models.methods.clip``):
    open_clip's ViT (or ``ModifiedResNet``) and causal text transformer. The logits are
    ``exp(logit_scale) * cos(image, text) + logit_bias`` with both learnt, initialised as in the
    paper at ``logit_scale = log(10)`` and ``logit_bias = -10`` (the bias starts the model near
    the prior that almost every pair is a negative, so the first steps are not spent pushing
    down ``B^2 - B`` negatives). The scale is clamped to ``[0, log(max_logit_scale)]`` in place
    at the start of every ``forward``, as CLIP's is; the bias is free. The loss is
    ``SigLIPLoss`` on the L2-normalised embeddings, with the texts of every rank when asked.

    The scale is open_clip's ``logit_scale`` parameter inside ``towers``; the bias is a
    parameter of this module, so ``towers`` holds exactly what a CLIP's does.

    Args:
        in_channels, image_size, embed_dim, image_tower, vision_width, vision_layers,
        vision_heads, patch_size, resnet_layers, context_length, text_width, text_layers,
        text_heads: the towers, as for ``CLIP``.
        init_scale: initial ``exp(logit_scale)`` (the paper's ``t = exp(t')``, 10); learnt.
        init_bias: initial ``logit_bias`` (the paper's ``b``, -10); learnt.
        max_logit_scale: largest allowed ``exp(logit_scale)`` (100, as open_clip clamps).
        gather_distributed: score local images against the texts of all ranks.

    Shape:
        - batch["image"]: (B, in_channels, image_size, image_size) float.
        - batch["text"]: (B, context_length) int64 token ids from ``tokenize``.
        - ``forward`` output: ``"loss"`` (scalar, float32 under autocast), ``"logit_scale"``
          (detached ``exp`` of the clamped parameter), ``"logit_bias"`` (detached) and
          ``"image_text_acc"`` (detached top-1 retrieval accuracy among this rank's pairs).
        - ``encode_image`` / ``encode_text`` / ``embed`` output: (B, embed_dim), L2-normalised,
          float32 (float64 for a float64 model) even under autocast.

    Example:
        >>> siglip = SigLIP(in_channels=1, image_size=24)
        >>> out = siglip({"image": images, "text": siglip.tokenize(captions)})
        >>> out["loss"].backward()
    """

    spec = MethodSpec(
        display_name="SigLIP", data_kind="image-caption", batch_keys=("image", "text"), embeds=("image", "text"),
        online_metric="val_zero_shot_top1", online_mode="max",
        objective_keys=frozenset({"init_scale", "init_bias", "max_logit_scale", "gather_distributed"}),
        derived=("in_channels", "image_size"), accumulation="gradcache")

    def __init__(self, in_channels: int = 3, image_size: int = 32, embed_dim: int = 64,
                 image_tower: str = "vit", vision_width: int = 64, vision_layers: int = 2,
                 vision_heads: int = 4, patch_size: int = 4, resnet_layers: Sequence[int] = (1, 1, 1, 1),
                 context_length: int = 32, text_width: int = 64, text_layers: int = 2, text_heads: int = 4,
                 init_scale: float = 10.0, init_bias: float = -10.0, max_logit_scale: float = 100.0,
                 gather_distributed: bool = False):
        super().__init__()
        if not 1 <= init_scale <= max_logit_scale:
            raise ValueError(f"need 1 <= init_scale <= max_logit_scale, got init_scale={init_scale}, "
                             f"max_logit_scale={max_logit_scale}")
        self.in_channels, self.image_size, self.context_length = in_channels, image_size, context_length
        self.embed_dim = embed_dim
        self.max_log_scale = math.log(max_logit_scale)
        self.towers = build_towers(
            in_channels=in_channels, image_size=image_size, embed_dim=embed_dim, image_tower=image_tower,
            vision_width=vision_width, vision_layers=vision_layers, vision_heads=vision_heads, patch_size=patch_size,
            resnet_layers=resnet_layers, context_length=context_length, text_width=text_width,
            text_layers=text_layers, text_heads=text_heads, init_logit_scale=math.log(init_scale))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))  # ()
        self.criterion = SigLIPLoss(gather_distributed)

    @property
    def logit_scale(self) -> nn.Parameter:
        """The learnable log of the logit scale (open_clip's parameter, shape ())."""
        return self.towers.logit_scale

    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """``tokenize(texts, self.context_length)``: (N, context_length) int64 ids for ``batch["text"]``."""
        return tokenize(texts, self.context_length)

    def encode_image(self, image: Tensor) -> Tensor:
        """L2-normalised image embeddings. (B, C, H, W) -> (B, embed_dim) float32."""
        return encode_image(self.towers, image, self.in_channels, self.image_size)

    def encode_text(self, text: Tensor) -> Tensor:
        """L2-normalised text embeddings. (B, context_length) int64 -> (B, embed_dim) float32."""
        return encode_text(self.towers, text, self.context_length)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.objective(self.features(batch))

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """What the loss needs: {"image", "text"} (B, embed_dim) embeddings, "logit_scale" (the
        exponentiated scale) and "logit_bias", both () parameters travelling with the features."""
        image, text = image_text_pairs(batch, "SigLIP")  # (B, C, H, W), (B, L)
        with torch.no_grad():
            self.logit_scale.clamp_(0, self.max_log_scale)
        return {"image": self.encode_image(image), "text": self.encode_text(text),  # (B, embed_dim)
                "logit_scale": at_least_fp32(self.logit_scale).exp(), "logit_bias": at_least_fp32(self.logit_bias)}

    def objective(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """The pairwise sigmoid loss over the pairs of ``features`` (one micro-batch's or many's)."""
        image_features, text_features = features["image"], features["text"]
        logit_scale, logit_bias = features["logit_scale"], features["logit_bias"]  # (), ()
        # Autocast off: it would run the logit matmul in bf16; the features already are fp32.
        with torch.autocast(image_features.device.type, enabled=False):
            loss = self.criterion(image_features, text_features, logit_scale, logit_bias)
        return {"loss": loss, "logit_scale": logit_scale.detach(), "logit_bias": logit_bias.detach(),
                "image_text_acc": retrieval_accuracy(image_features, text_features)}

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """``encode_image(batch["image"])``, for evaluation code that treats every method alike."""
        return self.encode_image(batch["image"])

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """SigLIP has no state outside the optimizer (the logit-scale clamp runs in ``forward``)."""
