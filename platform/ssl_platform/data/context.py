"""The platform's settings of Ray Data's execution, in every process that builds a Dataset: the
driver (the split stream, evaluation, embed) and each train worker (its ordered stream)."""

from __future__ import annotations

import ray.data


def configure_data_context() -> None:
    """The platform's settings of Ray Data's execution, for every Dataset this process builds
    afterwards (a Dataset keeps a copy of the context it was built under).

    - No progress bars: Ray Data's per-operator bars would drown the training progress line.
    - No per-operator resource reservation (``op_resource_reservation_enabled``): in Ray 2.60 it
      held a decode + augment ``map_batches`` on a 2-core machine to one task at a time for 80%
      of a pass (the operator's CPU budget kept falling to zero while a task ran), 43% of what
      the two cores do. Without it the operator runs one task per free CPU (`sslp bench data`
      prints both side by side); memory stays bounded by the downstream-capacity backpressure,
      which stays on.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.op_resource_reservation_enabled = False
