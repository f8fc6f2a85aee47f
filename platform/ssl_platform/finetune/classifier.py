"""The fine-tune's model: a method's encoder with a linear head, obeying the method protocol
(``forward(batch) -> {"loss", "accuracy"}``, ``on_train_step_end``) so that the pretraining loop
(``train.loop.train_func``) trains it unchanged; and the ``build`` the loop calls on each worker."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import ray
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_platform import methods
from ssl_platform.data.transforms import to_float


class Classifier(nn.Module):
    """A method's encoder (its ``embed``) with a linear head, trained by the platform's loop.

    Args:
        method: a built method of ``ssl_models`` (pretrained or at random init).
        num_classes: output classes of the head.
        image_shape: (C, H, W) of the inputs; one dry run finds the feature width and which
            parameters ``embed`` never touches (projectors, BYOL's target): those are frozen,
            since DDP refuses parameters that get no gradient.

    Shape:
        - batch["image"]: (B, C, H, W) uint8, batch["label"]: (B,) int64.
        - ``logits`` output: (B, num_classes).
    """
    def __init__(self, method, num_classes: int, image_shape: tuple[int, int, int]):
        super().__init__()
        self.method = method
        was_training = method.training
        method.eval()  # the dry run must not move BatchNorm statistics
        features = method.embed({"image": torch.zeros(2, *image_shape)})  # (2, D)
        features.float().sum().backward()
        for p in method.parameters():
            if p.grad is None:
                p.requires_grad_(False)
            p.grad = None
        method.train(was_training)
        # Features standardised by a BatchNorm without affine parameters before the linear layer
        # (as MAE's linear probe, He et al. 2022): encoders' feature scales differ by orders of
        # magnitude, and one learning rate must suit the head of each.
        self.head = nn.Sequential(nn.BatchNorm1d(features.shape[1], affine=False),
                                  nn.Linear(features.shape[1], num_classes))

    def logits(self, batch: dict) -> Any:

        image = batch["image"]
        image = to_float(image) if not image.is_floating_point() else image  # uint8 -> as at training time
        return self.head(self.method.embed({"image": image}).float())  # (B, num_classes)

    def forward(self, batch: dict) -> dict:

        logits = self.logits(batch)
        labels = batch["label"].long()
        return {"loss": F.cross_entropy(logits, labels),
                "accuracy": (logits.argmax(1) == labels).float().mean().detach()}

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """No state outside the optimizer (a BYOL target network is not fine-tuned)."""


@dataclass(frozen=True)
class ClassifierBuild:
    """The loop's ``build`` for a fine-tune: ``(cfg, **derived) -> Classifier``, on each worker.

    ``state_ref`` is ``[ObjectRef]`` of the pretrained method's state_dict (in a list so Ray
    hands the reference over unresolved), or None for random init. The loop seeds torch with
    ``train.seed`` before calling this, so the method's random init equals evaluation's.
    ``head_state``: the head's starting weights (see :func:`fit_head`), else its own init.
    """

    num_classes: int
    image_shape: tuple[int, int, int]
    state_ref: list | None = None
    head_state: dict | None = None

    def __call__(self, cfg, **derived: Any) -> Classifier:
        method = methods.build(cfg, **derived)
        if self.state_ref is not None:
            method.load_state_dict(ray.get(self.state_ref[0]))
        classifier = Classifier(method, self.num_classes, self.image_shape)
        if self.head_state is not None:
            classifier.head.load_state_dict(self.head_state)
        return classifier


def fit_head(classifier: Classifier, images: Tensor, labels: Tensor, steps: int = 300, lr: float = 0.01,
             batch_size: int = 256) -> dict[str, Tensor]:
    """The head's weights fitted on the frozen encoder's features: the "LP" of LP-FT (Kumar et al.
    2022, "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution").
    A random head's large early gradients would otherwise wreck pretrained features before the
    head becomes useful. Full-batch Adam on (N, D) features; the BatchNorm gets their exact
    mean and variance. images: (N, C, H, W) uint8, labels: (N,) int64. Returns the head's state."""
    classifier.eval()
    with torch.no_grad():
        features = torch.cat([classifier.method.embed({"image": to_float(images[i:i + batch_size])}).float()
                              for i in range(0, len(images), batch_size)])  # (N, D)
    norm, _linear = classifier.head
    norm.running_mean.copy_(features.mean(0))
    norm.running_var.copy_(features.var(0, unbiased=True) if len(features) > 1 else torch.ones_like(features[0]))
    head = copy.deepcopy(classifier.head)  # a copy to train: the classifier's own stays as given until loaded
    optimizer = torch.optim.Adam(head[1].parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(head(features), labels).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in head.state_dict().items()}
