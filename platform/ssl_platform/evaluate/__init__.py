"""Frozen-feature evaluation and the results report.

``probe``: linear probe and weighted kNN top-1 on (N, D) features. ``features``: feature
extraction from a frozen encoder and the supervised baseline encoder. ``report``: the results
table (markdown, JSON) and the report figure. ``frozen``: the whole table for an image run.
"""

from ssl_platform.evaluate.features import extract_features, train_supervised
from ssl_platform.evaluate.probe import knn_accuracy, linear_probe
from ssl_platform.evaluate.report import markdown_table, write_results

__all__ = ["extract_features", "train_supervised", "knn_accuracy", "linear_probe", "markdown_table", "write_results"]
