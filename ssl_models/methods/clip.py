"""CLIP: open_clip's image and text towers, a learnable logit scale and the symmetric InfoNCE.

The towers and their checks are building blocks (``build_towers``, ``encode_image``, ``encode_text``,
``image_text_pairs``, ``retrieval_accuracy``) that other image-caption methods (SigLIP) compose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.losses.clip import CLIPLoss
from ssl_models.losses.precision import at_least_fp32
from ssl_models.spec import MethodSpec

# Size of the BPE vocabulary bundled with open_clip (49152 merges-derived tokens + SOT + EOT);
# the text tower's embedding table must cover every id the tokenizer emits.
VOCAB_SIZE = 49408
IMAGE_TOWERS = ("vit", "resnet")


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> Tensor:
    """Token ids of ``texts`` with open_clip's BPE tokenizer (its vocabulary ships inside the
    package, so this never touches the network).

    Each row is ``<start_of_text> tokens... <end_of_text>`` padded with 0; a text too long for
    ``context_length`` is truncated and still ends in ``<end_of_text>``, which the text tower
    pools at (it is the largest id of the row).

    Shape:
        - output: (N, context_length) int64, N the number of texts (1 for a single string).
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
    import open_clip  # on first use: importing it takes ~0.5 s in every process that imports ssl_models

    return open_clip.tokenize(texts if isinstance(texts, str) else list(texts), context_length=context_length)


def build_towers(*, in_channels: int, image_size: int, embed_dim: int, image_tower: str, vision_width: int,
                 vision_layers: int, vision_heads: int, patch_size: int, resnet_layers: Sequence[int],
                 context_length: int, text_width: int, text_layers: int, text_heads: int,
                 init_logit_scale: float) -> nn.Module:
    """open_clip's image and text towers (``open_clip.CLIP``) for these settings, checked first.

    The building block CLIP and SigLIP share; the arguments are CLIP's (see its docstring).
    ``init_logit_scale`` is the initial value of the towers' ``logit_scale`` parameter, the log
    of the scale the logits are multiplied by.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
    if image_tower not in IMAGE_TOWERS:
        raise ValueError(f"image_tower must be one of {IMAGE_TOWERS}, got {image_tower!r}")
    if (image_tower == "vit" and vision_width % vision_heads) or text_width % text_heads:
        raise ValueError(f"widths must be multiples of the heads, got vision {vision_width}/{vision_heads}, "
                         f"text {text_width}/{text_heads}")
    multiple = 32 if image_tower == "resnet" else patch_size
    if image_size % multiple:
        raise ValueError(f"image_size must be a multiple of {multiple} for the {image_tower} tower, "
                         f"got {image_size}")
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")

    import open_clip  # on first use (see tokenize)

    if image_tower == "vit":
        vision_cfg = open_clip.CLIPVisionCfg(layers=vision_layers, width=vision_width,
                                             head_width=vision_width // vision_heads, patch_size=patch_size,
                                             image_size=image_size)
    else:  # a tuple of layers is how open_clip selects its ModifiedResNet
        vision_cfg = open_clip.CLIPVisionCfg(layers=tuple(int(n) for n in resnet_layers), width=vision_width,
                                             head_width=64, image_size=image_size)
    text_cfg = open_clip.CLIPTextCfg(context_length=context_length, vocab_size=VOCAB_SIZE, width=text_width,
                                     heads=text_heads, layers=text_layers)
    return open_clip.CLIP(embed_dim, vision_cfg, text_cfg, init_logit_scale=init_logit_scale)


def encode_image(towers: nn.Module, image: Tensor, in_channels: int, image_size: int) -> Tensor:
    """L2-normalised output of ``towers``' image tower, in at least float32; grayscale images are
    repeated to the 3 channels the stem takes. (B, C, H, W) -> (B, embed_dim)."""
    expected = (in_channels, image_size, image_size)
    if image.dim() != 4 or tuple(image.shape[1:]) != expected:
        raise ValueError(f"images must be (B, {', '.join(map(str, expected))}), got {tuple(image.shape)}; "
                         f"set in_channels/image_size to match the data")
    if in_channels == 1:
        image = image.expand(-1, 3, -1, -1)  # (B, 3, H, W): the towers' stems take RGB
    return F.normalize(at_least_fp32(towers.encode_image(image)), dim=-1)  # (B, embed_dim)


def encode_text(towers: nn.Module, text: Tensor, context_length: int) -> Tensor:
    """L2-normalised output of ``towers``' text tower at the end-of-text token, in at least
    float32. (B, context_length) int64 -> (B, embed_dim)."""
    if text.dim() != 2 or text.shape[1] != context_length or text.is_floating_point():
        raise ValueError(f"text must be (B, {context_length}) integer token ids, got "
                         f"{tuple(text.shape)} {text.dtype}; tokenize with context_length={context_length}")
    return F.normalize(at_least_fp32(towers.encode_text(text)), dim=-1)  # (B, embed_dim)


def image_text_pairs(batch: dict[str, Tensor], method: str) -> tuple[Tensor, Tensor]:
    """``batch["image"]``, ``batch["text"]`` after checking both are there, one caption per image.
    ``method`` names the method in the error. -> (B, C, H, W), (B, L)."""
    missing = {"image", "text"} - batch.keys()
    if missing:
        raise ValueError(f"{method} needs batch keys 'image' and 'text', missing {sorted(missing)}")
    image, text = batch["image"], batch["text"]
    if image.shape[0] != text.shape[0]:
        raise ValueError(f"need one caption per image, got {image.shape[0]} images and {text.shape[0]} texts")
    return image, text


def retrieval_accuracy(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Top-1 retrieval accuracy among these pairs, image->text and text->image averaged
    (detached). (B, D), (B, D) -> scalar."""
    with torch.no_grad():
        similarity = image_features @ text_features.T  # (B, B)
        labels = torch.arange(len(similarity), device=similarity.device)
        return ((similarity.argmax(1) == labels).float().mean() + (similarity.argmax(0) == labels).float().mean()) / 2


