"""Online evaluation during training: a cheap validation metric every ``eval.online_every`` steps.

The driver builds a small fixed held-out split (:mod:`ssl_platform.data.online`) and hands the
workers an object-store reference; the loop calls :class:`OnlineEval` at every multiple of
``eval.online_every``, at every checkpoint step and at the last step, so every report Ray
Train (and Tune, which stops trials early on it) receives carries the ``val_*`` metrics.

| kind | metrics (primary first: the method's ``spec.online_metric``) |
|---|---|
| image (SimCLR, BYOL, Barlow Twins, VICReg) | val_knn_top1: weighted kNN of held-out queries against a |
| | labelled train-side bank |
| image-caption (CLIP) | val_zero_shot_top1 with the prompt ensembles; val_loss over all held-out pairs |
| audio (CPC) | val_knn_top1 of clip features (the spoken digit); val_loss on fixed held-out crops |
| text, masked pairs (BERT) | val_mlm_accuracy, val_loss (MLM + NSP), val_nsp_accuracy on fixed masked pairs |
| text, blocks (GPT) | val_perplexity, val_loss, val_bits_per_token on held-out blocks |

Losses are token- (frame-) weighted means over the whole split, not means of batch means.
CPC's primary metric is the kNN accuracy of the spoken word, the downstream target of its
evaluation protocol, rather than its validation loss.

The evaluation runs in eval mode (BatchNorm's running statistics, no dropout) without
gradients, with every loss's cross-rank gathering switched off (only some ranks evaluate, and
each evaluates the whole split), and puts the training flags back afterwards. DDP: rank 0
evaluates the unwrapped method alone. FSDP: the parameters are sharded, so every rank runs
the same forward passes (the blocks all-gather their shards as in training) and gets the same
numbers; the root's own parameters are unsharded around the evaluation.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.spec import MethodSpec
from ssl_platform.config import ExperimentConfig
from ssl_platform.data.transforms import to_float
from ssl_platform.methods import method_spec
from ssl_platform.probes import knn_accuracy
from ssl_platform.train.checkpoint import is_fsdp

IGNORE_INDEX = -100  # the token losses' label of positions that do not count


@contextmanager
def evaluating(method: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, no cross-rank gathering and (FSDP) the root's parameters
    unsharded, inside; the training flags and gathering settings restored after."""
    flags = {m: m.training for m in method.modules()}
    gathers = {m: m.gather_distributed for m in method.modules()
               if isinstance(getattr(m, "gather_distributed", None), bool)}
    fsdp = is_fsdp(method)
    method.eval()
    for m in gathers:
        m.gather_distributed = False
    if fsdp:
        method.unshard()  # a collective: every rank evaluates
    try:
        with torch.no_grad():
            yield
    finally:
        if fsdp:
            method.reshard()
        for m, gather in gathers.items():
            m.gather_distributed = gather
        for m, training in flags.items():
            m.training = training


