"""Cut star stamps out of an image, all at once, and choose the noise model of their fit.

A stamp of ``size`` x ``size`` px (odd) is centred on the pixel nearest to the star
(``round(x), round(y)``); the sub-pixel position is kept in ``x_init, y_init`` and
``origin`` is the image (x, y) of the stamp's pixel [0, 0], so that
``fit_stamps(..., x_init=, y_init=, origin=)`` returns image coordinates.
"""

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["Stamps", "cut_stamps", "cut", "stamp_origin", "noise_model", "core_offsets"]


@dataclass
class Stamps:
    """A stack of N stamps (image pixels, 0-based coordinates).

    Attributes
    ----------
    data : (N, s, s) float, image dtype; NaN where the stamp leaves the image
    mask : (N, s, s) bool, True for unusable pixels (the image mask, and pixels off the image)
    saturated : (N, s, s) bool
    origin : (N, 2) float, image (x, y) of pixel [0, 0] of each stamp
    x_init, y_init : (N,) float, the star positions in image coordinates
    off_image : (N,) bool, the stamp is not fully inside the image (flag ``OFF_IMAGE``)
    sky_rms : (N, s, s) float or None, background rms cut from ``background.rms``
    sky : (N,) float or None, background level at each star (``background.level``)
    """

    data: np.ndarray
    mask: np.ndarray
    saturated: np.ndarray
    origin: np.ndarray
    x_init: np.ndarray
    y_init: np.ndarray
    off_image: np.ndarray
    sky_rms: np.ndarray | None = None
    sky: np.ndarray | None = None

    def __len__(self):
        return self.data.shape[0]

    @property
    def size(self):
        return self.data.shape[1]

    @property
    def bad(self):
        """Pixels the fit must not use: masked or saturated (NaN pixels are masked)."""
        return self.mask | self.saturated


def stamp_origin(x, y, size):
    """Integer image (x, y) of pixel [0, 0] of the ``size`` stamp centred on the pixel nearest
    each position: ``round(x) - size // 2``, halves rounded up (not numpy's half-to-even).
    Float arrays; NaN where the position is not finite."""
    half = int(size) // 2
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5) - half, np.floor(np.asarray(y, dtype=np.float64) + 0.5) - half


def _index(x0, y0, size, shape):
    """Row and column indices (clipped to the image) of the stamps and where they are inside."""
    offsets = np.arange(int(size))
    rows = (np.asarray(y0, dtype=np.int64)[:, None] + offsets)[:, :, None]  # (N, s, 1)
    cols = (np.asarray(x0, dtype=np.int64)[:, None] + offsets)[:, None, :]  # (N, 1, s)
    ny, nx = shape
    inside = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    return np.clip(rows, 0, ny - 1), np.clip(cols, 0, nx - 1), inside


def cut(image, x0, y0, size, fill=np.nan):
    """``(N, size, size)`` stamps of ``image`` with pixel [0, 0] at integer ``(x0, y0)``;
    pixels off the image are ``fill``. One fancy-indexing gather, no loop over stars."""
    rows, cols, inside = _index(x0, y0, size, image.shape)
    return np.where(inside, image[rows, cols], fill)