class CLIP(nn.Module):
    """CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
    Supervision"): an image tower and a text tower trained so that matching image-caption pairs
    have the highest cosine similarity in the batch.

    The towers are open_clip's own (``open_clip.CLIP`` built from small ``CLIPVisionCfg`` /
    ``CLIPTextCfg``): a ViT (or open_clip's ``ModifiedResNet`` with ``image_tower="resnet"``)
    and a causal text transformer pooled at the end-of-text token. The temperature is learnt as
    ``logit_scale = log(1 / T)``, initialised at ``log(1 / 0.07)``; the loss is
    ``CLIPLoss`` on the L2-normalised embeddings, with gathered negatives when asked.

    The logit scale is clamped to ``[0, log(max_logit_scale)]`` in place, without gradient, at
    the start of every ``forward`` (open_clip clamps the same way after each optimizer step),
    so the scale a forward uses never exceeds ``max_logit_scale``, and the parameter sits at
    the bound with its ordinary gradient rather than drifting past it where a clamp inside the
    graph would give it none.

    Grayscale: open_clip's towers have a fixed 3-channel stem, so with ``in_channels=1`` each
    image is repeated to 3 channels (the same as one 1-channel stem whose weight is the sum of
    the three).

    Args:
        in_channels: image channels, 1 or 3.
        image_size: image height and width; the ViT's position embeddings are built for it.
        embed_dim: dimension of the joint image-text embedding space.
        image_tower: ``"vit"`` or ``"resnet"`` (open_clip's ``ModifiedResNet``: 3-conv stem,
            anti-aliased strides, attention pooling; it downsamples 32x, so ``image_size`` must
            be a multiple of 32; it has BatchNorm).
        vision_width: ViT width; for the ResNet, its stem width (the trunk ends at 32x it).
        vision_layers: ViT blocks.
        vision_heads: ViT attention heads (``vision_width`` must divide evenly); the ResNet's
            attention pool uses open_clip's 64-wide heads.
        patch_size: ViT patch size (``image_size`` must be a multiple of it).
        resnet_layers: Bottleneck blocks in each of the ResNet's 4 stages.
        context_length: text length in tokens; ``batch["text"]`` must have exactly this many.
        text_width: text transformer width.
        text_layers: text transformer blocks.
        text_heads: text attention heads (``text_width`` must divide evenly).
        temperature: initial softmax temperature; it is learnt (``logit_scale = log(1 / T)``).
        max_logit_scale: largest allowed ``exp(logit_scale)``, i.e. smallest temperature is
            ``1 / max_logit_scale``; CLIP used 100.
        gather_distributed: score local pairs against the pairs of all ranks.

    Shape:
        - batch["image"]: (B, in_channels, image_size, image_size) float.
        - batch["text"]: (B, context_length) int64 token ids from ``tokenize``.
        - ``forward`` output: ``"loss"`` (scalar, float32 under autocast), ``"logit_scale"``
          (detached ``exp`` of the clamped parameter) and ``"image_text_acc"`` (detached top-1
          retrieval accuracy among this rank's pairs, both directions averaged).
        - ``encode_image`` / ``encode_text`` / ``embed`` output: (B, embed_dim), L2-normalised,
          float32 (float64 for a float64 model) even under autocast.
    """

    spec = MethodSpec(
        display_name="CLIP", data_kind="image-caption", batch_keys=("image", "text"), embeds=("image", "text"),
        online_metric="val_zero_shot_top1", online_mode="max",
        objective_keys=frozenset({"temperature", "max_logit_scale", "gather_distributed"}),
        derived=("in_channels", "image_size"), accumulation="gradcache")

    def __init__(self, in_channels: int = 3, image_size: int = 32, embed_dim: int = 64,
                 image_tower: str = "vit", vision_width: int = 64, vision_layers: int = 2,
                 vision_heads: int = 4, patch_size: int = 4, resnet_layers: Sequence[int] = (1, 1, 1, 1),
                 context_length: int = 32, text_width: int = 64, text_layers: int = 2, text_heads: int = 4,
                 temperature: float = 0.07, max_logit_scale: float = 100.0,
                 gather_distributed: bool = False):
        super().__init__()
        if not (0 < temperature <= 1 and 1 / temperature <= max_logit_scale):
            raise ValueError(f"need 1/max_logit_scale <= temperature <= 1, got temperature="
                             f"{temperature}, max_logit_scale={max_logit_scale}")
        self.in_channels, self.image_size, self.context_length = in_channels, image_size, context_length
        self.embed_dim = embed_dim
        self.max_log_scale = math.log(max_logit_scale)
        self.towers = build_towers(
            in_channels=in_channels, image_size=image_size, embed_dim=embed_dim, image_tower=image_tower,
            vision_width=vision_width, vision_layers=vision_layers, vision_heads=vision_heads, patch_size=patch_size,
            resnet_layers=resnet_layers, context_length=context_length, text_width=text_width,
            text_layers=text_layers, text_heads=text_heads, init_logit_scale=math.log(1 / temperature))
        self.criterion = CLIPLoss(gather_distributed)

    @property
    def logit_scale(self) -> nn.Parameter:
        """The learnable ``log(1 / temperature)`` (open_clip's parameter, shape ())."""
        return self.towers.logit_scale

    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """``tokenize(texts, self.context_length)``: (N, context_length) int64 ids for ``batch["text"]``."""
        return tokenize(texts, self.context_length)

    def encode_image(self, image: Tensor) -> Tensor:
        """L2-normalised image embeddings, the frozen representation used for zero-shot
        classification, retrieval and probes. (B, C, H, W) -> (B, embed_dim) float32."""
        return encode_image(self.towers, image, self.in_channels, self.image_size)

    def encode_text(self, text: Tensor) -> Tensor:
        """L2-normalised text embeddings (the tower's output at the end-of-text token), used for
        zero-shot class prompts and retrieval. (B, context_length) int64 -> (B, embed_dim) float32."""
        return encode_text(self.towers, text, self.context_length)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.objective(self.features(batch))

    def features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """What the loss needs: {"image", "text"} (B, embed_dim) embeddings and "logit_scale", the
        exponentiated scale () -- a parameter, so it travels with the features (see ``protocol``)."""
        image, text = image_text_pairs(batch, "CLIP")  # (B, C, H, W), (B, L)
        with torch.no_grad():
            self.logit_scale.clamp_(0, self.max_log_scale)
        return {"image": self.encode_image(image), "text": self.encode_text(text),  # (B, embed_dim)
                "logit_scale": at_least_fp32(self.logit_scale).exp()}  # ()

    def objective(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """The symmetric InfoNCE over the pairs of ``features`` (one micro-batch's or many's)."""
        image_features, text_features = features["image"], features["text"]
        logit_scale = features["logit_scale"]
        # Autocast off: it would run the logit matmuls in bf16; the features already are fp32.
        with torch.autocast(image_features.device.type, enabled=False):
            loss = self.criterion(image_features, text_features, logit_scale)
        return {"loss": loss, "logit_scale": logit_scale.detach(),
                "image_text_acc": retrieval_accuracy(image_features, text_features)}

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """``encode_image(batch["image"])``, for evaluation code that treats every method alike."""
        return self.encode_image(batch["image"])

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """CLIP has no state outside the optimizer (the logit-scale clamp runs in ``forward``)."""
