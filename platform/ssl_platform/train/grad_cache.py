"""Exact gradient accumulation for losses that couple the samples of a batch: GradCache.

With ``train.grad_accum_steps=k`` a worker's batch arrives as k micro-batches. Accumulating
their losses independently changes a contrastive objective (each micro-batch sees only its own
negatives) and a batch-statistics one (Barlow Twins' cross-correlation, VICReg's covariance).
GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup") gets the big batch's gradient with the activation memory of one micro-batch:

1. the features of every micro-batch (``method.features``), without a graph, noting the RNG
   state before each forward so that dropout draws the same masks again in step 3;
2. the loss over all of them (``method.objective`` on the concatenation; it gathers across
   workers as one forward would) and its gradient with respect to each micro-batch's features;
3. each micro-batch's forward again, with the replayed RNG state and a graph, and a backward
   from its features with that cached gradient; gradients sync across workers in the last one.

By the chain rule the summed parameter gradients are the big batch's: ``dL/dtheta = sum_i
(dL/df_i) (df_i/dtheta)``. What stays per micro-batch is anything inside ``features`` that
depends on the batch: BatchNorm normalises each micro-batch with its own statistics (the run's
first line says so). BatchNorm's running statistics move once per micro-batch, in step 3: step 1
leaves every buffer as it found it. The price is a second forward of every micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn

from ssl_models.losses.precision import at_least_fp32

Features = dict[str, Tensor]


def accumulate_exact(model: nn.Module, method: nn.Module, micro_batches: list[dict[str, Tensor]],
                     autocast: AbstractContextManager = nullcontext(),
                     gradient_sync: Callable[[nn.Module, bool], AbstractContextManager] | None = None,
                     ) -> dict[str, Tensor]:
    """Forward and backward over one optimizer step's micro-batches with the loss of all of them.

    Args:
        model: what the loop calls: ``method`` itself, its DDP wrapper or ``method`` under FSDP.
        method: the method, with ``features`` and ``objective`` (``spec.accumulation == "gradcache"``).
        micro_batches: the k micro-batches of this worker's batch, in order.
        autocast: the precision context of every forward.
        gradient_sync: ``gradient_sync(model, enabled)``, the context that turns the workers'
            gradient sync on (the last backward) or off (the others); none for one worker.

    Returns the objective's scalar outputs over the whole batch (detached): the loss and metrics.
    """
    sync = gradient_sync or (lambda _model, _enabled: nullcontext())
    # 1. Features without a graph, and the RNG state each forward started from.
    saved_buffers = [b.detach().clone() for b in method.buffers()]
    states, cached = [], []
    with torch.no_grad(), forward_is(method, method.features):
        for batch in micro_batches:
            states.append(rng_state())
            with autocast:
                cached.append(model(batch))
    with torch.no_grad():  # BatchNorm's running statistics move in step 3 only
        for buffer, saved in zip(method.buffers(), saved_buffers, strict=True):
            buffer.copy_(saved)

    # 2. The loss over every micro-batch's features, and its gradient with respect to each of them.
    leaves = [{key: value.detach().requires_grad_(value.is_floating_point()) for key, value in features.items()}
              for features in cached]
    with autocast:
        out = method.objective(concat_features(leaves))
    out["loss"].backward()
    after_loss = rng_state()  # sampled negatives drew from it; the replays below must not rewind it

    # 3. Each micro-batch again, with a graph, backward from its features with the cached gradient.
    for i, (batch, state, leaf) in enumerate(zip(micro_batches, states, leaves, strict=True)):
        set_rng_state(state)
        with sync(model, i == len(micro_batches) - 1), forward_is(method, method.features):
            with autocast:
                features = model(batch)
            keys = [key for key, value in leaf.items() if value.requires_grad]
            # A 0-dim feature (a learnt scale) enters the loss through micro-batch 0 alone; the others
            # get a zero gradient, so every parameter has one in every backward (DDP expects it).
            grads = [leaf[key].grad if leaf[key].grad is not None else torch.zeros_like(leaf[key]) for key in keys]
            torch.autograd.backward([features[key] for key in keys], grads)
    set_rng_state(after_loss)
    return {name: at_least_fp32(value.detach()) for name, value in out.items() if value.ndim == 0}


def concat_features(parts: list[Features]) -> Features:
    """The micro-batches' features as one batch's: batch-major tensors concatenated along dim 0,
    0-dimensional ones (a learnt scale, the same in every micro-batch) taken from the first."""
    return {key: value if value.ndim == 0 else torch.cat([part[key] for part in parts])
            for key, value in parts[0].items()}


@contextmanager
def forward_is(method: nn.Module, fn: Callable) -> Iterator[None]:
    """``method``'s forward is ``fn`` inside: calling the wrapper (DDP, FSDP) runs ``fn`` with the
    wrapper's hooks (DDP's reducer, FSDP's all-gathers), which calling ``fn`` directly would skip."""
    method.forward = fn
    try:
        yield
    finally:
        del method.forward  # the class's forward again


def rng_state() -> tuple[Tensor, list[Tensor] | None]:
    """The state of torch's CPU generator and, once CUDA is in use, of every GPU's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