def cut_stamps(exposure, x, y, size=17, *, background=None):
    """Stamps of ``size`` x ``size`` px around each (x, y) (0-based image pixels).

    Vectorised: one fancy-indexing gather per image plane, no loop over stars. A star
    whose stamp leaves the image (or whose position is not finite) is not an error: the
    missing pixels are NaN and masked, ``off_image`` is True.

    Parameters
    ----------
    exposure : ztfpsf.io.fits.Exposure
    x, y : (N,) float
    size : int, odd
    background : ztfpsf.detect.Background, optional
        Also cut the background rms (``sky_rms``) and read the sky level at each star
        (``sky``), for :func:`noise_model`.
    """
    size = int(size)
    if size < 3 or size % 2 == 0:
        raise ValueError(f"stamp size must be an odd integer >= 3; got {size}")
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D arrays of the same length; got {x.shape} and {y.shape}")
    ny, nx = exposure.data.shape
    finite = np.isfinite(x) & np.isfinite(y)
    x0, y0 = (np.where(finite, v, 0).astype(np.int64) for v in stamp_origin(x, y, size))
    rows, cols, inside = _index(x0, y0, size, (ny, nx))
    inside = inside & finite[:, None, None]
    data = np.where(inside, exposure.data[rows, cols], np.nan)
    mask = np.where(inside, exposure.mask[rows, cols], True)
    saturated = np.where(inside, exposure.saturated[rows, cols], False)
    origin = np.stack([x0, y0], axis=1).astype(np.float64)
    origin[~finite] = np.nan
    off = ~inside.all(axis=(1, 2))
    stamps = Stamps(data=data, mask=mask, saturated=saturated, origin=origin, x_init=x.copy(), y_init=y.copy(), off_image=off)
    if background is not None:
        stamps.sky_rms = np.where(inside, background.rms[rows, cols], np.nan)
        cx, cy = np.clip(x0 + size // 2, 0, nx - 1), np.clip(y0 + size // 2, 0, ny - 1)
        stamps.sky = np.where(finite, background.level[cy, cx], np.nan)
    if off.any():
        log.debug("%s: %d of %d stamps leave the image (masked there)", exposure.name, int(off.sum()), len(x))
    return stamps


def core_offsets(radius):
    """(dy, dx) integer offsets of the pixels within ``radius`` of a pixel centre (a disc)."""
    r = int(np.floor(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = dy**2 + dx**2 <= radius**2 + 1e-9
    return dy[keep], dx[keep]


def noise_model(exposure, stamps=None, background=None):
    """How :func:`ztfpsf.fit_stamps` should weight the pixels of this image.

    Returns ``(kwargs, description)``; pass ``**kwargs`` to ``fit_stamps``.

    * Gain known (header ``GAIN`` or option): ``gain`` and ``read_noise``: the variance is
      ``model/gain + (read_noise/gain)**2`` with the fitted model (its background term
      is the sky, so ``sky=0``: the stamps are not sky-subtracted). Without a read noise
      (header ``READNOI``/``RDNOISE`` or option), an effective one is derived from the sky:
      the sky variance ``rms**2`` must equal ``level/gain + (read_noise/gain)**2``, so
      ``read_noise = gain * sqrt(max(rms**2 - level/gain, 0))``.
    * Gain unknown (sep's image: SExtractor ``GAIN 0``; DSS plates; Spitzer in MJy/sr):
      ``variance`` = the background rms squared, cut from the ``Background2D`` rms map: a
      constant sky-noise weight per pixel without source Poisson noise, exactly what
      SExtractor does with ``GAIN = 0``. Positions and shapes are unaffected; flux errors of
      bright stars are underestimated (their photon noise is left out) and chi2/dof of
      bright stars exceeds 1.
    """
    if exposure.gain is not None:
        gain = float(exposure.gain)
        if exposure.read_noise is not None:
            rn = float(exposure.read_noise)
            return {"gain": gain, "read_noise": rn}, f"gain {gain:g} e-/ADU, read noise {rn:g} e- ({exposure.sources.get('gain')})"
        if background is None:
            return {"gain": gain, "read_noise": 0.0}, f"gain {gain:g} e-/ADU, read noise unknown (0)"
        excess = background.median_rms**2 - background.median_level / gain
        if excess < 0:
            log.warning(
                "%s: sky rms %.3g is below the Poisson noise of the sky level %.3g with gain %g: "
                "the gain or the zero level is off; read noise set to 0", exposure.name,
                background.median_rms, background.median_level, gain,
            )  # fmt: skip
        rn = gain * float(np.sqrt(max(excess, 0.0)))
        return {"gain": gain, "read_noise": rn}, f"gain {gain:g} e-/ADU, effective read noise {rn:.3g} e- from the sky rms"
    if stamps is None or stamps.sky_rms is None:
        raise ValueError("gain unknown: give the stamps cut with background= (the sky rms is the noise model)")
    variance = np.where(np.isfinite(stamps.sky_rms) & (stamps.sky_rms > 0), stamps.sky_rms**2, np.nan)
    return {"variance": variance}, "sky variance from the background rms map (gain unknown: no source Poisson noise)"
