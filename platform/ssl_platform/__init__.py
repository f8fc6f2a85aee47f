"""ssl-platform: self-supervised and multimodal pretraining on Ray.

The Ray side of the platform: typed configs and presets (``config``), Ray Data corpora and
transforms (``data``), Ray Train per-worker loop (``train``), evaluation (``evaluate``) and the
``sslp`` command line (``cli``). The models live in the Ray-free ``ssl_models`` package.
"""

__version__ = "0.1.0"