def online_metrics(method: nn.Module, split: dict[str, np.ndarray], cfg: ExperimentConfig,
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """``{"val_...": float}`` of ``method`` (the unwrapped module) on the held-out ``split``.
    A float64 method (``train.precision=fp64``) is evaluated as a float32 copy, on float32 inputs."""
    evaluate = evaluator(method_spec(cfg.method.name))
    if any(p.dtype == torch.float64 for p in method.parameters()):
        method = copy.deepcopy(method).float()
    with evaluating(method):
        return {k: float(v) for k, v in evaluate(method, split, cfg, torch.device(device)).items()}


def _chunks(arrays: dict[str, np.ndarray], size: int, device: torch.device) -> Iterator[dict[str, Tensor]]:
    """Consecutive ``size``-row slices of ``arrays`` as tensors on ``device``. The arrays may be
    read-only (from the object store), so each slice is copied."""
    n = len(next(iter(arrays.values())))
    for i in range(0, n, size):
        yield {k: torch.as_tensor(np.array(v[i: i + size])).to(device) for k, v in arrays.items()}


def _embed(fn: Callable[[dict[str, Tensor]], Tensor], arrays: dict[str, np.ndarray], size: int,
           device: torch.device) -> np.ndarray:
    """Features of every row: ``fn(batch)`` over the slices, (N, ...) -> (N, D) float32 numpy."""
    return torch.cat([fn(batch).flatten(1).float().cpu() for batch in _chunks(arrays, size, device)]).numpy()


# ----------------------------------------------------------------------------- per kind

def image_metrics(method: nn.Module, split: dict[str, np.ndarray], cfg: ExperimentConfig,
                  device: torch.device) -> dict[str, float]:
    def embed(batch: dict[str, Tensor]) -> Tensor:  # (B, C, H, W) uint8 -> (B, feature_dim)
        return method.embed({"image": to_float(batch["image"])})

    size = cfg.eval.batch_size
    bank = _embed(embed, {"image": split["bank_image"]}, size, device)  # (N, D)
    queries = _embed(embed, {"image": split["image"]}, size, device)  # (M, D)
    return {"val_knn_top1": knn_accuracy(bank, split["bank_label"], queries, split["label"],
                                         k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)}


def clip_metrics(method: nn.Module, split: dict[str, np.ndarray], cfg: ExperimentConfig,
                 device: torch.device) -> dict[str, float]:
    size = cfg.eval.batch_size

    def encode_text(batch: dict[str, Tensor]) -> Tensor:  # (B, L) int64 -> (B, E)
        return method.encode_text(batch["text"])

    images = torch.from_numpy(_embed(lambda b: method.encode_image(to_float(b["image"])),
                                     {"image": split["image"]}, size, device))  # (M, E), L2-normalised
    texts = torch.from_numpy(_embed(encode_text, {"text": split["text"]}, size, device))  # (M, E)
    k, t, length = split["prompts"].shape
    prompts = {"text": split["prompts"].reshape(k * t, length)}
    classes = torch.from_numpy(_embed(encode_text, prompts, size, device))  # (K * T, E)
    classes = F.normalize(classes.view(k, t, -1).mean(dim=1), dim=-1)  # (K, E): CLIP's prompt ensembling
    labels = torch.as_tensor(np.array(split["label"]))
    zero_shot = ((images @ classes.T).argmax(dim=1) == labels).float().mean()
    # The contrastive loss over all held-out pairs at once, at the model's current temperature.
    scale = method.logit_scale.detach().float().clamp(max=method.max_log_scale).exp().cpu()
    logits = scale * images @ texts.T  # (M, M)
    target = torch.arange(len(logits))
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return {"val_zero_shot_top1": zero_shot.item(), "val_loss": loss.item()}


def audio_metrics(method: nn.Module, split: dict[str, np.ndarray], cfg: ExperimentConfig,
                  device: torch.device) -> dict[str, float]:
    size = cfg.eval.batch_size
    queries = {"audio": split["audio"], "lengths": split["lengths"]}  # (M, T), (M,)
    bank = {"audio": split["bank_audio"], "lengths": split["bank_lengths"]}  # (N, T), (N,)
    bank_x = _embed(method.embed, bank, size, device)  # (N, H): context pooled over real frames
    queries_x = _embed(method.embed, queries, size, device)  # (M, H)
    knn = knn_accuracy(bank_x, split["bank_label"], queries_x, split["label"],
                       k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    # The loss on batches of the training batch's size (its negatives come from the batch),
    # weighted by real samples (~ anchor frames).
    total = weight = 0.0
    for batch in _chunks(queries, cfg.train.batch_size, device):
        n = float(batch["lengths"].sum())
        total += method(batch)["loss"].item() * n
        weight += n
    return {"val_knn_top1": knn, "val_loss": total / weight}


def bert_metrics(method: nn.Module, split: dict[str, np.ndarray], cfg: ExperimentConfig,
                 device: torch.device) -> dict[str, float]:
    keys = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "nsp_labels")
    sums = dict.fromkeys(("mlm_loss", "mlm_acc", "masked", "nsp_loss", "nsp_acc", "pairs"), 0.0)
    for batch in _chunks({k: split[k] for k in keys}, cfg.eval.batch_size, device):
        out = method(batch)
        masked = float((batch["mlm_labels"] != IGNORE_INDEX).sum())
        pairs = float((batch["nsp_labels"] != IGNORE_INDEX).sum())
        sums["mlm_loss"] += out["mlm_loss"].item() * masked
        sums["mlm_acc"] += out["mlm_acc"].item() * masked
        sums["masked"] += masked
        sums["nsp_loss"] += out["nsp_loss"].item() * pairs
        sums["nsp_acc"] += out["nsp_acc"].item() * pairs
        sums["pairs"] += pairs
    if sums["masked"] == 0:
        raise ValueError("the online evaluation's BERT split has no masked token; raise data.mask_prob or "
                         "eval.online_examples")
    mlm_loss = sums["mlm_loss"] / sums["masked"]
    out = {"val_mlm_accuracy": sums["mlm_acc"] / sums["masked"], "val_loss": mlm_loss}
    if sums["pairs"]:
        out["val_loss"] = mlm_loss + sums["nsp_loss"] / sums["pairs"]
        out["val_nsp_accuracy"] = sums["nsp_acc"] / sums["pairs"]
    return out


def gpt_metrics(method: nn.Module, split: dict[str, np.ndarray], cfg: ExperimentConfig,
                device: torch.device) -> dict[str, float]:
    total = tokens = 0.0
    for batch in _chunks({k: split[k] for k in ("input_ids", "attention_mask")}, cfg.eval.batch_size, device):
        n = float(batch["attention_mask"][:, 1:].sum())  # predicted tokens: every real one after the first
        if n:
            total += method(batch)["loss"].item() * n
            tokens += n
    if tokens == 0:
        raise ValueError("the online evaluation's GPT split has no token to predict; raise eval.online_examples")
    loss = total / tokens
    return {"val_perplexity": math.exp(loss), "val_loss": loss, "val_bits_per_token": loss / math.log(2)}


Evaluator = Callable[[nn.Module, dict[str, np.ndarray], ExperimentConfig, torch.device], dict[str, float]]
# By data kind; text methods by the batches they eat (the spec's token_batches).
EVALUATORS: dict[str, Evaluator] = {"image": image_metrics, "image-caption": clip_metrics, "audio": audio_metrics}
TEXT_EVALUATORS: dict[str, Evaluator] = {"masked_pairs": bert_metrics, "blocks": gpt_metrics}


def evaluator(spec: MethodSpec) -> Evaluator:
    """The online evaluation of a method with this spec."""
    return TEXT_EVALUATORS[spec.token_batches] if spec.data_kind == "text" else EVALUATORS[spec.data_kind]


# ----------------------------------------------------------------------------- in the loop

class OnlineEval:
    """What the training loop calls: whether a step is an online-evaluation step, and the
    metrics there (empty on ranks that do not evaluate).

    Args:
        split: the held-out split, or the object-store reference to it the driver handed over
            (fetched only on the ranks that evaluate).
        rank: this worker's rank; under DDP only rank 0 evaluates, under FSDP all do.
    """

    def __init__(self, cfg: ExperimentConfig, split, rank: int, device: torch.device):
        self.cfg, self.device = cfg, device
        self.every = cfg.eval.online_every
        self.here = self.every > 0 and (rank == 0 or cfg.scaling.strategy == "fsdp")
        self.split = None
        if self.every > 0 and split is None:
            raise ValueError("eval.online_every is set but the loop got no held-out split "
                             "(loop_config['online_split']); start training through "
                             "ssl_platform.train.trainer.fit, or set eval.online_every=0")
        if self.here:
            if not isinstance(split, dict):
                import ray

                split = ray.get(split)
            self.split = split

    def due(self, step: int, checkpoint_step: bool) -> bool:
        """Every ``online_every`` steps and at every checkpoint (the last step is one)."""
        return self.every > 0 and (step % self.every == 0 or checkpoint_step)

    def __call__(self, method: nn.Module) -> dict[str, float]:
        """The ``val_*`` metrics and ``online_eval_s`` (its seconds), or {} on a rank that does not evaluate."""
        if not self.here:
            return {}
        tic = time.perf_counter()
        metrics = online_metrics(method, self.split, self.cfg, self.device)
        return {**metrics, "online_eval_s": time.perf_counter() - tic}
