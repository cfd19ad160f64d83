"""Star detection for images without a catalogue, and the sky background estimate.

Why photutils image segmentation (``detect_sources`` + ``SourceCatalog``), not
``DAOStarFinder``/``IRAFStarFinder`` or ``sep``:

* The detections also serve as the *isolation* catalogue, which must list every source
  that can put light into a stamp: faint ones, galaxies, blends and saturated stars
  included. Segmentation (thresholding a matched-filtered image, as SExtractor does)
  finds all of them; the star finders look for round peaks of one given FWHM and drop
  the rest by design.
* It needs no FWHM in advance (the filter width matters little), which suits images of
  unknown seeing (ZTF 1.5-4 px, photographic plates 3-6 px).
* photutils is already a dependency; ``sep`` (faster) would be another compiled package.
  Segmentation of a full ZTF quadrant takes a few seconds, small next to reading it.

Stars are then told apart from the rest by size: ``r50``, the radius holding half of the
flux within a fixed aperture (like SExtractor's ``FLUX_RADIUS``, which uses the Kron
aperture; on sep's image the two agree to ~10 % for stars), is the same for every
unsaturated point source, larger for galaxies, blends and saturated (flat-topped) stars,
smaller for cosmic rays and hot pixels. The stellar locus ``r50_star`` is the densest
narrow range of ``r50`` among bright detections; ``stellar`` marks sources within
``size_tolerance`` of it and rounder than ``max_elongation``.

Cost on a 3072x3080 ZTF-like quadrant (2 CPU cores): background ~5 s, detection and
measurement ~5 s for ~8000 sources.
"""

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from astropy.table import Table

log = logging.getLogger(__name__)

__all__ = ["Background", "estimate_background", "detect_stars", "half_light_radius"]


@dataclass
class Background:
    """Sky level and its noise, both (ny, nx) images in the image's units.

    ``median_level`` and ``median_rms`` are their medians over usable pixels;
    ``method`` says how they were obtained.
    """

    level: np.ndarray
    rms: np.ndarray
    median_level: float
    median_rms: float
    method: str


