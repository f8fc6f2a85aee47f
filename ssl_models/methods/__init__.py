"""Methods: an encoder, heads and an objective composed into one ``nn.Module``."""

from ssl_models.methods.simclr import SimCLR

__all__ = ["SimCLR"]
