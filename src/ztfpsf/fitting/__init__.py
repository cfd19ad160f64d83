"""Batched PSF fitting: models, solvers and the ``fit_stamps`` entry point."""

from .api import METHODS, fit_stamps

__all__ = ["fit_stamps", "METHODS"]
