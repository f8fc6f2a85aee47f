"""Batch inference with Ray Data: a frozen method's features for every row of a Dataset.

Every evaluation protocol (image probes, CLIP zero-shot and retrieval, CPC probes, BERT/GPT
scores) first turns a held-out split into arrays of features. :func:`extract` does it the way
Ray's batch-inference guide does: ``map_batches`` over an actor pool, where each actor builds
the method once, loads the weights from the object store (one copy per node, not one per
batch), and then only runs forward passes, in eval mode and without gradients, on a GPU when
the actor was given one. The same call scales from a laptop to a cluster by raising
``eval.actors``; the driver only concatenates the results.

A table compares several encoders of one architecture on the same rows (this run, random init,
the supervised baseline): :func:`extract_each` encodes every batch with each of them in the same
actors, so the rows are read, decoded and transformed once and one actor pool starts, not one per
encoder (each actor process costs seconds of CPU to start: Python, torch, the method), and the
encoders' features come back row-aligned.

``encode`` says what a feature is for a method: a module-level (so picklable) function
``(method, batch) -> Tensor | dict[str, Tensor]``, e.g. ``lambda m, b: m.embed(b)`` written as a
``def``. It receives the batch's numeric columns as tensors on the actor's device and its other
columns (strings) as numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import ray
import ray.data
import torch
from torch import Tensor, nn

from ssl_platform import methods
from ssl_platform.config import ExperimentConfig

Encode = Callable[[nn.Module, dict[str, Any]], Tensor | dict[str, Tensor]]


def build_method(cfg: ExperimentConfig, derived: dict[str, Any], state: dict[str, Tensor] | None,
                 seed: int = 0) -> nn.Module:
    """The method of ``cfg`` in eval mode: random init under ``torch.manual_seed(seed)``, then
    ``state`` (a method state_dict, e.g. ``load_payload(dir)["model"]``) loaded if given.

    The seeded build is also what a caller reproduces to get the same random-init baseline.
    """
    torch.manual_seed(seed)
    method = methods.build(cfg, **derived)
    if state is not None:
        method.load_state_dict(state)
    return method.eval()


def check_state(cfg: ExperimentConfig, derived: dict[str, Any], state: dict[str, Tensor]) -> None:
    """ValueError unless ``state`` has exactly the parameter names and shapes of the method of
    ``cfg``. Checked on the driver against a build on the meta device (no memory, no init), so
    a checkpoint from another config fails here in one line instead of in every actor."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in methods.build(cfg, **derived).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    shapes = [f"{k} {got[k]} vs {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {missing[:3]}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:3]}")
    if shapes:
        problems.append(f"shape of {'; '.join(shapes[:2])} (checkpoint vs config)")
    if problems:
        raise ValueError(f"the checkpoint does not fit method {cfg.method.name} with model={cfg.model}: "
                         f"{', '.join(problems)}; evaluate with the config the run was trained with")


def _to_numpy(value: Tensor) -> np.ndarray:
    value = value.detach()
    if value.is_floating_point() and value.dtype != torch.float64:
        value = value.float()  # bf16/fp16 have no numpy dtype
    return value.cpu().numpy()


class EncodeBatches:
    """``map_batches`` actor: builds the methods once, then encodes batch after batch with each.

    Args:
        cfg, derived, seed: what :func:`build_method` needs.
        state_refs: ``[ObjectRef or None, ...]``, one per encoder: the reference of its state_dict
            (in a list so Ray hands the references over unresolved and the actor fetches each
            once), or ``None`` for random init.
        encode: ``(method, batch) -> Tensor | dict[str, Tensor]``.
        keep: columns copied through to the output, row-aligned with the features.
        threads: torch intra-op threads for this actor (its CPU share).

    Encoder ``i``'s output column ``key`` is named ``f"{i}/{key}"``; the kept columns keep their names.
    """

    def __init__(self, cfg: ExperimentConfig, derived: dict[str, Any], state_refs: list, encode: Encode,
                 keep: Sequence[str], seed: int, threads: int):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Each built as build_method does (seeded, then the state): random init is the same
        # network whichever encoders share the actor.
        self.methods = [build_method(cfg, derived, ray.get(ref) if ref is not None else None, seed).to(self.device)
                        for ref in state_refs]
        self.encode, self.keep = encode, tuple(keep)

    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = {}
        for key, value in batch.items():
            if isinstance(value, np.ndarray) and (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
                # Ray hands read-only arrays over; copy only then (torch warns on read-only memory).
                out[key] = torch.from_numpy(np.require(value, requirements=["C", "W"])).to(self.device)
            else:
                out[key] = value  # strings and ragged columns stay numpy
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [k for k in self.keep if k not in batch]
        if missing:
            raise ValueError(f"keep={list(self.keep)} names columns {missing} that the dataset lacks "
                             f"(it has {sorted(batch)})")
        rows = len(next(iter(batch.values())))
        tensors = self._tensors(batch)
        out = {}
        for i, method in enumerate(self.methods):
            with torch.no_grad():
                result = self.encode(method, tensors)
            features = {"features": result} if isinstance(result, Tensor) else dict(result)
            clash = sorted(set(features) & set(self.keep))
            if clash:
                raise ValueError(f"encode's output {clash} has the same name as a kept column; rename one of them")
            for key, value in features.items():
                if not isinstance(value, Tensor) or value.dim() == 0 or len(value) != rows:
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"encode returned {key!r} of shape {shape} for a batch of {rows} rows; "
                                     f"it must return a (rows, ...) tensor, or a dict of them, per batch")
                out[f"{i}/{key}"] = _to_numpy(value)
        for key in self.keep:
            out[key] = np.asarray(batch[key])
        return out


