"""The linear probe and the kNN classifier, re-exported from :mod:`ssl_platform.probes`.

They live below ``train`` because the training loop's online evaluation uses the kNN as well;
this name keeps ``from ssl_platform.evaluate.probe import knn_accuracy, linear_probe`` working.
"""

from ssl_platform.probes import knn_accuracy, linear_probe

__all__ = ["knn_accuracy", "linear_probe"]
