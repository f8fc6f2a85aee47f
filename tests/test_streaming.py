"""A corpus several times larger than the object store streams through a short training run.

The corpus is ~230 MB of PNG bytes in parquet files (conftest.big_image_corpus); the session's
Ray head has 100 MB of object store. The run must finish and make more than one whole pass over
the corpus; what must not happen is an out-of-memory failure. Each worker reads its own ids of
the epoch's order from the listed corpus (``data.listed``): the PNG bytes are read inside the
decode task and never enter the object store, so nothing needs to be spilled (measured on 2
cores: 0 MiB; the split stream before it spilled 385-678 MiB, its per-pass block shuffle held a
whole pass). The figure is printed, not asserted: the spill counter is the whole cluster's, and
the session's head runs other modules' jobs at the same time.
"""

import pytest
import torch
from conftest import BIG_RECORDS

from ssl_platform import methods
from ssl_platform.config import load_config
from ssl_platform.train.storage import run_paths
from ssl_platform.train.trainer import fit

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]  # see conftest


def test_corpus_larger_than_the_object_store_streams_through_training(big_image_corpus, tmp_path):
    steps = BIG_RECORDS // 32 + 2  # more than one pass over the corpus at a global batch of 32
    cfg = methods.validate(load_config("simclr-digits", [
        f"data.path={big_image_corpus}", "data.kind=image", "data.channels=3", "data.image_size=16",
        "eval.enabled=false",
        "eval.online_every=0",
        "model.encoder_widths=[8,16]", "model.projector_width=32", "model.projector_dim=16", "train.batch_size=32",
        f"train.max_steps={steps}", f"train.log_every={steps}", f"train.checkpoint_every={steps}",
        "train.optimizer=adamw", "train.lr=0.001", "data.transform_batch_size=32", f"runs_dir={tmp_path}",
        "name=stream"]))
    summary = fit(cfg, run_paths(cfg))
    state = torch.load(f"{summary.checkpoint}/state.pt", weights_only=True)
    assert state["step"] == steps and state["epoch"] >= 1  # at least one whole pass over the corpus
    # The summary says how much was spilled (the figure for the README is printed, not asserted).
    assert summary.spilled_bytes is not None and summary.spilled_bytes >= 0
    assert "  spill       " in summary.text()
    print(f"object store spilled {summary.spilled_bytes / 2**20:.0f} MiB")
