"""Objectives: small modules that take embeddings and return a scalar loss."""

from ssl_models.losses.ntxent import NTXentLoss

__all__ = ["NTXentLoss"]
