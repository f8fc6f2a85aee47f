"""The interface every method implements, stated once as a typing ``Protocol``.

The platform calls nothing else on a method. Hooks that most methods do not need (an EMA
update after the optimizer step, per-modality encoders) are optional: the platform looks for
them with ``getattr`` and a method that has no such state simply leaves them out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

    from ssl_models.spec import MethodSpec


@runtime_checkable
class Method(Protocol):
    """A self-supervised method: an ``nn.Module`` composed of an encoder, heads and an objective.

    Required:
        spec: the method's declaration (:class:`ssl_models.spec.MethodSpec`), a class attribute.
        forward(batch): the keys of ``spec.batch_keys`` -> a dict with a scalar ``"loss"`` and
            any float metrics (``"*_loss"`` terms, accuracies).
        embed(batch): the frozen representation for evaluation: ``{"image": (B, C, H, W)}``,
            ``{"audio": (B, T), "lengths"}`` or ``{"input_ids", "attention_mask"}`` -> (B, D).

    Optional (looked up with ``getattr``):
        on_train_step_end(step, max_steps): state that moves outside the optimizer (BYOL's EMA
            target), called after every optimizer step.
        encode_image / encode_text / encode_audio: per-modality encoders, for the modalities in
            ``spec.embeds`` whose evaluation needs more than ``embed`` (CLIP's two towers,
            per-token or per-frame states).
        features(batch) / objective(features): the forward split in two, for methods whose loss
            couples the samples of a batch (``spec.accumulation == "gradcache"``), so that exact
            gradient accumulation (GradCache) can take the loss over many micro-batches:
            ``forward(batch) == objective(features(batch))``. ``features`` returns a dict of
            tensors, batch-major (dim 0 one row per sample, concatenable over micro-batches) or
            0-dimensional (a learnt scale, the same for every micro-batch); every parameter the
            loss depends on enters through it. ``objective`` takes such a dict (the micro-batches'
            concatenated) and returns what ``forward`` does; it uses no parameter and may gather
            across ranks. The platform runs ``features`` as the wrapped module's forward, so DDP's
            and FSDP's hooks run.
    """

    spec: ClassVar[MethodSpec]

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]: ...

    def embed(self, batch: Mapping[str, Tensor]) -> Tensor: ...
