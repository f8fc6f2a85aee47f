"""Classifiers on frozen features: the linear probe and the weighted kNN of the SSL papers.

Both take features already extracted from a frozen encoder (see ``evaluate.features.extract_features``)
and return top-1 accuracy on the test split, so the same numbers can be computed for raw pixels,
a random-init encoder, a pretrained one and a supervised one, and compared in one table.

They sit below ``train`` (not in ``evaluate``) because the training loop's online evaluation
scores its kNN with them too (``train.online``); ``ssl_platform.evaluate.probe`` re-exports them.

Shape:
    - train_x: (N, D) float, train_y: (N,) int
    - test_x: (M, D) float, test_y: (M,) int
"""

from __future__ import annotations

import numpy as np
import torch
from threadpoolctl import threadpool_limits


def _check_split(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``x`` as (N, D) float and ``y`` as (N,) int, or say what is wrong with them."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2:
        raise ValueError(f"{name}_x must be a (N, D) feature matrix, got shape {x.shape}; "
                         f"flatten images with x.reshape(len(x), -1) first")
    if y.ndim != 1:
        raise ValueError(f"{name}_y must be a (N,) vector of class ids, got shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{name}_x has {len(x)} rows but {name}_y has {len(y)} labels; they must match")
    if len(x) == 0:
        raise ValueError(f"{name} split is empty; need at least one example")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}_y must hold integer class ids, got dtype {y.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name}_x contains NaN or inf (a diverged encoder?); evaluate a finite checkpoint")
    return x, y


def _check_inputs(train_x, train_y, test_x, test_y) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train_x, train_y = _check_split(train_x, train_y, "train")
    test_x, test_y = _check_split(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} dims but test features have {test_x.shape[1]}; "
                         f"extract both with the same encoder")
    return train_x, train_y, test_x, test_y


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 seed: int = 0) -> float:
    """Top-1 accuracy (0..1) of a multinomial logistic regression on frozen features.

    The features are standardised with statistics of the train split only (so the test split
    leaks nothing), which also makes one L2 strength (C=1) and one iteration budget work for
    features of very different scales: raw pixels, random-init and pretrained encoders.
    """
    train_x, train_y, test_x, test_y = _check_inputs(train_x, train_y, test_x, test_y)
    if len(np.unique(train_y)) < 2:
        raise ValueError("the linear probe needs at least two classes in train_y; check the labels and the split")
    # Imported here: scikit-learn takes a second to import, and every train worker imports this module.
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    # lbfgs on standardised features converges in a few hundred iterations for ~1500 x 128;
    # 1000 leaves room for raw pixels (D=1024) without a ConvergenceWarning.
    clf = LogisticRegression(max_iter=1000, random_state=seed)
    # One BLAS thread: the products here are small, and next to torch's OpenMP threads a
    # multi-threaded OpenBLAS spins for cores it cannot get. Measured on 2 cores, 1437 x 128
    # features: 0.04 s with one thread against 1.1 s with two.
    with threadpool_limits(limits=1, user_api="blas"):
        clf.fit(scaler.transform(train_x), train_y)
        predicted_y = clf.predict(scaler.transform(test_x))
    return float((predicted_y == test_y).mean())


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> float:
    """Top-1 accuracy (0..1) of the weighted kNN classifier on L2-normalised features.

    Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
    (the protocol SimCLR and DINO report): each test point takes its ``k`` most cosine-similar
    train points and each neighbour votes for its class with weight exp(sim / temperature).
    ``k`` is clipped to the train size. Test points are scored ``chunk_size`` at a time so the
    (chunk, N) similarity matrix, not (M, N), bounds the memory.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    train_x, train_y, test_x, test_y = _check_inputs(train_x, train_y, test_x, test_y)
    classes, train_ids = np.unique(train_y, return_inverse=True)  # class ids need not be 0..C-1
    num_classes, k = len(classes), min(k, len(train_y))

    bank = torch.nn.functional.normalize(torch.from_numpy(train_x), dim=1)  # (N, D)
    bank_ids = torch.from_numpy(train_ids.reshape(-1)).long()  # (N,)
    queries = torch.nn.functional.normalize(torch.from_numpy(test_x), dim=1)  # (M, D)
    predicted = []
    for q in queries.split(chunk_size):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (B, k), sorted most similar first
        # Subtracting the row max leaves the vote's argmax unchanged and keeps exp() finite
        # for small temperatures (exp(1 / 1e-4) would overflow).
        weights = ((sim - sim[:, :1]) / temperature).exp()  # (B, k)
        votes = torch.zeros(len(q), num_classes).scatter_add_(1, bank_ids[idx], weights)  # (B, C)
        predicted.append(votes.argmax(dim=1))
    predicted_y = classes[torch.cat(predicted).numpy()]  # (M,)
    return float((predicted_y == test_y).mean())