def _box_size(shape):
    # 64 px boxes (several FWHM, many boxes on a ZTF quadrant); smaller on small images
    return int(np.clip(min(shape) // 8, 16, 64))


def estimate_background(exposure, *, box_size=None, filter_size=3, sigma=3.0):
    """Sky level and rms: photutils ``Background2D`` (sigma-clipped SExtractor-style mode
    in boxes of ``box_size`` px, median-filtered over ``filter_size`` boxes). Masked and
    saturated pixels are ignored. Crowded boxes (Galactic plane) are kept as long as half
    of their pixels survive the clipping; if no box does, a global sigma-clipped
    median/std is used (``method`` says so)."""
    from astropy.stats import SigmaClip, sigma_clipped_stats
    from photutils.background import Background2D, SExtractorBackground, StdBackgroundRMS

    data = exposure.data
    bad = exposure.mask | exposure.saturated
    good = ~bad
    box = int(box_size or _box_size(data.shape))
    filled = np.where(good, data, 0.0)
    clip = SigmaClip(sigma=sigma, maxiters=10)
    if good.any():
        for exclude in (10.0, 50.0, 80.0):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    bkg = Background2D(
                        filled, box, mask=bad, filter_size=filter_size, sigma_clip=clip, exclude_percentile=exclude,
                        bkg_estimator=SExtractorBackground(), bkg_rms_estimator=StdBackgroundRMS(),
                    )  # fmt: skip
            except ValueError:
                continue
            level, rms = np.asarray(bkg.background), np.asarray(bkg.background_rms)
            if np.all(np.isfinite(level)) and np.all(np.isfinite(rms)):
                return Background(
                    level, rms, float(np.median(level[good])), float(np.median(rms[good])),
                    f"photutils Background2D, {box} px boxes, sigma-clipped SExtractor mode",
                )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, med, std = sigma_clipped_stats(data[good] if good.any() else np.zeros(1), sigma=sigma)
    med, std = float(np.nan_to_num(med)), float(np.nan_to_num(std, nan=1.0)) or 1.0
    log.warning("%s: no usable background box; a constant sigma-clipped background is used", exposure.name)
    return Background(np.full(data.shape, med), np.full(data.shape, std), med, std, "global sigma-clipped median and std")


def _kernel_fwhm(exposure, fwhm):
    if fwhm is not None:
        return float(fwhm), "given"
    if exposure.seeing and exposure.pixel_scale:
        return float(np.clip(exposure.seeing / exposure.pixel_scale, 1.5, 8.0)), "header SEEING"
    return 3.0, "default"


def _locus_sample(snr, r50, ok, size_snr, aperture, locus_snr=30.0, min_count=5):
    """Sources that define the stellar locus: bright (S/N >= 30 when at least 5 are, so that
    the sizes of faint sources, inflated by neighbours and nebulosity in crowded fields, do
    not count), round, unsaturated, with a half-light radius well inside the aperture."""
    with np.errstate(invalid="ignore"):
        base = ok & (r50 < 0.6 * aperture)
        bright = base & (snr >= locus_snr)
        return bright if bright.sum() >= min_count else base & (snr >= size_snr)


def _stellar_locus(r50, weight_ok, width=0.2):
    """Centre of the densest window of relative width ``width`` in ``r50`` among the
    sources in ``weight_ok`` (stars: the smallest common size of bright sources)."""
    r = np.sort(r50[weight_ok & np.isfinite(r50) & (r50 > 0)])
    if r.size < 3:
        return float(np.median(r)) if r.size else np.nan
    logr = np.log(r)
    # for each start i, how many sources lie in [logr_i, logr_i + width]
    end = np.searchsorted(logr, logr + width, side="right")
    count = end - np.arange(r.size)
    best = int(np.argmax(count))
    return float(np.exp(np.median(logr[best : end[best]])))


def half_light_radius(image, mask, x, y, radius):
    """Radius [px] holding half of the flux within ``radius`` px of each (x, y), on a
    background-subtracted ``image`` (masked pixels count as 0). Vectorised over sources:
    one fancy-indexing gather, a sort of the pixel distances, a cumulative sum; the radius
    is interpolated between pixel centres. Like SExtractor's ``FLUX_RADIUS`` (which uses the
    Kron aperture instead of a fixed one), and orders of magnitude faster than photutils'
    ``fluxfrac_radius`` on 10^4 sources."""
    ny, nx = image.shape
    h = int(np.ceil(radius))
    off = np.arange(-h, h + 1)
    cx, cy = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
    rows = (cy[:, None] + off)[:, :, None]
    cols = (cx[:, None] + off)[:, None, :]
    inside = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
    r_, c_ = np.clip(rows, 0, ny - 1), np.clip(cols, 0, nx - 1)
    flux = np.where(inside & ~mask[r_, c_], image[r_, c_], 0.0).reshape(len(x), -1)
    dist = np.hypot(cols - x[:, None, None], rows - y[:, None, None]).reshape(len(x), -1)
    flux = np.where(dist <= radius, flux, 0.0)
    order = np.argsort(dist, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    cum = np.cumsum(np.take_along_axis(flux, order, axis=1), axis=1)
    half = 0.5 * cum[:, -1:]
    k = np.argmax(cum >= half, axis=1)  # first pixel reaching half of the flux
    rows_ = np.arange(len(x))
    c1, d1 = cum[rows_, k], dist[rows_, k]
    c0 = np.where(k > 0, cum[rows_, np.maximum(k - 1, 0)], 0.0)
    d0 = np.where(k > 0, dist[rows_, np.maximum(k - 1, 0)], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.clip((half[:, 0] - c0) / (c1 - c0), 0.0, 1.0)
        r50 = d0 + frac * (d1 - d0)
    return np.where(half[:, 0] > 0, r50, np.nan)


def detect_stars(
    exposure,
    *,
    fwhm=None,
    threshold=3.0,
    n_pixels=5,
    background=None,
    size_snr=10.0,
    size_tolerance=0.25,
    max_elongation=1.5,
):
    """Detect every source in the image and mark the star-like ones.

    Parameters
    ----------
    exposure : ztfpsf.io.fits.Exposure
    fwhm : float, optional
        FWHM [px] of the Gaussian detection filter; default ``SEEING / pixel_scale`` when
        the header has them, else 3 px.
    threshold : float
        Detection threshold in units of the background rms, on the filtered image (3 with
        ``n_pixels`` = 5 connected pixels: complete down to faint neighbours, which the
        isolation cut needs, with few noise detections).
    n_pixels : int
        Minimum number of connected pixels above the threshold.
    background : Background, optional
        From :func:`estimate_background` (computed when not given).
    size_snr : float
        Sources with S/N at least this get a size ``r50`` and may be ``stellar``.
    size_tolerance, max_elongation : float
        ``stellar``: ``|r50 / r50_star - 1| <= size_tolerance`` and elongation (a/b)
        ``<= max_elongation``.

    Returns
    -------
    astropy.table.Table
        One row per detection: ``id`` (0..N-1), ``x, y`` (0-based centroid), ``ra, dec``
        (NaN without WCS), ``flux`` (background-subtracted segment flux), ``flux_err``,
        ``snr``, ``mag`` (``zeropoint - 2.5 log10(flux)``, or ``-2.5 log10(flux)`` without a
        zero point: ``meta['mag_kind']`` is 'calibrated' or 'instrumental'), ``peak``
        (highest background-subtracted pixel), ``area`` [px], ``elongation``, ``r50`` [px]
        (NaN below ``size_snr``), ``stellar`` (bool), ``n_saturated`` (saturated pixels in
        the segment). ``meta``: ``r50_star``, ``fwhm_estimate`` (2 r50_star [px], exact for
        a Gaussian), detection settings, ``background`` (median level and rms).
    """
    from astropy.convolution import convolve
    from photutils.segmentation import SourceCatalog, detect_sources, make_2dgaussian_kernel

    kfwhm, kwhy = _kernel_fwhm(exposure, fwhm)
    meta = {
        "method": "photutils segmentation (detect_sources + SourceCatalog)",
        "threshold": float(threshold),
        "n_pixels": int(n_pixels),
        "kernel_fwhm": kfwhm,
        "kernel_fwhm_from": kwhy,
        "mag_kind": "calibrated" if exposure.zeropoint is not None else "instrumental",
        "zeropoint": exposure.zeropoint,
    }
    if exposure.mask.all():
        log.warning("%s: every pixel is masked: nothing to detect", exposure.name)
        return _empty_detections(meta)
    bkg = background if background is not None else estimate_background(exposure)
    meta["background"] = {"level": bkg.median_level, "rms": bkg.median_rms, "method": bkg.method}
    size = int(2 * np.ceil(1.5 * kfwhm) + 1)
    kernel = make_2dgaussian_kernel(kfwhm, size=size)
    usable = ~exposure.mask
    sub = np.where(usable, exposure.data - bkg.level, 0.0)
    conv = convolve(sub, kernel, normalize_kernel=True, boundary="extend")
    rms = np.where(bkg.rms > 0, bkg.rms, np.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        segm = detect_sources(conv, threshold * rms, n_pixels, mask=exposure.mask)
    if segm is None:
        log.warning("%s: no source detected above %.1f sigma", exposure.name, threshold)
        return _empty_detections(meta)
    error = bkg.rms
    if exposure.gain:
        error = np.sqrt(bkg.rms**2 + np.maximum(sub, 0.0) / exposure.gain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cat = SourceCatalog(sub, segm, convolved_data=conv, error=error, mask=exposure.mask)
        flux = np.asarray(cat.segment_flux, dtype=np.float64)
        flux_err = np.asarray(cat.segment_fluxerr, dtype=np.float64)
        x = np.asarray(cat.xcentroid, dtype=np.float64)
        y = np.asarray(cat.ycentroid, dtype=np.float64)
        peak = np.asarray(cat.max_value, dtype=np.float64)
        area = np.asarray(cat.area.value, dtype=np.float64)
        elong = np.asarray(cat.elongation.value, dtype=np.float64)
    n = len(flux)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(flux_err > 0, flux / flux_err, np.nan)
        inst = np.where(flux > 0, -2.5 * np.log10(flux), np.nan)
    r50 = np.full(n, np.nan)
    aperture = max(6.0, 2.5 * kfwhm)
    sized = np.nonzero(snr >= size_snr)[0]
    if sized.size:
        r50[sized] = half_light_radius(sub, exposure.mask, x[sized], y[sized], aperture)
    n_sat = np.bincount(segm.data[exposure.saturated], minlength=segm.max_label + 1)[np.asarray(cat.label)]
    r50_star = _stellar_locus(r50, _locus_sample(snr, r50, (n_sat == 0) & (elong <= max_elongation), size_snr, aperture))
    with np.errstate(invalid="ignore"):
        stellar = (np.abs(r50 / r50_star - 1.0) <= size_tolerance) & (elong <= max_elongation) & (n_sat == 0)

    t = Table(meta=meta)
    t["id"] = np.arange(n, dtype=np.int64)
    t["x"], t["y"] = x, y
    t["ra"], t["dec"] = _sky(exposure, x, y)
    t["flux"], t["flux_err"], t["snr"] = flux, flux_err, snr
    t["mag"] = inst + (exposure.zeropoint or 0.0)
    t["peak"], t["area"], t["elongation"] = peak, area, elong
    t["r50"], t["stellar"], t["n_saturated"] = r50, stellar, n_sat.astype(np.int32)
    t.meta["r50_star"] = r50_star
    t.meta["fwhm_estimate"] = 2.0 * r50_star
    log.info(
        "%s: %d sources above %.1f sigma (filter fwhm %.1f px, %s); %d star-like (r50 %.2f px, fwhm ~%.2f px)",
        exposure.name, n, threshold, kfwhm, kwhy, int(stellar.sum()), r50_star, 2 * r50_star,
    )  # fmt: skip
    return t


def _sky(exposure, x, y):
    if exposure.wcs is None or len(x) == 0:
        return np.full(len(x), np.nan), np.full(len(x), np.nan)
    from .io.catalog import pixel_to_sky

    return pixel_to_sky(x, y, exposure.wcs)


def _empty_detections(meta):
    t = Table(meta=meta)
    for name, dtype in (
        ("id", np.int64), ("x", float), ("y", float), ("ra", float), ("dec", float), ("flux", float),
        ("flux_err", float), ("snr", float), ("mag", float), ("peak", float), ("area", float),
        ("elongation", float), ("r50", float), ("stellar", bool), ("n_saturated", np.int32),
    ):  # fmt: skip
        t[name] = np.zeros(0, dtype=dtype)
    t.meta["r50_star"] = np.nan
    t.meta["fwhm_estimate"] = np.nan
    return t
