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

__all__ = ["Stamps", "cut_stamps", "cut", "stamp_origin", "noise_model", "NOISE_MODES", "core_offsets"]


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


#: Noise models of :func:`noise_model` for images with a gain (``--noise``).
NOISE_MODES = ("measured", "header")


def noise_model(exposure, stamps=None, background=None, mode="measured"):
    """How :func:`ztfpsf.fit_stamps` should weight the pixels of this image.

    Returns ``(kwargs, info)``: pass ``**kwargs`` to ``fit_stamps`` (and
    :func:`ztfpsf.psf.fit_psf`); ``info`` (JSON-able) says which model was used and how the
    measured sky noise compares with the header's (the pipeline's summary ``noise``).

    The fit's variance is ``model/gain + (read_noise/gain)**2`` with the fitted model (its
    background term is the sky: the stamps are not sky-subtracted, so ``sky = 0``).

    * Gain known, ``mode='measured'`` (default; needs the stamps cut with ``background=``):
      the sky part of the variance is the *measured* sky variance ``rms**2`` (the
      background map at the star), the source part ``model/gain``. Per star an effective
      read noise ``gain * sqrt(max(rms**2 - level/gain, 0))`` (``level`` the background at
      the star) makes the variance ``flux*P/gain + rms**2`` at the sky level. Real ZTF sky
      is noisier than its header predicts (1.05-1.17x on the study's quadrant), which
      inflates chi2/dof and shrinks faint stars' flux errors with the header model.
    * Gain known, ``mode='header'`` (or no background): header ``GAIN`` and ``READNOI``;
      without a read noise, one effective value from the median sky rms and level.
    * Gain unknown (sep's image: SExtractor ``GAIN 0``; DSS plates; Spitzer in MJy/sr):
      ``variance`` = the background rms squared, cut from the background rms map: a
      constant sky-noise weight per pixel without source Poisson noise, exactly what
      SExtractor does with ``GAIN = 0``. Positions and shapes are unaffected; flux errors of
      bright stars are underestimated (their photon noise is left out) and chi2/dof of
      bright stars exceeds 1.
    """
    if mode not in NOISE_MODES:
        raise ValueError(f"noise mode must be one of {NOISE_MODES}; got {mode!r}")
    info = _sky_noise_info(exposure, background)
    if exposure.gain is None:
        if stamps is None or stamps.sky_rms is None:
            raise ValueError("gain unknown: give the stamps cut with background= (the sky rms is the noise model)")
        variance = np.where(np.isfinite(stamps.sky_rms) & (stamps.sky_rms > 0), stamps.sky_rms**2, np.nan)
        desc = "sky variance from the background rms map (gain unknown: no source Poisson noise)"
        return {"variance": variance}, dict(info, model="sky variance", description=desc)
    gain = float(exposure.gain)
    if mode == "measured" and stamps is not None and stamps.sky is not None and stamps.sky_rms is not None:
        rn = _effective_read_noise(exposure, stamps, gain)
        desc = (f"measured: gain {gain:g} e-/ADU, sky variance from the background rms map "
                f"(effective read noise median {np.median(rn):.3g} e-)")  # fmt: skip
        return {"gain": gain, "read_noise": rn}, dict(info, model="measured", description=desc, read_noise_effective=float(np.median(rn)))
    if exposure.read_noise is not None:
        rn = float(exposure.read_noise)
        desc = f"header: gain {gain:g} e-/ADU, read noise {rn:g} e- ({exposure.sources.get('gain')})"
        return {"gain": gain, "read_noise": rn}, dict(info, model="header", description=desc)
    if background is None:
        return {"gain": gain, "read_noise": 0.0}, dict(info, model="header", description=f"header: gain {gain:g} e-/ADU, read noise unknown (0)")
    excess = background.median_rms**2 - background.median_level / gain
    if excess < 0:
        log.warning(
            "%s: sky rms %.3g is below the Poisson noise of the sky level %.3g with gain %g: "
            "the gain or the zero level is off; read noise set to 0", exposure.name,
            background.median_rms, background.median_level, gain,
        )  # fmt: skip
    rn = gain * float(np.sqrt(max(excess, 0.0)))
    desc = f"header gain {gain:g} e-/ADU, effective read noise {rn:.3g} e- from the median sky rms"
    return {"gain": gain, "read_noise": rn}, dict(info, model="header", description=desc, read_noise_effective=rn)


def _effective_read_noise(exposure, stamps, gain):
    """Per star ``gain * sqrt(max(rms**2 - level/gain, 0))`` from the background rms and
    level at the star's pixel; stars off the image get the median of the others."""
    c = stamps.size // 2
    rms, level = stamps.sky_rms[:, c, c], stamps.sky
    with np.errstate(invalid="ignore"):
        excess = rms**2 - level / gain
    finite = np.isfinite(excess)
    low = finite & (excess < 0)
    if low.any():
        log.warning(
            "%s: at %d of %d stars the sky rms is below the Poisson noise of the sky level with gain %g "
            "(the gain or the zero level is off): read noise 0 there", exposure.name, int(low.sum()), len(excess), gain,
        )  # fmt: skip
    rn = gain * np.sqrt(np.maximum(excess, 0.0))
    fill = float(np.median(rn[finite])) if finite.any() else float(exposure.read_noise or 0.0)
    return np.where(finite, rn, fill)


def _sky_noise_info(exposure, background):
    """Measured sky rms against the header's prediction ``sqrt(level/gain + (read_noise/gain)**2)``:
    medians over the usable pixels (a 1-in-16 subsample: the maps are smooth)."""
    info = {"gain": exposure.gain, "read_noise_header": exposure.read_noise}
    if background is None:
        return dict(info, sky_rms_measured=None, sky_rms_header=None, rms_ratio=None)
    info["sky_rms_measured"] = float(background.median_rms)
    info["sky_level"] = float(background.median_level)
    if exposure.gain is None or exposure.read_noise is None:
        return dict(info, sky_rms_header=None, rms_ratio=None)
    good = ~(exposure.mask | exposure.saturated)[::4, ::4]
    level, rms = background.level[::4, ::4][good], background.rms[::4, ::4][good]
    predicted = np.sqrt(np.maximum(level, 0.0) / exposure.gain + (exposure.read_noise / exposure.gain) ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = rms / predicted
    return dict(info, sky_rms_header=float(np.median(predicted)), rms_ratio=float(np.median(ratio)))
