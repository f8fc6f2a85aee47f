"""Token losses: BERT's masked-LM and next-sentence objectives and GPT's causal-LM objective.

All three are a cross-entropy averaged over the positions whose label is not ``ignore_index``
(-100, PyTorch's and Hugging Face's convention for unmasked, padded or unlabelled positions),
computed in float32 (float64 logits stay float64) whatever the logits' dtype. A batch in which
every position is ignored gives a loss of exactly 0 (with zero gradients), not the NaN of
``0 / 0`` that ``F.cross_entropy(reduction="mean")`` returns.

Under DDP each rank averages over its own labelled positions, as BERT and GPT implementations
do; when ranks hold different numbers of labelled tokens this weights tokens slightly unequally
across ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def token_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Float32 cross-entropy averaged over positions whose label is not ``ignore_index``; 0 if none.

    Shape:
        - logits: (*, V)
        - labels: (*), class ids in [0, V) or ``ignore_index``.
        - output: scalar, float32 (float64 for float64 logits).
    """
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits (*, V) and labels (*) must agree on (*), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    classes = logits.shape[-1]
    # At least float32 even under bf16 autocast; float64 stays float64 (exactness tests).
    logits = logits.reshape(-1, classes).to(torch.promote_types(logits.dtype, torch.float32))  # (N, V)
    labels = labels.reshape(-1).long()  # (N,)
    labelled = labels != ignore_index  # (N,)
    if bool(((labels < 0) | (labels >= classes))[labelled].any()):
        raise ValueError(f"labels must lie in [0, {classes}) or equal ignore_index={ignore_index}; "
                         f"check the vocabulary size and the data pipeline's label encoding")
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / labelled.sum().clamp(min=1)


def token_accuracy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Detached fraction of labelled positions whose argmax is the label; 0 if none. (*, V), (*) -> scalar."""
    labelled = labels != ignore_index
    correct = (logits.detach().argmax(dim=-1) == labels) & labelled
    return correct.sum().float() / labelled.sum().clamp(min=1)


class _TokenLoss(nn.Module):
    """Holds the ``ignore_index`` that the three token losses share."""

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ignore_index = ignore_index


class MaskedLMLoss(_TokenLoss):
    """BERT's masked-language-model loss (Devlin et al. 2019, "BERT: Pre-training of Deep
    Bidirectional Transformers for Language Understanding").

    Cross-entropy of the original token at each masked position; every other position carries
    ``ignore_index`` in ``labels``. The logits may cover every position or only the masked ones.

    Args:
        ignore_index: label value of positions that do not count.

    Shape:
        - logits: (B, L, V) or (M, V)
        - labels: (B, L) or (M,)
        - output: scalar, float32 (float64 for float64 logits).
    """

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return token_cross_entropy(logits, labels, self.ignore_index)


class NSPLoss(_TokenLoss):
    """BERT's next-sentence-prediction loss (Devlin et al. 2019): two-way cross-entropy of
    "sentence B follows sentence A" (1) versus "B is a random sentence" (0) from the [CLS] logits.

    Args:
        ignore_index: label value of pairs that do not count.

    Shape:
        - logits: (B, 2)
        - labels: (B,), 0 / 1 or ``ignore_index``.
        - output: scalar, float32 (float64 for float64 logits).
    """

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(f"NSP needs logits (B, 2) and labels (B,), got {tuple(logits.shape)} and "
                             f"{tuple(labels.shape)}")
        return token_cross_entropy(logits, labels, self.ignore_index)


class CausalLMLoss(_TokenLoss):
    """Next-token cross-entropy with teacher forcing (Radford et al. 2018, "Improving Language
    Understanding by Generative Pre-Training"; GPT).

    ``labels`` is aligned with the input (usually ``input_ids`` with ``ignore_index`` at padding):
    the logits at position t are scored against ``labels[:, t + 1]``, so the shift happens here and
    nowhere else.

    Args:
        ignore_index: label value of positions that do not count.

    Shape:
        - logits: (B, L, V), from positions 0..L-1.
        - labels: (B, L)
        - output: scalar, float32 (float64 for float64 logits); 0 when L == 1 (nothing to predict).
    """

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(f"causal LM needs logits (B, L, V) and labels (B, L), got {tuple(logits.shape)} "
                             f"and {tuple(labels.shape)}")
        # Positions [:, :-1] predict tokens [:, 1:].
        return token_cross_entropy(logits[:, :-1], labels[:, 1:], self.ignore_index)  # (B, L-1, V), (B, L-1)

