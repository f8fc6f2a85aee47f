"""`sslp finetune`: fine-tuning a pretrained digits encoder through the training loop, beside the
frozen probe and a random-init fine-tune; labelled-source checks."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ssl_platform import cli
from ssl_platform.config import with_overrides
from ssl_platform.finetune import Settings
from ssl_platform.finetune.protocol import finetune
from ssl_platform.train.checkpoint import load_payload

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]  # see conftest


@pytest.fixture(scope="module")
def pretrained(trained_simclr):
    """The session's SimCLR digits encoder, 150 steps (its frozen probe: ~90% on 50 labels)."""
    return trained_simclr


def test_finetuning_the_pretrained_encoder_beats_random_init(pretrained, tmp_path):
    cfg, checkpoint = pretrained
    cfg = with_overrides(cfg.to_dict(), ["data.seed=0"])  # the same crops and batches in every run of the test
    # Local mode (--workers 0): both fine-tunes run the loop in this process, without Ray Train's
    # worker processes (~60 CPU-s each on 2 cores); the loop with workers is test_run_e2e's.
    rows = finetune(cfg, checkpoint, "digits", tmp_path,
                    Settings(steps=60, batch_size=32, train_examples=50, lr=0.05, workers=0))
    assert [r["encoder"] for r in rows] == ["fine-tuned (pretrained)", "linear probe (frozen)",
                                            "fine-tuned (random init)"]
    top1 = {r["encoder"]: r["top1"] for r in rows}
    assert all(0.0 <= v <= 1.0 for v in top1.values())
    # Measured with data.seed=0 (the crops and the order are then fixed: two runs gave the same
    # figures): 85.6% against 73.9% (50 labels, 360 held-out digits; the frozen probe 89.7%: on clean
    # digits a probe of this encoder is hard to beat, on digits-m the fine-tune wins, see the README);
    # chance is 10%. (Before the labelled split was read as an ordered stream: 81.7% and 82.8% against
    # 60.8% and 58.1%, and without a data seed one CI run measured 85.0% against 76.4%.)
    assert top1["fine-tuned (pretrained)"] > top1["fine-tuned (random init)"] + 0.1
    table = (tmp_path / "results.md").read_text()
    assert all(name in table for name in top1) and "held-out top-1" in table

    # End to end: the encoder moved; the projector, which the classifier never uses, stayed frozen.
    before = load_payload(checkpoint)["model"]
    after = load_payload(rows[0]["checkpoint"])["model"]
    assert set(after) >= {f"method.{k}" for k in before} and any(k.startswith("head.") for k in after)
    encoder = [k for k in before if k.startswith("encoder.") and before[k].is_floating_point()]
    assert any(not torch.equal(before[k], after[f"method.{k}"]) for k in encoder)
    projector = [k for k in before if k.startswith("projector.") and "running" not in k]
    assert projector and all(torch.equal(before[k], after[f"method.{k}"]) for k in projector)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_sources_without_labels_are_refused(pretrained, tmp_path):
    cfg, checkpoint = pretrained
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(_png(40 * i))
    with pytest.raises(ValueError, match="no class sub-folders"):
        finetune(cfg, checkpoint, str(folder), tmp_path / "out")
    table = tmp_path / "table.parquet"
    pq.write_table(pa.table({"image": [_png(40 * i) for i in range(4)]}), table)
    with pytest.raises(ValueError, match="has no labels"):
        finetune(cfg, checkpoint, str(table), tmp_path / "out")


def test_cli_refuses_unlabelled_builtins_and_missing_runs(pretrained, tmp_path, capsys):
    _, checkpoint = pretrained
    assert cli.main(["finetune", str(checkpoint), "--data", "digit-captions"]) == cli.EXIT_USAGE
    assert "not a labelled image corpus" in capsys.readouterr().err
    assert cli.main(["finetune", str(tmp_path / "nope"), "--data", "digits"]) == cli.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["finetune", str(checkpoint), "--data", "digits", "--labelled-fraction", "1.5"]) == cli.EXIT_USAGE
    assert "--labelled-fraction" in capsys.readouterr().err
