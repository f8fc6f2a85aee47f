"""What a method declares about itself: plain data the platform reads instead of its name.

Every method class carries ``spec = MethodSpec(...)``. The platform (data pipelines, online and
final evaluation, ``load``, export, sweeps) reads these fields and never branches on a method's
name, so a method that eats an existing kind of batch is one module here and one preset.

This module imports neither torch nor anything of ours: a spec is data, checkable anywhere.

Example (SimCLR's)::

    spec = MethodSpec(
        display_name="SimCLR", data_kind="image", batch_keys=("view1", "view2"), embeds=("image",),
        online_metric="val_knn_top1", online_mode="max",
        objective_keys=frozenset({"temperature", "gather_distributed"}), derived=("in_channels",),
        views=(SIMCLR_VIEW, SIMCLR_VIEW), views_recipe="SimCLR (Chen et al. 2020, appendix A)")
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The kinds of corpus the platform has a pipeline and an evaluation protocol for.
DATA_KINDS = ("image", "image-caption", "audio", "text")
# What a frozen encoder can embed (``ssl_platform.load(...).embed_images`` / ``_texts`` / ``_audio``).
MODALITIES = ("image", "text", "audio")
# Text batches: masked sentence pairs (masked-LM labels, next-sentence labels, segment ids) or
# packed blocks of a causal LM.
TOKEN_BATCHES = ("masked_pairs", "blocks")
TOKENIZERS = ("wordpiece", "bpe")
# How ``embed`` reads one feature off a sequence: the first ([CLS]) token's state, or the mean
# of the real tokens' states.
POOLINGS = ("cls", "mean")
# How ``train.grad_accum_mode=exact`` makes k accumulated micro-batches give one big batch's gradient:
# "gradcache": the loss couples the samples (negatives, batch statistics), and the method splits its
#   forward into ``features(batch)`` and ``objective(features)`` (see ``ssl_models.protocol``), so the
#   loss is taken over the features of all k micro-batches and each is re-run with its cached
#   feature gradient (GradCache, Gao et al. 2021);
# "mean": the loss is a mean of per-sample terms, so plain accumulation of the 1/k-scaled micro-batch
#   losses already is the big batch's gradient;
# "": neither: exact mode falls back to independent micro-batches, and the run's first line says so.
ACCUMULATIONS = ("gradcache", "mean")


@dataclass(frozen=True)
class MethodSpec:
    """Everything the platform needs to know about a method, declared next to it.

    Args:
        display_name: how reports and tables name the method ("Barlow Twins").
        data_kind: the corpus it trains on, one of :data:`DATA_KINDS`; picks the data
            pipeline and the evaluation protocol.
        batch_keys: the keys ``forward(batch)`` reads (optional ones included).
        embeds: the modalities its frozen encoder embeds, from :data:`MODALITIES`.
        online_metric: the primary ``val_*`` metric of the online evaluation: what sweeps
            optimise and early stopping watches.
        online_mode: ``"max"`` or ``"min"``: which way ``online_metric`` improves.
        objective_keys: constructor arguments that are the objective's hyperparameters
            (``method.*`` keys); every other one is architecture (``model.*``) or derived.
        derived: constructor arguments the platform fills in from the data (``in_channels``,
            ``image_size``, ``vocab_size``, ``max_len``, ``sample_rate``); saved in checkpoints.
        views: image methods: one mapping per view of ``AugmentConfig`` field -> value, the
            paper's augmentation (the platform's defaults fill the rest). The pipeline yields
            view i as ``batch["view{i}"]``: two views of one size, one view, or multi-crop
            (``size_frac`` < 1 for the local views, ``crop_scale_min``/``crop_scale_max`` their
            area; see ``ssl_platform.views``).
        views_recipe: whose recipe ``views`` is, in words (docs and the run header).
        token_batches: text methods: ``"masked_pairs"`` or ``"blocks"`` (:data:`TOKEN_BATCHES`).
        tokenizer: text methods: the tokenizer ``data.tokenizer=auto`` trains (:data:`TOKENIZERS`).
        pooling: text methods: how ``embed`` pools a sequence (:data:`POOLINGS`).
        accumulation: how exact gradient accumulation works for it (:data:`ACCUMULATIONS`; empty:
            it does not, micro-batches stay independent).
        accumulation_note: what is still not exact across micro-batches besides BatchNorm (which
            the platform detects itself), in words for the run header; empty if nothing.
    """

    display_name: str
    data_kind: str
    batch_keys: tuple[str, ...]
    embeds: tuple[str, ...]
    online_metric: str
    online_mode: str
    objective_keys: frozenset[str] = frozenset()
    derived: tuple[str, ...] = ()
    views: tuple[Mapping[str, Any], ...] = ()
    views_recipe: str = ""
    token_batches: str = ""
    tokenizer: str = ""
    pooling: str = ""
    accumulation: str = ""
    accumulation_note: str = ""


# Fields every spec must fill, and those its data kind needs on top.
REQUIRED = ("display_name", "data_kind", "batch_keys", "embeds", "online_metric", "online_mode")
REQUIRED_BY_KIND = {"image": ("views",), "text": ("token_batches", "tokenizer", "pooling")}
CHOICES = {"data_kind": DATA_KINDS, "online_mode": ("max", "min"), "token_batches": TOKEN_BATCHES,
           "tokenizer": TOKENIZERS, "pooling": POOLINGS,
           "accumulation": ACCUMULATIONS}


def spec_problems(method: type) -> list[str]:
    """What is missing or wrong in ``method.spec``, in words (empty when the spec is complete).

    Checked against the class itself: the argument names it lists must be its constructor's.
    """
    spec = getattr(method, "spec", None)
    if not isinstance(spec, MethodSpec):
        return [f"{method.__name__} has no spec (a MethodSpec class attribute, see ssl_models.spec)"]
    problems = [f"spec.{name} is empty" for name in
                (*REQUIRED, *REQUIRED_BY_KIND.get(spec.data_kind, ())) if not getattr(spec, name)]
    for name, choices in CHOICES.items():
        value = getattr(spec, name)
        if value and value not in choices:
            problems.append(f"spec.{name}={value!r} is not one of {', '.join(choices)}")
    if spec.online_metric and not spec.online_metric.startswith("val_"):
        problems.append(f"spec.online_metric={spec.online_metric!r} does not start with val_")
    if unknown := sorted(set(spec.embeds) - set(MODALITIES)):
        problems.append(f"spec.embeds names {', '.join(unknown)}; modalities: {', '.join(MODALITIES)}")
    params = set(inspect.signature(method.__init__).parameters) - {"self"}
    for name in ("objective_keys", "derived"):
        if unknown := sorted(set(getattr(spec, name)) - params):
            problems.append(f"spec.{name} names {', '.join(unknown)}, which the constructor does not take")
    if spec.data_kind == "image" and spec.views:
        yields = tuple(f"view{i + 1}" for i in range(len(spec.views)))
        if set(spec.batch_keys) != set(yields):
            problems.append(f"spec.batch_keys {', '.join(spec.batch_keys)} do not match spec.views: the image "
                            f"pipeline yields one key per view, {', '.join(yields)}")
    split = all(callable(getattr(method, name, None)) for name in ("features", "objective"))
    if spec.accumulation == "gradcache" and not split:
        problems.append("spec.accumulation='gradcache' needs the methods features(batch) and objective(features)")
    if overlap := sorted(set(spec.objective_keys) & set(spec.derived)):
        problems.append(f"spec.objective_keys and spec.derived both name {', '.join(overlap)}")
    return problems

