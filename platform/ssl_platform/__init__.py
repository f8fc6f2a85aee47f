"""ssl-platform: self-supervised and multimodal pretraining on Ray.

The Ray side of the platform: typed configs and presets (``config``), Ray Data corpora and
transforms (``data``), Ray Train per-worker loop (``train``), evaluation (``evaluate``) and the
``sslp`` command line (``cli``). The models live in the Ray-free ``ssl_models`` package.

``ssl_platform.load(run_dir)`` gives a finished run's encoder ready to embed raw inputs
(``pretrained``). It is resolved on first use, so ``import ssl_platform`` stays light (no torch).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("load", "Pretrained"):
        from ssl_platform import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'ssl_platform' has no attribute {name!r}")
