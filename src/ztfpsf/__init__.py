"""ztfpsf: fast, batched PSF fitting for survey images (ZTF first), in JAX.

Pixel coordinates are 0-based with pixel centres at integers (numpy/astropy).
"""

__version__ = "0.1.0"

from ._jax import configure as _configure

_configure()

from .flags import BAD, Flag  # noqa: E402
from .fitting import METHODS, fit_stamps  # noqa: E402
from .psf import fit_psf  # noqa: E402
from .models import EllipticalMoffat, Gaussian, Moffat, get_model  # noqa: E402
from .photometry import photometry  # noqa: E402
from .psf import PSFModel  # noqa: E402

__all__ = [
    "fit_stamps", "fit_psf", "photometry", "PSFModel", "METHODS", "Flag", "BAD",
    "Gaussian", "Moffat", "EllipticalMoffat", "get_model", "__version__",
]
