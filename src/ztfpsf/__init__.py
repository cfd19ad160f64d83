"""ztfpsf: fast, batched PSF fitting for survey images (ZTF first), in JAX.

Pixel coordinates are 0-based with pixel centres at integers (numpy/astropy).
Importing ztfpsf leaves JAX as the host set it; ``ztfpsf.configure()`` is the optional
process-wide set-up (float64, CPU devices, compilation cache) of ztfpsf's own commands.
"""

__version__ = "0.1.0"

from ._jax import configure
from .flags import BAD, Flag
from .fitting import METHODS, fit_stamps
from .psf import fit_psf
from .models import EllipticalMoffat, Gaussian, Moffat, get_model
from .photometry import photometry
from .psf import PSFModel

__all__ = [
    "configure", "fit_stamps", "fit_psf", "photometry", "PSFModel", "METHODS", "Flag", "BAD",
    "Gaussian", "Moffat", "EllipticalMoffat", "get_model", "__version__",
]
