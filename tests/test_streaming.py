"""A corpus several times larger than the object store streams through a short training run.

The corpus is ~230 MB of PNG bytes in parquet files; the Ray instance gets 100 MB of object
store. The run must finish and make more than one whole pass over the corpus. Ray may spill
blocks to disk under that pressure (measured: a few hundred MiB on 2 cores, where the decode
stage runs ahead of the two train workers); what must not happen is an out-of-memory failure.
"""

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from ssl_platform import methods
from ssl_platform.config import load_config
from ssl_platform.train.trainer import fit, run_paths

pytestmark = pytest.mark.ray

RECORDS, SIDE = 1200, 256  # 1200 x 192 KiB of uncompressed PNG: ~230 MiB on disk and in flight
STORE = 100 * 2**20


def png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """A folder of parquet files, 50 images each: files are how a real corpus arrives, and each
    one stays far below the object store."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    for start in range(0, RECORDS, 50):  # written file by file: the test itself stays small in memory
        table = pa.table({"image": [png(rng) for _ in range(50)], "label": list(range(start, start + 50))})
        pq.write_table(table, root / f"part-{start // 50:03d}.parquet", row_group_size=10)
    assert sum(p.stat().st_size for p in root.iterdir()) > 2 * STORE
    return root


@pytest.fixture(scope="module")
def small_store():
    # address="local": a new instance even if another test's cluster runs on this machine.
    ray.init(address="local", num_cpus=2, object_store_memory=STORE, include_dashboard=False)
    yield
    ray.shutdown()


def spilled_mib() -> float:
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    match = re.search(r"Spilled (\d+) MiB", summary)
    return float(match.group(1)) if match else 0.0


def test_corpus_larger_than_the_object_store_streams_through_training(big_corpus, small_store, tmp_path):
    steps = RECORDS // 32 + 2  # more than one pass over the corpus at a global batch of 32
    cfg = methods.validate(load_config("simclr-digits", [
        f"data.path={big_corpus}", "data.kind=image", "data.channels=3", "data.image_size=16", "eval.enabled=false",
        "eval.online_every=0",
        "model.encoder_widths=[8,16]", "model.projector_width=32", "model.projector_dim=16", "train.batch_size=32",
        f"train.max_steps={steps}", f"train.log_every={steps}", f"train.checkpoint_every={steps}",
        "train.optimizer=adamw", "train.lr=0.001", "data.transform_batch_size=32", f"runs_dir={tmp_path}",
        "name=stream"]))
    summary = fit(cfg, run_paths(cfg))
    state = torch.load(f"{summary.checkpoint}/state.pt", weights_only=True)
    assert state["step"] == steps and state["epoch"] >= 1  # at least one whole pass over the corpus
    print(f"object store spilled {spilled_mib():.0f} MiB")  # a figure for the README, not an assertion
