"""Evaluation of a finished run: one protocol per kind of data, and the results report.

``evaluate_run(cfg, checkpoint_dir, run_dir)`` picks the protocol of the run's method and
returns its table rows (also written as results.json, results.md and report.png):

- ``image``: SimCLR, BYOL, Barlow Twins, VICReg - linear probe and kNN against raw pixels,
  random init and a supervised encoder;
- ``clip``: CLIP - zero-shot classification, image<->text retrieval, a linear probe;
- ``audio``: CPC - linear probe and kNN of the context features;
- ``text``: BERT and GPT - MLM/NSP accuracy, perplexity, probes.

Building blocks: ``inference.extract`` (Ray Data batch inference), :mod:`ssl_platform.probes` (linear
probe, kNN), ``features`` (the supervised baseline), ``report`` (table and figure). Protocol modules are
imported only when used, so importing this package pulls in neither Ray nor a protocol's
dependencies.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ssl_platform.config import ExperimentConfig
from ssl_platform.evaluate.features import extract_features, train_supervised
from ssl_platform.evaluate.report import markdown_table, write_results
from ssl_platform.probes import knn_accuracy, linear_probe

# Kind of data a method trains on (its spec's data_kind) -> the module whose evaluate() scores it.
PROTOCOLS = {
    "image": "ssl_platform.evaluate.image",
    "image-caption": "ssl_platform.evaluate.clip",
    "audio": "ssl_platform.evaluate.audio",
    "text": "ssl_platform.evaluate.text",
}


def evaluate_run(cfg: ExperimentConfig, checkpoint_dir: str | Path, run_dir: str | Path) -> list[dict]:
    """Evaluate the checkpoint in ``checkpoint_dir`` with the protocol of ``cfg.method.name``,
    write the report into ``run_dir`` and return the table rows. Ray must be running."""
    from ssl_platform.data.context import configure_data_context
    from ssl_platform.methods import method_spec  # ssl_models and torch
    from ssl_platform.train import console

    configure_data_context(progress_bars=console.live())  # Ray Data's bars on a terminal, never its INFO lines
    kind = method_spec(cfg.method.name).data_kind
    if kind not in PROTOCOLS:
        raise ValueError(f"no evaluation protocol for method {cfg.method.name!r} (kind {kind!r}); "
                         f"kinds with one: {', '.join(PROTOCOLS)}")
    protocol = importlib.import_module(PROTOCOLS[kind])
    return protocol.evaluate(cfg, Path(checkpoint_dir), Path(run_dir))


__all__ = [
    "PROTOCOLS",
    "evaluate_run",
    "extract_features",
    "knn_accuracy",
    "linear_probe",
    "markdown_table",
    "train_supervised",
    "write_results",
]
