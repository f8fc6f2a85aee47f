"""The platform's settings of Ray Data's execution, in every process that builds a Dataset: the
driver (the split stream, evaluation, embed) and each train worker (its ordered stream)."""

from __future__ import annotations

import warnings

import ray.data

# Ray 2.60's DataContext assigns its own deprecated fields (``use_push_based_shuffle``,
# ``use_polars``, ``use_arrow_tensor_v2``) in its dataclass ``__init__``, through a ``__setattr__``
# that warns on every assignment of them: the first ``DataContext.get_current()`` of a process
# warns three times whatever the caller does (we set none of them). Only those three are hidden.
_RAY_OWN_DEPRECATIONS = r"`(use_push_based_shuffle|use_polars|use_arrow_tensor_v2)` is deprecated"


def current_data_context() -> ray.data.DataContext:
    """``DataContext.get_current()``, without the deprecation notices Ray's own constructor gives."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_RAY_OWN_DEPRECATIONS, category=DeprecationWarning)
        return ray.data.DataContext.get_current()


def configure_data_context(progress_bars: bool = False, per_operator: bool = False) -> None:
    """The platform's settings of Ray Data's execution, for every Dataset this process builds
    afterwards (a Dataset keeps a copy of the context it was built under).

    - Progress bars only where asked: during training Ray Data's bars would drown the training
      progress line; evaluation (one bar per pass) and embed (``per_operator``: a bar for each of
      read, decode, embed, write) show them on a terminal (``train.console.live()``); in a pipe
      Ray Data would log its progress instead.
    - No per-operator resource reservation (``op_resource_reservation_enabled``): in Ray 2.60 it
      held a decode + augment ``map_batches`` on a 2-core machine to one task at a time for 80%
      of a pass (the operator's CPU budget kept falling to zero while a task ran), 43% of what
      the two cores do. Without it the operator runs one task per free CPU (`sslp bench data`
      prints both side by side); memory stays bounded by the downstream-capacity backpressure,
      which stays on.
    """
    ctx = current_data_context()
    ctx.enable_progress_bars = progress_bars
    ctx.enable_operator_progress_bars = progress_bars and per_operator
    ctx.print_on_execution_start = False
    ctx.op_resource_reservation_enabled = False
