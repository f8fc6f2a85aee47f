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
    """

    spec: ClassVar[MethodSpec]

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]: ...

    def embed(self, batch: Mapping[str, Tensor]) -> Tensor: ...