def actor_resources(actors: int, use_gpu: bool) -> tuple[float, float]:
    """(CPUs, GPUs) per actor of a pool of ``actors``. The pool leaves one CPU to the stages
    before it (reading, decoding, tokenising): on a 2-CPU machine two actors of 1 CPU would
    starve them and hang. With ``use_gpu`` and GPUs in the cluster, a GPU each (a share when
    there are more actors than GPUs, which would otherwise wait forever for one)."""
    total = ray.cluster_resources()
    cpus = max(0.25, min(1.0, (total.get("CPU", 1.0) - 1.0) / actors))
    gpus = total.get("GPU", 0.0)
    return cpus, (min(1.0, gpus / actors) if use_gpu and gpus > 0 else 0.0)


def extract(ds: ray.data.Dataset, cfg: ExperimentConfig, derived: dict[str, Any], state: dict[str, Tensor] | None,
            encode: Encode, *, keep: Sequence[str] = ("label",), seed: int = 0) -> dict[str, np.ndarray]:
    """Features of every row of ``ds`` from the (frozen) method of ``cfg``, by Ray Data batch inference.

    ``cfg.eval.actors`` actors, each holding one copy of the method, encode batches of
    ``cfg.eval.batch_size`` rows in eval mode without gradients (on a GPU each when
    ``scaling.use_gpu`` and the cluster has GPUs). Ray must already be initialised.

    Args:
        ds: rows holding what ``encode`` reads (``image``, ``text``, ``audio``, ...) and the
            ``keep`` columns.
        derived: data-derived constructor arguments (``in_channels``, ``vocab_size``, ...).
        state: the method's state_dict; ``None`` gives the random-init baseline, built under
            ``torch.manual_seed(seed)`` exactly like :func:`build_method`.
        encode: module-level function ``(method, batch) -> Tensor | dict[str, Tensor]``; numeric
            columns arrive as tensors on the actor's device, strings as numpy arrays.
        keep: columns passed through, row-aligned with the features (labels, ids).

    Returns:
        ``{"features": (N, ...)}`` for a Tensor result, or the dict's keys, plus the ``keep``
        columns, each concatenated over the whole dataset. Rows are aligned across keys; the
        row order need not be the input order (join on a kept id column if it matters).
    """
    return extract_each(ds, cfg, derived, {"": state}, encode, keep=keep, seed=seed)[""]


def extract_each(ds: ray.data.Dataset, cfg: ExperimentConfig, derived: dict[str, Any],
                 states: Mapping[str, dict[str, Tensor] | None], encode: Encode, *, keep: Sequence[str] = ("label",),
                 seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """:func:`extract` for several encoders of ``cfg``'s architecture in one pass over ``ds``:
    ``{name: state_dict, or None for random init}`` -> ``{name: extract's result}``.

    Every actor holds all of them and encodes each batch with each, so ``ds`` is read once and one
    actor pool starts; every name's result holds the ``keep`` columns and its rows in ``ds``'s
    order, whatever the number of actors and whichever finishes first (so a table is the same
    from run to run).
    """
    if not ray.is_initialized():
        raise RuntimeError("extract runs on Ray Data; call ray.init() (or use `sslp eval`, which starts Ray) first")
    if isinstance(keep, str):
        raise ValueError(f"keep must be a sequence of column names, got the string {keep!r}; use keep=({keep!r},)")
    if not states:
        raise ValueError("no encoder to extract features with: states is empty")
    schema = ds.schema(fetch_if_missing=False)  # known without running anything for in-memory data
    missing = [k for k in keep if schema is not None and k not in schema.names]
    if missing:
        raise ValueError(f"keep={list(keep)} names columns {missing} that the dataset lacks (it has {schema.names})")
    for state in states.values():
        if state is not None:
            check_state(cfg, derived, state)
    state_refs = [ray.put({k: v.detach().cpu() for k, v in state.items()}) if state is not None else None
                  for state in states.values()]
    cpus, gpus = actor_resources(cfg.eval.actors, cfg.scaling.use_gpu)
    encoded = ds.map_batches(
        EncodeBatches,
        fn_constructor_kwargs={"cfg": cfg, "derived": dict(derived), "state_refs": state_refs, "encode": encode,
                               "keep": tuple(keep), "seed": seed, "threads": max(1, int(cpus))},
        compute=ray.data.ActorPoolStrategy(size=cfg.eval.actors),
        batch_size=cfg.eval.batch_size, batch_format="numpy", num_cpus=cpus, num_gpus=gpus,
    )
    # Rows in the dataset's order, whichever actor finishes first: the probes' float sums follow the
    # row order, and random init's digits-m probe moved between 21.1 and 21.4 from run to run with it.
    encoded.context.execution_options.preserve_order = True
    parts: dict[str, list[np.ndarray]] = {}
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    if not parts:
        raise ValueError("the dataset to evaluate on is empty; check the corpus and data.val_fraction")
    columns = {key: np.concatenate(values) for key, values in parts.items()}
    kept = {key: columns[key] for key in keep}
    results = {}
    for i, name in enumerate(states):
        prefix = f"{i}/"
        results[name] = {key.removeprefix(prefix): value for key, value in columns.items() if key.startswith(prefix)}
        results[name].update(kept)
    return results
