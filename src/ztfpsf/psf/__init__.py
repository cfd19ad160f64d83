"""The PSF of an image: profiles and pixel residual maps, the spatial basis, the joint fit
and the PSF file.

- :mod:`.basis`: Legendre polynomials in the image position;
- :mod:`.model`: :class:`PSFModel`, evaluation anywhere and the file format;
- :mod:`.joint`: :func:`fit_psf`, one PSF fitted to all stars of an image.
"""

from .joint import MODES, fit_psf
from .model import FORMAT_VERSION, PSFFileError, PSFModel

__all__ = ["fit_psf", "MODES", "PSFModel", "PSFFileError", "FORMAT_VERSION"]
