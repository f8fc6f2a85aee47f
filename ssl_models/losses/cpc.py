"""InfoNCE over future frames, the objective of CPC and wav2vec, with gathered candidates."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models import distributed


class CPCOutput(NamedTuple):
    loss: Tensor  # scalar, with gradient
    accuracy: Tensor  # (K,) detached: share of this rank's anchors whose top-scored candidate is the positive


class CPCLoss(nn.Module):
    """InfoNCE over K future steps (van den Oord et al. 2018, "Representation Learning with
    Contrastive Predictive Coding"; Schneider et al. 2019, "wav2vec").

    The step predictors are not in here: the caller applies its own linear map ``W_k`` to the
    context ``c_t`` for every step and passes ``predictions[:, t, k-1] = W_k c_t`` (see
    ``ssl_models.methods.cpc.CPC``), so this module has no parameters.

    For each anchor (utterance, time ``t``, step ``k``) the positive is ``z_{t+k}`` of the same
    utterance; the candidates are every real frame of every utterance in the batch -- other
    times of the same utterance and all times of the others, the positive included -- and, with
    ``gather_distributed``, of every rank. An anchor exists where ``t`` and ``t+k`` are both real
    frames. The loss is the mean over steps of the mean over that step's anchors of
    ``-log softmax(score(prediction, candidates))[positive]``.

    Scores: ``temperature=None`` is CPC's bilinear score, the plain dot product of prediction and
    frame; a float is wav2vec 2.0's cosine similarity divided by the temperature.

    Negatives: ``num_negatives="all"`` (default) uses every candidate, deterministic and exact.
    Memory: per rank the logits are (A, W*B*T) floats, A ~ B*T*K anchors, held twice for the
    backward; B=8 one-second clips (T=98), K=12, W=1 is ~9.4k x 784 floats = 30 MB, but W=8 ranks
    of B=32 is 128x that, ~4 GB. There pass an int: each anchor draws that many negatives uniformly, with
    replacement, from the candidates other than its positive, and the logits are (A, 1 + N).
    Sampling is random, so it is not bitwise reproducible and not exactly equal across splits.

    Distributed, with the local-loss recipe of ``NTXentLoss``: each rank scores its own anchors
    against the candidates of all ranks (``distributed.gather_with_grad``) and returns
    ``L_r = W * (1/K) sum_k sum_{a local, step k} l_a / N_k``, ``N_k`` the anchors of step ``k``
    on all ranks (counted from the gathered mask, so no extra collective). Then ``mean_r L_r``
    is the whole-batch loss and, since the gather's backward sums over ranks, DDP's gradient
    average is the whole-batch gradient -- also when padding leaves ranks with different anchor
    counts. With equal counts ``L_r`` is just the mean over local anchors. Every rank must pass
    the same (B, T): crop or pad to a fixed length and mark the padding in ``mask``.

    Args:
        num_steps: K, the number of future steps predicted.
        num_negatives: "all", or the number of sampled negatives per anchor.
        temperature: None for dot-product scores, or the temperature of cosine scores.
        gather_distributed: take candidates from all ranks when a process group with more
            than one rank exists. Without one it changes nothing.

    Shape:
        - predictions: (B, T, K, D), ``predictions[:, t, k-1]`` predicts ``targets[:, t+k]``.
        - targets: (B, T, D), the encoded frames z.
        - mask: (B, T) bool, True for real frames and False for padding; None if all are real.
        - output: ``CPCOutput(loss, accuracy)``, a scalar and a (K,) tensor, both float32 or wider.

    Example:
        >>> loss, accuracy = CPCLoss(num_steps=12)(predictions, z)
    """

    def __init__(self, num_steps: int = 12, num_negatives: int | str = "all", temperature: float | None = None,
                 gather_distributed: bool = False):
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        if num_negatives != "all" and (isinstance(num_negatives, bool) or not isinstance(num_negatives, int)
                                       or num_negatives < 1):
            raise ValueError(f"num_negatives must be 'all' or a positive int, got {num_negatives!r}")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be positive or None (dot-product scores), got {temperature}")
        self.num_steps = num_steps
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, predictions: Tensor, targets: Tensor, mask: Tensor | None = None) -> CPCOutput:
        b, t, k, d = self._check(predictions, targets, mask)
        if mask is None:
            mask = torch.ones(b, t, dtype=torch.bool, device=targets.device)
        # At least float32, and outside autocast: bf16 would round unnormalised dot products by ~1%.
        dtype = torch.promote_types(predictions.dtype, torch.float32)
        with torch.autocast(predictions.device.type, enabled=False):
            p, z = predictions.to(dtype), targets.to(dtype)
            if self.temperature is not None:  # cosine / temperature; scaling p is cheaper than the logits
                p, z = F.normalize(p, dim=-1) / self.temperature, F.normalize(z, dim=-1)

            gather = self.gather_distributed and distributed.world_size() > 1
            r, world = (distributed.rank(), distributed.world_size()) if gather else (0, 1)
            all_z = distributed.gather_with_grad(z) if gather else z  # (W*B, T, D)
            all_mask = distributed.gather_with_grad(mask.to(dtype)).bool() if gather else mask  # (W*B, T)

            valid = anchor_mask(mask, k)  # (B, T, K)
            counts = anchor_mask(all_mask, k).sum((0, 1))  # (K,) anchors per step on all ranks
            if not bool(counts.all()):
                raise ValueError(f"no utterance has more than {k} real frames, so step {k} has no anchor; "
                                 f"crop longer clips or lower num_steps")

            # Anchor (i, t, k) -> column of its positive z_{t+k} in the gathered, flattened frames.
            steps = torch.arange(1, k + 1, device=z.device)  # (K,)
            future = torch.arange(t, device=z.device)[:, None] + steps  # (T, K)
            utterance = torch.arange(b, device=z.device) + r * b  # (B,) row among the gathered utterances
            positive = utterance[:, None, None] * t + future  # (B, T, K)

            anchors = valid.flatten()  # (B*T*K,) only real anchors are scored
            p = p.reshape(-1, d)[anchors]  # (A, D)
            positive = positive.flatten()[anchors]  # (A,)
            candidates = all_z.reshape(-1, d)  # (W*B*T, D)
            if self.num_negatives == "all":
                logits = p @ candidates.T  # (A, W*B*T)
                # Padding is no candidate. The dtype's min, not -inf: exp gives an exact 0, never NaN.
                logits = logits.masked_fill(~all_mask.reshape(1, -1), torch.finfo(dtype).min)
                target = positive
            else:
                negatives = sample_negatives(all_mask.flatten(), positive, self.num_negatives)  # (A, N)
                logits = torch.cat([(p * candidates[positive]).sum(-1, keepdim=True),  # (A, 1)
                                    torch.einsum("ad,and->an", p, candidates[negatives])], dim=1)  # (A, 1 + N)
                target = torch.zeros_like(positive)
            nll = F.cross_entropy(logits, target, reduction="none")  # (A,)
            correct = (logits.argmax(dim=1) == target).to(dtype)  # (A,)

            # Back to (B, T, K) with zeros at non-anchors; a scatter, not index_add: deterministic on GPUs.
            per_step = nll.new_zeros(b * t * k).masked_scatter(anchors, nll).view(b, t, k).sum((0, 1))  # (K,)
            loss = world * (per_step / counts).mean()
            hits = correct.new_zeros(b * t * k).masked_scatter(anchors, correct).view(b, t, k).sum((0, 1))  # (K,)
            accuracy = hits / valid.sum((0, 1)).clamp(min=1)
        return CPCOutput(loss, accuracy.detach())

    def _check(self, predictions: Tensor, targets: Tensor, mask: Tensor | None) -> tuple[int, int, int, int]:
        if predictions.dim() != 4 or predictions.shape[2] != self.num_steps:
            raise ValueError(f"predictions must be (B, T, num_steps={self.num_steps}, D), "
                             f"got {tuple(predictions.shape)}")
        b, t, k, d = predictions.shape
        if targets.shape != (b, t, d):
            raise ValueError(f"targets must be (B, T, D) = {(b, t, d)} to match predictions, "
                             f"got {tuple(targets.shape)}")
        if mask is not None and (mask.shape != (b, t) or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a (B, T) = {(b, t)} bool tensor, got {tuple(mask.shape)} {mask.dtype}")
        return b, t, k, d


def anchor_mask(mask: Tensor, num_steps: int) -> Tensor:
    """Where an anchor exists: ``out[i, t, k-1]`` is True iff frames ``t`` and ``t+k`` of utterance
    ``i`` are both real (and ``t+k`` is inside the sequence).

    Shape:
        - mask: (N, T) bool
        - output: (N, T, num_steps) bool
    """
    t = mask.shape[1]
    future = torch.arange(t, device=mask.device)[:, None] + torch.arange(1, num_steps + 1, device=mask.device)  # (T, K)
    return mask[:, :, None] & mask[:, future.clamp(max=t - 1)] & (future < t)  # (N, T, K)


def sample_negatives(candidate_mask: Tensor, positives: Tensor, num_negatives: int) -> Tensor:
    """For each anchor, ``num_negatives`` candidate indices drawn uniformly with replacement from
    the real candidates other than its positive (torch's global RNG).

    Shape:
        - candidate_mask: (M,) bool, True for real candidates.
        - positives: (A,) indices of real candidates.
        - output: (A, num_negatives) indices into the M candidates.
    """
    pool = candidate_mask.nonzero().squeeze(1)  # (V,) ascending
    if len(pool) < 2:
        raise ValueError(f"sampling negatives needs at least 2 real frames in the batch, got {len(pool)}")
    where = torch.searchsorted(pool, positives)  # (A,) each positive's place in the pool
    draw = torch.randint(len(pool) - 1, (len(positives), num_negatives), device=pool.device)  # (A, N)
    draw = draw + (draw >= where[:, None]).long()  # skip the positive: uniform over the other V - 1
    return pool[draw]
