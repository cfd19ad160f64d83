"""Benchmark: PSF models of the real ZTF quadrant, every one scored by ONE evaluator on
reserve stars, against SExtractor + PSFEx.

    python benchmarks/bench_real_psf.py [--image SCI --mask MSK] [--models moffat psfex ...]
                                        [--check-psfex] [--workdir DIR]

Steps (the full cached quadrant by default, ``ztfpsf.datasets.ztf_quadrant()``):

1. **Stars**: the ztfpsf selection (``read_exposure`` -> ``estimate_background`` ->
   ``detect_stars`` -> ``select_stars``: isolated, clean, star-like, 14-18 mag), 17x17
   stamps (``cut_stamps``), split at random (``--seed``) into fit (80 %) and reserve
   (20 %) stars. The isolated star-like stars of 18-19.5 mag (``--faint-limit``) are added
   to the reserve only: with 14-18 mag stars alone the S/N 20-50 bin is empty and the
   slope over 14-19 mag stops at 18.
2. **PSFs**, each built from the fit stars only and timed (``BUILDERS``: one line each):

   * ``ztfpsf.fit_psf(model=..., mode='varying', degree=2, reserve=0)`` with the pipeline's
     noise model, timed on a second call (the first compiles): ``moffat``,
     ``elliptical_moffat``, ``gaussian`` (default pixel integration), ``*_gl4`` (4x4
     Gauss-Legendre pixel integration), ``hybrid`` (``fit_psf(..., hybrid=True)``, the
     analytic core + pixel residual map being built in ``src/``; skipped with its error if
     the library does not accept it);
   * SExtractor + PSFEx (``psfex_io.py``; skipped with a message when the binaries are
     missing): SExtractor with the header gain, saturation and zero point, a weight map 0
     on the pixels ztfpsf masks, the mskimg as flag map, ``VIGNET(35,35)``, only the fit
     stars kept (ASSOC on their 1-based positions, 1.5 px); PSFEx with ``PSFVAR_KEYS
     X_IMAGE,Y_IMAGE``, ``PSFVAR_DEGREES 2``, ``PHOTFLUX_KEY FLUX_APER(5)`` (10 px),
     ``PSF_RECENTER Y``, ``SAMPLE_FWHMRANGE 0.5,10``, and ``PSF_SIZE`` so that its grid
     covers >= 19 px. ``psfex``: ``PSF_SAMPLING 0`` (auto: FWHM/2.35/2 ~ 0.4 px, predicted
     from the stars' ``FLUX_RADIUS`` as PSFEx computes it), ``BASIS_TYPE PIXEL_AUTO`` (the
     pixel basis below 3 px FWHM); ``psfex_samp1``: ``PSF_SAMPLING 1``, ``BASIS_TYPE
     PIXEL`` (no super-resolution). SExtractor and PSFEx are timed separately.

   Assumptions on the ``.psf`` file (1-based X_IMAGE, term order, PSF centre, Lanczos-3
   resampling, normalisation to the model's own integral) are in ``psfex_io.py``;
   ``--check-psfex`` verifies them on every accepted sample against PSFEx's own model
   (its SAMPLES - RESIDUALS check images): agreement to ~1e-6 relative rms.
3. **One evaluator** for every PSF (:func:`evaluate`), given only a renderer
   ``render(x, y, shape) -> (stamps (N, ny, nx) of unit flux, (x0, y0) of pixel [0, 0])``
   (with ``flux=`` for a flux-dependent PSF, re-rendered at each step's flux):
   on each reserve star, PSF fixed, weighted least squares for flux, x, y and background
   (Gauss-Newton, position derivatives by central differences of the renderer, 8 steps),
   variance ``max(model - background, 0) / gain + sigma_sky**2`` from the current model,
   ``sigma_sky`` = 1.4826 MAD of the star's 41x41 surroundings beyond 10 px (masked
   pixels excluded), the same for all PSFs; start at a free-shape Moffat fit of the star.
   Reported per PSF:

   * chi2/dof (sum chi2 / sum dof) in S/N bins 20-50, 50-100, 100-300, > 300; the S/N
     is that of each star's own free-shape Moffat fit with its shape fixed (the same for
     every PSF);
   * the mean (data - model) / flux of the 100 brightest 14-18 mag reserve stars: max
     |value| in % (images in the JSON and ``docs/real_psf_residuals.png``);
   * PSF - aperture magnitude for diameters 6 and 14 px (aperture photometry on the image,
     exact overlap, centred on the free fit, sky = median of the same surroundings):
     robust scatter (1.4826 MAD) of the S/N >= 100 stars in mmag, median, Theil-Sen slope
     against the PSF magnitude over 14-19 mag in mmag/mag (``docs/real_psf_apcor.png``);
   * the curve of growth as PSF - AP magnitudes for diameters 2, 3, 4, 6, 10, 14 px: the
     model's (unit flux at the image centre, star on a pixel centre and on a pixel
     corner), the reserve stars' (median, S/N >= 100) and the header's APCOR1-6 (ZTF's
     PSF - aperture magnitudes for the same diameters);
   * the sum of the 17x17 stamp at 16 sub-pixel phases (spread = (max - min) / mean):
     a pixel-integrated PSF sums to the same at every phase;
   * the build time (and SExtractor/PSFEx times, the first ztfpsf call).
4. Prints a markdown table with ratios to each PSFEx row, writes
   ``benchmarks/results/real_psf.json`` and ``real_psf.txt`` and the figures in ``docs/``,
   and names the machine (CPU model, cores).
"""

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import ztfpsf
from ztfpsf.datasets import ztf_quadrant
from ztfpsf.detect import detect_stars, estimate_background
from ztfpsf.io.fits import read_exposure
from ztfpsf.io.results import write_json
from ztfpsf.selection import EmptySelectionWarning, select_stars
from ztfpsf.stamps import cut, cut_stamps, noise_model

(getattr(ztfpsf, "configure", None) or ztfpsf._jax.configure)()  # float64, CPU devices, compilation cache
sys.path.insert(0, str(Path(__file__).resolve().parent))
import psfex_io  # noqa: E402

log = logging.getLogger("bench_real_psf")

ROOT = Path(__file__).resolve().parents[1]
STAMP = 17
SNR_BINS = ((20, 50), (50, 100), (100, 300), (300, np.inf))
APERTURES = psfex_io.APERTURES  # diameters [px] of APCOR1..6
SKY_BOX, SKY_RADIUS = 41, 10.0


# ----------------------------------------------------------------------------------------
# machine and stars
# ----------------------------------------------------------------------------------------
def machine():
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "host": platform.node(), "python": platform.python_version(),
            "ztfpsf": ztfpsf.__version__, "jax": ztfpsf._jax.jax.__version__}  # fmt: skip


@dataclass
class Stars:
    """Stamps and per-star quantities of one set of stars (image coordinates, 0-based)."""

    stamps: object  # ztfpsf.stamps.Stamps
    faint: np.ndarray  # True for the 18-19.5 mag reserve-only stars
    sky: np.ndarray | None = None
    sky_rms: np.ndarray | None = None
    x: np.ndarray | None = None  # free-shape Moffat fit: position, flux, S/N
    y: np.ndarray | None = None
    flux: np.ndarray | None = None
    snr: np.ndarray | None = None

    def __len__(self):
        return len(self.faint)


def _select(exposure, stars, mag_range):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptySelectionWarning)
        table, counts = select_stars(stars, exposure, mag_range=mag_range)
    return table, counts


def local_sky(exposure, x, y):
    """Sky level (median) and rms (1.4826 MAD) of each star's 41x41 surroundings beyond 10 px."""
    x0, y0 = np.floor(x + 0.5) - SKY_BOX // 2, np.floor(y + 0.5) - SKY_BOX // 2
    pix = cut(exposure.data, x0, y0, SKY_BOX)
    bad = cut(exposure.mask | exposure.saturated, x0, y0, SKY_BOX, fill=True).astype(bool)
    g = np.arange(SKY_BOX) - SKY_BOX // 2
    ring = (g[None, :] ** 2 + g[:, None] ** 2) > SKY_RADIUS**2
    vals = np.where(ring[None] & ~bad & np.isfinite(pix), pix, np.nan)
    level = np.nanmedian(vals, axis=(1, 2))
    rms = 1.4826 * np.nanmedian(np.abs(vals - level[:, None, None]), axis=(1, 2))
    return level, rms


def free_fit(st, exposure):
    """Free-shape Moffat fit of each star: the start of every evaluation and the star's
    S/N (the same for every PSF). Weights: measured sky variance plus the data's Poisson
    term. The S/N is that of PSF photometry at the star's own fitted shape and position
    (flux and background free): the shape-marginalised ``flux_err`` of an undersampled
    star is dominated by the fwhm-alpha degeneracy, not by the photometric noise."""
    import jax.numpy as jnp

    s = st.stamps
    var = st.sky_rms[:, None, None] ** 2 + np.maximum(np.nan_to_num(s.data) - st.sky[:, None, None], 0) / exposure.gain
    t = ztfpsf.fit_stamps(s.data, var, mask=s.mask, saturation=exposure.saturation, x_init=s.x_init, y_init=s.y_init, origin=s.origin)
    ok = (np.asarray(t["flags"]) & int(ztfpsf.BAD)) == 0
    st.x = np.where(ok, t["x"], s.x_init)
    st.y = np.where(ok, t["y"], s.y_init)
    st.flux = np.where(ok, t["flux"], np.nan)
    m = ztfpsf.get_model("moffat")
    shape = tuple(jnp.asarray(np.where(ok, t[k], 2.0)) for k in m.shape_names)
    P = np.asarray(m.image(jnp.ones(len(st)), jnp.asarray(st.x - s.origin[:, 0]), jnp.asarray(st.y - s.origin[:, 1]), shape,
                           jnp.zeros(len(st)), s.size, s.size))  # fmt: skip
    valid = ~s.bad & np.isfinite(s.data)
    w = valid / (np.maximum(st.flux[:, None, None] * P, 0) / exposure.gain + st.sky_rms[:, None, None] ** 2)
    a, b, c = (w * P * P).sum(axis=(1, 2)), (w * P).sum(axis=(1, 2)), w.sum(axis=(1, 2))
    st.snr = st.flux / np.sqrt(c / (a * c - b * b))


def load_sample(image, mask, seed, fit_fraction, faint_limit, fit_stamp=STAMP):
    """Exposure, background, fit stars (on ``fit_stamp`` px stamps) and reserve stars (14-18
    mag, + faint reserve; always scored on :data:`STAMP` px stamps)."""
    exposure = read_exposure(image, mask=mask if mask else "auto")
    background = estimate_background(exposure)
    detections = detect_stars(exposure, background=background)
    bright, counts = _select(exposure, detections, (14.0, 18.0))
    if len(bright) < 50:
        raise SystemExit(f"{image}: only {len(bright)} stars selected ({dict(counts)}); need >= 50")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(bright))
    n_fit = int(round(fit_fraction * len(bright)))
    fit_idx, res_idx = np.sort(order[:n_fit]), np.sort(order[n_fit:])
    faint = None
    if faint_limit and faint_limit > 18.0:
        faint, _ = _select(exposure, detections, (18.0, faint_limit))
        faint = faint[~np.isin(np.asarray(faint["id"]), np.asarray(bright["id"]))]
    xs = [np.asarray(bright["x_init"])[res_idx]] + ([np.asarray(faint["x_init"])] if faint is not None else [])
    ys = [np.asarray(bright["y_init"])[res_idx]] + ([np.asarray(faint["y_init"])] if faint is not None else [])
    n_faint = 0 if faint is None else len(faint)
    fit = Stars(
        stamps=cut_stamps(exposure, np.asarray(bright["x_init"])[fit_idx], np.asarray(bright["y_init"])[fit_idx], fit_stamp, background=background),
        faint=np.zeros(n_fit, bool),
    )  # fmt: skip
    reserve = Stars(
        stamps=cut_stamps(exposure, np.concatenate(xs), np.concatenate(ys), STAMP, background=background),
        faint=np.r_[np.zeros(len(res_idx), bool), np.ones(n_faint, bool)],
    )  # fmt: skip
    reserve.sky, reserve.sky_rms = local_sky(exposure, reserve.stamps.x_init, reserve.stamps.y_init)
    free_fit(reserve, exposure)
    info = {"selection_counts": {k: int(v) for k, v in counts.items()}, "n_selected": len(bright), "n_fit": n_fit,
            "n_reserve": len(res_idx), "n_faint_reserve": n_faint, "faint_limit": faint_limit, "seed": seed}  # fmt: skip
    return exposure, background, fit, reserve, info


# ----------------------------------------------------------------------------------------
# PSF builders: ctx -> (render, info); render(x, y, shape) -> (stamps, (x0, y0))
# ----------------------------------------------------------------------------------------
@dataclass
class Context:
    exposure: object
    background: object
    fit: Stars
    workdir: Path
    image: Path
    mask: Path | None
    check_psfex: bool = False


def psfmodel_renderer(psf):
    def render(x, y, shape, flux=None):
        img, (x0, y0) = psf.stamp(np.asarray(x, float), np.asarray(y, float), shape=shape, return_origin=True, flux=flux)
        return np.asarray(img, np.float64), (np.asarray(x0, np.float64), np.asarray(y0, np.float64))

    render.flux_dependent = psf.flux_dependent
    return render


def ztfpsf_builder(model, **options):
    """``ztfpsf.fit_psf(model=model, mode='varying', degree=2, reserve=0, **options)``,
    timed on a second call (the first one compiles)."""

    def build(ctx):
        s, exp = ctx.fit.stamps, ctx.exposure
        noise, _ = noise_model(exp, s, ctx.background)
        kw = dict(mask=s.mask, saturation=exp.saturation, x_init=s.x_init, y_init=s.y_init, origin=s.origin,
                  image_shape=exp.shape, model=model, mode="varying", degree=2, reserve=0.0, **noise, **options)  # fmt: skip
        t0 = time.perf_counter()
        ztfpsf.fit_psf(s.data, **kw)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        psf, _, stats = ztfpsf.fit_psf(s.data, **kw)
        seconds = time.perf_counter() - t0
        keep = ("n_fit", "n_outlier", "chi2_dof_train", "fwhm_median", "converged", "rounds")
        return psfmodel_renderer(psf), {"build_s": seconds, "first_call_s": first, **{k: stats.get(k) for k in keep}}

    return build


def psfex_builder(sampling=0.0, basis="PIXEL_AUTO"):
    """SExtractor (fit stars only) + PSFEx (``PSF_SAMPLING sampling``, ``BASIS_TYPE basis``);
    the two timed separately."""
    return lambda ctx: _build_psfex(ctx, sampling, basis)


def _build_psfex(ctx, sampling, basis):
    sex, psfex = psfex_io.find_tools()
    if not (sex and psfex):
        raise RuntimeError(f"SExtractor/PSFEx not found (source-extractor: {sex}, psfex: {psfex}); apt-get install source-extractor psfex")
    from astropy.io import fits

    exp, s = ctx.exposure, ctx.fit.stamps
    wd = ctx.workdir / f"psfex_{sampling:g}_{basis}"
    wd.mkdir(parents=True, exist_ok=True)
    weight = wd / "weight.fits"
    fits.writeto(weight, (~exp.mask).astype(np.float32), overwrite=True)
    flag = ctx.mask if ctx.mask is not None else exp.mask_path
    if flag is None:
        flag = wd / "flag.fits"
        fits.writeto(flag, exp.mask.astype(np.int16), overwrite=True)
    cat, sex_s = psfex_io.run_sextractor(sex, ctx.image, weight, flag, wd, s.x_init, s.y_init,
                                         gain=exp.gain or 0.0, saturation=exp.saturation or 1e30, zeropoint=exp.zeropoint or 0.0)  # fmt: skip
    table = psfex_io.read_ldac(cat)
    # PSFEx's automatic step is (median 2 FLUX_RADIUS of its stars) / 2.35 / 2: a PSF grid of >= 19 px
    step = sampling or np.median(2.0 * np.asarray(table["FLUX_RADIUS"])[np.asarray(table["SNR_WIN"]) > 20]) / 2.35 / 2.0
    size = int(2 * np.ceil(19.0 / step / 2.0) + 1)
    psf_path, psfex_s, summary = psfex_io.run_psfex(psfex, cat, wd, degree=2, sampling=sampling, psf_size=size, basis=basis,
                                                    check_images=ctx.check_psfex)  # fmt: skip
    model = psfex_io.PSFExPSF(psf_path)
    if model.extent < STAMP:
        log.warning("PSFEx grid covers %.1f px only (step %.3f, %d px)", model.extent, model.step, size)
    info = {"build_s": sex_s + psfex_s, "sextractor_s": sex_s, "psfex_s": psfex_s, "n_sextractor": len(table),
            "n_loaded": model.loaded, "n_accepted": model.accepted, "psfex_chi2": model.chi2, "psf_samp": model.step,
            "psf_size": size, "psf_extent_px": model.extent, "report": summary,
            "versions": psfex_io.tool_versions(sex, psfex)}  # fmt: skip
    if ctx.check_psfex:
        stem = Path(cat).stem
        info["render_check"] = psfex_io.verify_rendering(psf_path, cat, wd / f"samp_{stem}.fits", wd / f"resi_{stem}.fits")
        log.info("PSFEx rendering vs PSFEx's own sample models: %s", info["render_check"])
    return model.render, info


#: PSF name -> builder. Adding a PSF is one line; the hybrid model (analytic core + pixel
#: residual map) is the "hybrid" line. A builder that fails is reported and skipped. The
#: "_gl4" rows integrate the profile over pixels by 4x4 Gauss-Legendre instead of the
#: default Taylor expansion, which breaks down at this quadrant's Moffat fwhm (~0.8 px).
BUILDERS = {
    "moffat": ztfpsf_builder("moffat"),
    "elliptical_moffat": ztfpsf_builder("elliptical_moffat"),
    "gaussian": ztfpsf_builder("gaussian"),
    "moffat_gl4": ztfpsf_builder("moffat", integration="gl4"),
    "elliptical_moffat_gl4": ztfpsf_builder("elliptical_moffat", integration="gl4"),
    "hybrid": ztfpsf_builder("elliptical_moffat", hybrid=True),
    "hybrid_gl4": ztfpsf_builder("elliptical_moffat", hybrid=True, integration="gl4"),
    "hybrid_flux": ztfpsf_builder("elliptical_moffat", hybrid=True, residual_flux=True),
    "psfex": psfex_builder(),
    "psfex_samp1": psfex_builder(sampling=1.0, basis="PIXEL"),
}


# ----------------------------------------------------------------------------------------
# the evaluator (model-agnostic)
# ----------------------------------------------------------------------------------------
def on_data_grid(render, x, y, origin, size, pad=2, flux=None):
    """Unit-flux models of the stars on their data stamps' pixels: rendered ``pad`` px
    larger around the star's own nearest pixel, then cut at the data stamp's origin
    (NaN for a star that moved more than ``pad`` px); ``flux`` for a flux-dependent PSF."""
    big = size + 2 * pad
    img, (ox, oy) = render(x, y, (big, big), flux=flux) if getattr(render, "flux_dependent", False) else render(x, y, (big, big))
    ix = np.asarray(origin[:, 0] - ox, dtype=np.int64)
    iy = np.asarray(origin[:, 1] - oy, dtype=np.int64)
    ok = (ix >= 0) & (ix <= 2 * pad) & (iy >= 0) & (iy <= 2 * pad)
    ix, iy = np.clip(ix, 0, 2 * pad), np.clip(iy, 0, 2 * pad)
    a = np.arange(size)
    out = img[np.arange(len(x))[:, None, None], (iy[:, None] + a)[:, :, None], (ix[:, None] + a)[:, None, :]]
    return np.where(ok[:, None, None], out, np.nan)


def evaluate(render, stars, gain, n_iter=8, h=0.01, max_step=0.5):
    """PSF photometry of ``stars`` with the PSF fixed: flux, x, y, background per star.

    Weighted least squares, variance ``max(flux * P, 0) / gain + sky_rms**2`` from the
    current model; Gauss-Newton on all four parameters, dP/dx and dP/dy by central
    differences of ``render`` (step ``h`` px), position steps capped at ``max_step``.
    Returns a dict of per-star arrays: ``flux, flux_err, x, y, background, chi2, dof,
    last_step`` and the final model ``model`` (N, s, s), with NaN for failed stars.
    """
    s = stars.stamps
    size = s.size
    valid = ~s.bad & np.isfinite(s.data)
    d = np.where(valid, s.data, 0.0)
    s2 = stars.sky_rms[:, None, None] ** 2
    x, y = stars.x.astype(np.float64).copy(), stars.y.astype(np.float64).copy()
    f = stars.flux.astype(np.float64).copy()  # the free fit's until the first step: a flux-dependent PSF's shape
    grid = lambda xx, yy: on_data_grid(render, xx, yy, s.origin, size, flux=f)
    P = grid(x, y)
    # linear start: flux and background at the free-fit position, sky weights
    w = valid / s2
    A = np.stack([np.einsum("nij,nij,nij->n", P, w, P), np.einsum("nij,nij->n", P, w), np.einsum("nij->n", w)], 1)
    bvec = np.stack([np.einsum("nij,nij,nij->n", P, w, d), np.einsum("nij,nij->n", w, d)], 1)
    det = A[:, 0] * A[:, 2] - A[:, 1] ** 2
    f = (A[:, 2] * bvec[:, 0] - A[:, 1] * bvec[:, 1]) / det
    b = (A[:, 0] * bvec[:, 1] - A[:, 1] * bvec[:, 0]) / det
    step = np.full(len(x), np.nan)
    for _ in range(n_iter):
        P = grid(x, y)
        Px = (grid(x + h, y) - grid(x - h, y)) / (2 * h)
        Py = (grid(x, y + h) - grid(x, y - h)) / (2 * h)
        fP = f[:, None, None] * P
        w = valid / (np.maximum(fP, 0.0) / gain + s2)
        r = d - fP - b[:, None, None]
        J = np.stack([P, np.ones_like(P), f[:, None, None] * Px, f[:, None, None] * Py], -1)
        J = np.where(valid[..., None], J, 0.0)
        A = np.einsum("nijk,nij,nijl->nkl", J, w, J)
        g = np.einsum("nijk,nij,nij->nk", J, w, r)
        good = np.all(np.isfinite(A), axis=(1, 2)) & np.all(np.isfinite(g), axis=1)
        delta = np.full((len(x), 4), np.nan)
        delta[good] = np.linalg.solve(A[good] + 1e-12 * np.eye(4), g[good][..., None])[..., 0]
        shift = np.hypot(delta[:, 2], delta[:, 3])
        scale = np.where(shift > max_step, max_step / np.maximum(shift, 1e-30), 1.0)
        f, b = f + delta[:, 0], b + delta[:, 1]
        x, y = x + scale * delta[:, 2], y + scale * delta[:, 3]
        step = shift
    P = grid(x, y)
    fP = f[:, None, None] * P
    w = valid / (np.maximum(fP, 0.0) / gain + s2)
    r = d - fP - b[:, None, None]
    J = np.where(valid[..., None], np.stack([P, np.ones_like(P)], -1), 0.0)
    cov_fb = np.full((len(x), 2, 2), np.nan)
    A2 = np.einsum("nijk,nij,nijl->nkl", J, w, J)
    ok2 = np.all(np.isfinite(A2), axis=(1, 2))
    cov_fb[ok2] = np.linalg.inv(A2[ok2])
    chi2 = np.einsum("nij,nij,nij->n", w, r, r)
    dof = valid.sum(axis=(1, 2)) - 4
    bad = ~np.isfinite(chi2) | ~np.isfinite(f) | (f <= 0)
    nan = lambda v: np.where(bad, np.nan, v)
    return {"flux": nan(f), "flux_err": nan(np.sqrt(cov_fb[:, 0, 0])), "x": nan(x), "y": nan(y), "background": nan(b),
            "chi2": nan(chi2), "dof": np.where(bad, 0, dof), "last_step": step,
            "model": np.where(bad[:, None, None], np.nan, fP + b[:, None, None])}  # fmt: skip


# ----------------------------------------------------------------------------------------
# aperture photometry and metrics
# ----------------------------------------------------------------------------------------
def aperture_fluxes(exposure, x, y, sky):
    """Sky-subtracted fluxes (N, len(APERTURES)) in circular apertures (exact overlap);
    NaN where a masked/saturated pixel falls in the aperture."""
    from photutils.aperture import CircularAperture, aperture_photometry

    pos = np.column_stack([x, y])
    aps = [CircularAperture(pos, r=d / 2.0) for d in APERTURES]
    bad = (exposure.mask | exposure.saturated | ~np.isfinite(exposure.data)).astype(np.float64)
    data = np.where(bad > 0, 0.0, exposure.data)
    tab = aperture_photometry(data, aps, method="exact")
    badtab = aperture_photometry(bad, aps, method="exact")
    out = np.empty((len(x), len(aps)))
    for k, ap in enumerate(aps):
        area = ap.area
        flux = np.asarray(tab[f"aperture_sum_{k}"]) - sky * area
        out[:, k] = np.where(np.asarray(badtab[f"aperture_sum_{k}"]) > 0, np.nan, flux)
    return out


def robust_std(v):
    v = v[np.isfinite(v)]
    return float(1.4826 * np.median(np.abs(v - np.median(v)))) if v.size >= 3 else np.nan


def psf_minus_aperture(res, ap_flux, snr, zeropoint, k, bright):
    """PSF - aperture magnitudes for aperture index ``k``: robust scatter (S/N >= 100) [mmag],
    median [mag], Theil-Sen slope over 14-19 mag [mmag/mag] of all reserve stars and of the
    14-18 mag ones (``bright``) alone (the faint ones hold some compact galaxies)."""
    from scipy.stats import theilslopes

    with np.errstate(invalid="ignore", divide="ignore"):
        dm = -2.5 * np.log10(res["flux"] / ap_flux[:, k])
        mag = zeropoint - 2.5 * np.log10(res["flux"])
    ok = np.isfinite(dm) & np.isfinite(mag)
    hi = ok & (snr >= 100)
    rng = ok & (mag >= 14.0) & (mag <= 19.0)
    slope = lambda sel: float(theilslopes(dm[sel], mag[sel])[0] * 1e3) if sel.sum() >= 10 else np.nan
    return {"scatter_mmag": robust_std(dm[hi]) * 1e3, "median": float(np.median(dm[hi])) if hi.any() else np.nan,
            "slope_mmag_per_mag": slope(rng), "slope_14_18_stars_mmag_per_mag": slope(rng & bright),
            "n_snr100": int(hi.sum()), "n_slope": int(rng.sum()), "dm": dm, "mag": mag}  # fmt: skip


def star_concentration(ap_flux, zeropoint, bright):
    """The stars' own light profile against their brightness, no PSF model involved:
    Theil-Sen slopes [mmag/mag] of aperture minus 14 px aperture magnitude (diameters 4, 6
    and 10 px) against the 14 px magnitude, over 14-19 mag (all reserve stars) and 14-18
    (``bright``). A flux-independent PSF can match every star's PSF - aperture magnitude
    only where these are flat."""
    from scipy.stats import theilslopes

    k14 = APERTURES.index(14)
    with np.errstate(invalid="ignore", divide="ignore"):
        mag = zeropoint - 2.5 * np.log10(ap_flux[:, k14])
    out = {}
    for d in (4, 6, 10):
        with np.errstate(invalid="ignore", divide="ignore"):
            dm = -2.5 * np.log10(ap_flux[:, APERTURES.index(d)] / ap_flux[:, k14])
        ok = np.isfinite(dm) & np.isfinite(mag) & (mag >= 14.0) & (mag <= 19.0)
        slope = lambda sel: float(theilslopes(dm[sel], mag[sel])[0] * 1e3) if sel.sum() >= 10 else np.nan
        out[f"ap{d}_minus_ap14"] = {"slope_mmag_per_mag": slope(ok), "slope_14_18_mmag_per_mag": slope(ok & bright),
                                    "n": int(ok.sum())}  # fmt: skip
    return out


def far_profile(exposure, x, y, flux, mag, edges=(4, 7, 10, 14, 20, 30, 40, 60)):
    """The stars' light far out, no PSF model involved: per magnitude bin, the median over
    stars of each annulus' median pixel minus that of the 40-60 px ring, in ppm of the
    star's flux per pixel, and the same in ADU. A far wing shows as a positive excess that
    scales with the flux; a sky that differs near isolated stars (their surroundings are
    free of detected sources by selection) as an offset constant in ADU."""
    data = np.where(exposure.mask | exposure.saturated | ~np.isfinite(exposure.data), np.nan, exposure.data)
    R = int(edges[-1])
    g = np.arange(-R, R + 1)
    out = []
    for lo, hi in zip(MAG_BINS[:-2], MAG_BINS[1:-1]):
        sel = np.flatnonzero((mag >= lo) & (mag < hi) & np.isfinite(flux) & (flux > 0))
        if not sel.size:
            continue
        x0, y0 = np.floor(x[sel] + 0.5) - R, np.floor(y[sel] + 0.5) - R
        pix = cut(data, x0.astype(np.int64), y0.astype(np.int64), 2 * R + 1)
        r = np.hypot(g[None, None, :] - (x[sel] - x0 - R)[:, None, None], g[None, :, None] - (y[sel] - y0 - R)[:, None, None])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # stars near the edge: all-NaN rings
            ring = lambda a, b: np.nanmedian(np.where((r >= a) & (r < b), pix, np.nan), axis=(1, 2))
            far = ring(edges[-2], edges[-1])
            adu = np.array([ring(a, b) - far for a, b in zip(edges[:-2], edges[1:-1])])
            ppm = adu / flux[sel] * 1e6
            out.append({"mag": [lo, hi], "n": int(sel.size), "annuli_px": [list(e) for e in zip(edges[:-2], edges[1:-1])],
                        "ppm_per_px": np.nanmedian(ppm, axis=1).round(1).tolist(),
                        "adu": np.nanmedian(adu, axis=1).round(3).tolist()})  # fmt: skip
    return out


#: Magnitude bins of the PSF - AP14 breakdown.
MAG_BINS = (14, 15, 16, 17, 18, 19)


def by_magnitude(res, ap_flux, sky, zeropoint, bright):
    """Per PSF-magnitude bin and sample (``bright``: the 14-18 mag selection; ``faint``:
    the 18-19.5 mag one): median PSF - AP14 [mmag] and median fitted background minus the
    local sky [ADU] (the local sky, beyond 10 px, holds a bright star's own far wings),
    with the star counts. Shows which stars set the slope."""
    k14 = APERTURES.index(14)
    with np.errstate(invalid="ignore", divide="ignore"):
        dm = -2.5 * np.log10(res["flux"] / ap_flux[:, k14]) * 1e3
        mag = zeropoint - 2.5 * np.log10(res["flux"])
    db = res["background"] - sky
    out = {}
    for sample, sel in (("bright", bright), ("faint", ~bright)):
        rows = []
        for lo, hi in zip(MAG_BINS[:-1], MAG_BINS[1:]):
            s = sel & (mag >= lo) & (mag < hi) & np.isfinite(dm)
            rows.append({"mag": [lo, hi], "n": int(s.sum()), "psf_minus_ap14_mmag": float(np.median(dm[s])) if s.any() else None,
                         "background_minus_sky": float(np.median(db[s])) if s.any() else None})  # fmt: skip
        out[sample] = rows
    return out


def chi2_bins(res, snr):
    out = {}
    for lo, hi in SNR_BINS:
        sel = (snr >= lo) & (snr < hi) & np.isfinite(res["chi2"]) & (res["dof"] > 0)
        key = f"{lo}-{hi}" if np.isfinite(hi) else f">{lo}"
        out[key] = {"chi2_dof": float(res["chi2"][sel].sum() / res["dof"][sel].sum()) if sel.any() else np.nan,
                    "median": float(np.median(res["chi2"][sel] / res["dof"][sel])) if sel.any() else np.nan,
                    "n": int(sel.sum())}  # fmt: skip
    return out


def mean_residual(res, stars, n_bright=100):
    """Mean (data - model) / flux of the ``n_bright`` brightest 14-18 mag reserve stars."""
    cand = np.flatnonzero(~stars.faint & np.isfinite(stars.flux) & np.isfinite(res["flux"]))
    top = cand[np.argsort(stars.flux[cand])[::-1][:n_bright]]
    s = stars.stamps
    valid = ~s.bad[top] & np.isfinite(s.data[top])
    r = np.where(valid, (s.data[top] - res["model"][top]) / res["flux"][top, None, None], np.nan)
    img = np.nanmean(r, axis=0)
    return img, len(top)


def curve_of_growth(render, x, y, size=41):
    """Model PSF - AP magnitudes (2.5 log10 of the enclosed flux, unit-flux model) for the
    aperture diameters, star at (x, y)."""
    from photutils.aperture import CircularAperture, aperture_photometry

    img, (x0, y0) = render(np.atleast_1d(x), np.atleast_1d(y), (size, size))
    img = np.nan_to_num(img[0])
    pos = (float(np.atleast_1d(x)[0] - np.atleast_1d(x0)[0]), float(np.atleast_1d(y)[0] - np.atleast_1d(y0)[0]))
    tab = aperture_photometry(img, [CircularAperture(pos, r=d / 2.0) for d in APERTURES], method="exact")
    ee = np.array([float(tab[f"aperture_sum_{k}"][0]) for k in range(len(APERTURES))])
    return 2.5 * np.log10(ee), float(img.sum())


def phase_sums(render, xc, yc):
    """Sums of the 17x17 stamp at 16 sub-pixel phases (0, 1/4, 1/2, 3/4 in x and y)."""
    f = np.arange(4) / 4.0
    gx, gy = np.meshgrid(xc + f, yc + f)
    img, _ = render(gx.ravel(), gy.ravel(), (STAMP, STAMP))
    return img.sum(axis=(1, 2))


def score(name, render, info, exposure, reserve, ap_flux, apcor):
    t0 = time.perf_counter()
    res = evaluate(render, reserve, exposure.gain)
    eval_s = time.perf_counter() - t0
    snr = reserve.snr
    resid, n_top = mean_residual(res, reserve)
    ny, nx = exposure.shape
    xc, yc = nx / 2.0, ny / 2.0
    cog_centre, sum41_c = curve_of_growth(render, np.floor(xc), np.floor(yc))
    cog_corner, sum41_k = curve_of_growth(render, np.floor(xc) + 0.5, np.floor(yc) + 0.5)
    sums = phase_sums(render, np.floor(xc), np.floor(yc))
    pa = {d: psf_minus_aperture(res, ap_flux, snr, exposure.zeropoint, k, ~reserve.faint) for k, d in enumerate(APERTURES)}
    stars_cog = [pa[d]["median"] for d in APERTURES]
    ok = np.isfinite(res["chi2"])
    out = {
        "name": name, **{k: v for k, v in info.items()},
        "eval_s": eval_s, "n_evaluated": int(ok.sum()), "n_failed": int((~ok).sum()),
        "n_not_settled": int(np.sum(ok & (res["last_step"] > 1e-3))),
        "chi2_dof": chi2_bins(res, snr),
        "chi2_dof_all": float(res["chi2"][ok].sum() / res["dof"][ok].sum()),
        "residual_max_abs_pct": float(np.nanmax(np.abs(resid)) * 100), "residual_n_stars": n_top,
        "residual_image_pct": np.round(resid * 100, 4).tolist(),
        "psf_minus_ap6": {k: v for k, v in pa[6.0].items() if k not in ("dm", "mag")},
        "psf_minus_ap14": {k: v for k, v in pa[14.0].items() if k not in ("dm", "mag")},
        "ap14_median_minus_apcor6": pa[14.0]["median"] - apcor[-1] if apcor is not None else None,
        "by_magnitude": by_magnitude(res, ap_flux, reserve.sky, exposure.zeropoint, ~reserve.faint),
        "curve_of_growth": {"diameters_px": list(APERTURES), "model_pixel_centre": cog_centre.tolist(),
                            "model_pixel_corner": cog_corner.tolist(), "stars_median": stars_cog,
                            "header_apcor": None if apcor is None else list(apcor),
                            "model_41px_sum_centre": sum41_c, "model_41px_sum_corner": sum41_k},
        "phase_sums": {"mean": float(sums.mean()), "spread_pct": float((sums.max() - sums.min()) / sums.mean() * 100),
                       "values": sums.tolist()},
    }  # fmt: skip
    plots = {"residual": resid, "dm6": pa[6.0]["dm"], "dm14": pa[14.0]["dm"], "mag": pa[6.0]["mag"]}
    return out, plots


# ----------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------
def fmt(v, f="{:.2f}"):
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f.format(v)


def table_text(results, apcor):
    bins = [f"{lo}-{hi}" if np.isfinite(hi) else f">{lo}" for lo, hi in SNR_BINS]
    lines = ["| PSF | build s | " + " | ".join(f"chi2/dof S/N {b}" for b in bins)
             + " | max abs mean resid % | PSF-AP6 scatter mmag | PSF-AP6 median | PSF-AP6 slope mmag/mag"
             " | PSF-AP14 scatter mmag | PSF-AP14 median - APCOR6 | PSF-AP14 slope mmag/mag | stamp-sum spread % (16 phases) |"]  # fmt: skip
    lines.append("|" + "---|" * (len(bins) + 10))
    slope = lambda pa: f"{fmt(pa['slope_mmag_per_mag'], '{:+.2f}')} ({fmt(pa['slope_14_18_stars_mmag_per_mag'], '{:+.2f}')})"
    for r in results:
        c = r["chi2_dof"]
        lines.append(
            f"| {r['name']} | {fmt(r['build_s'])} | " + " | ".join(f"{fmt(c[b]['chi2_dof'])} ({c[b]['n']})" for b in bins)
            + f" | {fmt(r['residual_max_abs_pct'])} | {fmt(r['psf_minus_ap6']['scatter_mmag'], '{:.1f}')}"
            f" | {fmt(r['psf_minus_ap6']['median'], '{:+.4f}')} | {slope(r['psf_minus_ap6'])}"
            f" | {fmt(r['psf_minus_ap14']['scatter_mmag'], '{:.1f}')}"
            f" | {fmt(r['ap14_median_minus_apcor6'], '{:+.4f}')} | {slope(r['psf_minus_ap14'])}"
            f" | {fmt(r['phase_sums']['spread_pct'], '{:.3f}')} |"
        )  # fmt: skip
    lines += ["", "chi2/dof: sum chi2 / sum dof (stars in the bin); scatter and median: S/N >= 100 stars; slopes: Theil-Sen"
              " over 14-19 mag, all reserve stars (in brackets the 14-18 mag ones alone)."]  # fmt: skip
    ratio = lambda a, b: a / b if a is not None and b else np.nan
    for peer in (r for r in results if r["name"].startswith("psfex")):
        others = [r for r in results if not r["name"].startswith("psfex")]
        if not others:
            continue
        lines += ["", f"Ratio to {peer['name']} (same run, same evaluator; < 1 is better):", "",
                  "| PSF | " + " | ".join(f"chi2/dof {b}" for b in bins) + " | PSF-AP6 scatter | max abs resid |",
                  "|" + "---|" * (len(bins) + 3)]  # fmt: skip
        for r in others:
            cells = [fmt(ratio(r["chi2_dof"][b]["chi2_dof"], peer["chi2_dof"][b]["chi2_dof"])) for b in bins]
            cells += [fmt(ratio(r["psf_minus_ap6"]["scatter_mmag"], peer["psf_minus_ap6"]["scatter_mmag"])),
                      fmt(ratio(r["residual_max_abs_pct"], peer["residual_max_abs_pct"]))]  # fmt: skip
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Curve of growth as PSF - AP magnitudes (model at the image centre: star on a pixel centre / corner;"
              " stars: median of S/N >= 100 reserve stars; ZTF header APCOR1-6):", "",
              "| PSF | " + " | ".join(f"d={d:g}px" for d in APERTURES) + " |", "|" + "---|" * (len(APERTURES) + 1)]  # fmt: skip
    for r in results:
        cg = r["curve_of_growth"]
        cells = [f"{a:+.3f}/{b:+.3f} (stars {fmt(s, '{:+.3f}')})" for a, b, s in zip(cg["model_pixel_centre"], cg["model_pixel_corner"], cg["stars_median"])]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    if apcor is not None:
        lines.append("| header APCOR | " + " | ".join(f"{a:+.3f}" for a in apcor) + " |")
    lines += ["", "PSF - AP14 [mmag] (fitted background - local sky [ADU]) by PSF magnitude: median of the 14-18 mag "
              "selection | of the 18-19.5 mag one (n stars):", "",
              "| PSF | " + " | ".join(f"{lo}-{hi}" for lo, hi in zip(MAG_BINS[:-1], MAG_BINS[1:])) + " |",
              "|" + "---|" * len(MAG_BINS)]  # fmt: skip
    cell = lambda c: "–" if c["n"] == 0 else f"{c['psf_minus_ap14_mmag']:+.1f} ({c['background_minus_sky']:+.2f}; {c['n']})"
    for r in results:
        bm = r["by_magnitude"]
        lines.append(f"| {r['name']} | " + " | ".join(f"{cell(b)} \\| {cell(f)}" for b, f in zip(bm["bright"], bm["faint"])) + " |")
    return "\n".join(lines)


def figures(names, plots, apcor, out_dir, clip_pct=1.0):
    """``real_psf_residuals.png`` (mean normalised residual images, one scale of
    +-``clip_pct`` %) and ``real_psf_apcor.png`` (PSF - aperture magnitudes against
    magnitude, the header's APCOR4/APCOR6 dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    ncol = min(n, 4)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol + 1.4, 2.7 * nrow + 0.6), squeeze=False, layout="constrained")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        r = plots[name]["residual"] * 100
        im = ax.imshow(r, origin="lower", cmap="RdBu_r", vmin=-clip_pct, vmax=clip_pct)
        ax.set_title(f"{name}\nmax |r| {np.nanmax(np.abs(r)):.2f} %", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), label="mean (data - model) / flux [%]", shrink=0.7)
    fig.suptitle(f"Real ZTF quadrant: mean normalised residual of the 100 brightest reserve stars (scale +-{clip_pct:g} %)", fontsize=10)
    p1 = out_dir / "real_psf_residuals.png"
    fig.savefig(p1, dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.0 * nrow + 0.6), sharex=True, sharey=True, squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    edges = np.arange(14.0, 19.75, 0.5)
    for ax, name in zip(axes.ravel(), names):
        mag = plots[name]["mag"]
        for key, label, k, colour in (("dm6", "AP 6 px", 3, "C0"), ("dm14", "AP 14 px", 5, "C1")):
            dm = plots[name][key]
            ax.plot(mag, dm, ".", ms=1.5, alpha=0.35, color=colour)
            idx = np.digitize(mag, edges)
            med = [np.nanmedian(dm[idx == i]) if np.sum(idx == i) >= 5 else np.nan for i in range(1, len(edges))]
            ax.plot(0.5 * (edges[1:] + edges[:-1]), med, "-o", ms=3, color=colour, label=f"PSF - {label}")
            if apcor is not None:
                ax.axhline(apcor[k], color=colour, lw=1, ls="--")
        ax.set_ylim(-0.2, 0.15)
        ax.set_title(name, fontsize=9)
    for i, ax in enumerate(axes.ravel()[:n]):
        if i + ncol >= n:  # no panel below: label its axis
            ax.set_xlabel("PSF mag")
            ax.tick_params(labelbottom=True)
    for ax in axes[:, 0]:
        ax.set_ylabel("PSF - AP [mag]")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle("PSF - aperture magnitudes of the reserve stars (lines: medians in 0.5 mag bins; dashed: header APCOR4, APCOR6)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    p2 = out_dir / "real_psf_apcor.png"
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return [p1, p2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", help="science image (default: the cached real ZTF quadrant)")
    ap.add_argument("--mask", help="mask image (default: the ZTF mskimg beside the image)")
    ap.add_argument("--models", nargs="+", default=list(BUILDERS), help=f"PSFs to build and score; known: {', '.join(BUILDERS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-fraction", type=float, default=0.8)
    ap.add_argument("--faint-limit", type=float, default=19.5, help="add isolated 18-LIMIT mag stars to the reserve (0: none)")
    ap.add_argument("--fit-stamp", type=int, default=STAMP, help="stamp size [px] the ztfpsf PSFs are fitted on (scored on 17)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_psf.json"))
    ap.add_argument("--figures", default=str(ROOT / "docs"), help="folder for the figures ('' for none)")
    ap.add_argument("--workdir", help="keep SExtractor/PSFEx files here (default: a temporary folder)")
    ap.add_argument("--check-psfex", action="store_true",
                    help="also compare our rendering of the .psf file with PSFEx's own model of its samples (check images)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("ztfpsf", "jax", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    unknown = [m for m in args.models if m not in BUILDERS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {list(BUILDERS)}")

    if args.image:
        image, mask = Path(args.image), Path(args.mask) if args.mask else None
    else:
        image, mask = map(Path, ztf_quadrant())
    mach = machine()
    print(f"{image.name}: {mach['cpu']}, {mach['cores']} cores, ztfpsf {mach['ztfpsf']}, jax {mach['jax']}")
    t0 = time.perf_counter()
    exposure, background, fit, reserve, sample = load_sample(image, mask, args.seed, args.fit_fraction, args.faint_limit, args.fit_stamp)
    sample["stars_s"] = time.perf_counter() - t0
    print(f"stars: {sample['n_selected']} selected (14-18 mag) -> {sample['n_fit']} fit, {sample['n_reserve']} reserve, "
          f"+ {sample['n_faint_reserve']} faint reserve (18-{args.faint_limit:g} mag); {sample['stars_s']:.1f} s")  # fmt: skip
    apcor = [float(exposure.header[f"APCOR{k}"]) for k in range(1, 7)] if all(f"APCOR{k}" in exposure.header for k in range(1, 7)) else None
    ap_flux = aperture_fluxes(exposure, reserve.x, reserve.y, reserve.sky)
    sample["star_concentration"] = star_concentration(ap_flux, exposure.zeropoint, ~reserve.faint)
    concentration = "; ".join(f"AP{k[2:].split('_')[0]} - AP14 {v['slope_mmag_per_mag']:+.2f} ({v['slope_14_18_mmag_per_mag']:+.2f})"
                              for k, v in sample["star_concentration"].items())
    print(f"the stars' own profile against magnitude (no PSF model; Theil-Sen, mmag/mag, 14-19 mag (14-18)): {concentration}")
    with np.errstate(invalid="ignore", divide="ignore"):
        ap_mag = exposure.zeropoint - 2.5 * np.log10(ap_flux[:, APERTURES.index(14)])
    sample["far_profile"] = far_profile(exposure, reserve.x, reserve.y, reserve.flux, ap_mag)
    far_text = "\n".join(f"  {b['mag'][0]}-{b['mag'][1]} mag ({b['n']}): " + ", ".join(
        f"{a}-{c} px {p:+.1f} ppm ({v:+.2f} ADU)" for (a, c), p, v in zip(b["annuli_px"], b["ppm_per_px"], b["adu"]))
        for b in sample["far_profile"])  # fmt: skip
    print("the stars' light far out (annulus median minus the 40-60 px ring, per pixel):\n" + far_text)

    results, plots = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_real_psf_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = Context(exposure, background, fit, workdir, image, mask, args.check_psfex)
        for name in args.models:
            try:
                render, info = BUILDERS[name](ctx)
            except Exception as err:  # a builder that cannot run is reported, the others go on
                print(f"{name}: skipped ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
                results.append({"name": name, "skipped": f"{type(err).__name__}: {err}"})
                continue
            out, plots[name] = score(name, render, info, exposure, reserve, ap_flux, apcor)
            results.append(out)
            print(f"{name}: built in {out['build_s']:.2f} s, evaluated {out['n_evaluated']} stars in {out['eval_s']:.1f} s, "
                  f"chi2/dof {out['chi2_dof_all']:.3f}")  # fmt: skip
    scored = [r for r in results if "skipped" not in r]
    text = table_text(scored, apcor)
    header = (f"Real-quadrant PSF benchmark: {image.name}; {mach['cpu']}, {mach['cores']} cores; "
              f"{sample['n_fit']} fit stars, {sample['n_reserve']} + {sample['n_faint_reserve']} reserve stars (seed {args.seed})")  # fmt: skip
    header += f"\nthe stars' own profile against magnitude (no PSF model; Theil-Sen slopes, mmag/mag, 14-19 mag (14-18 mag)): {concentration}"
    header += "\nthe stars' light far out (annulus median minus the 40-60 px ring, per pixel, ppm of the flux and ADU):\n" + far_text
    print("\n" + header + "\n\n" + text)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": mach, "image": str(image), "mask": None if mask is None else str(mask), "sample": sample,
               "stamp": STAMP, "fit_stamp": args.fit_stamp, "snr_bins": [list(b) for b in SNR_BINS], "apertures_px": list(APERTURES),
               "header_apcor": apcor, "zeropoint": exposure.zeropoint, "gain": exposure.gain, "results": results}  # fmt: skip
    write_json(payload, out_path)
    out_path.with_suffix(".txt").write_text(header + "\n\n" + text + "\n")
    print(f"\nwrote {out_path} and {out_path.with_suffix('.txt')}")
    if args.figures and scored:
        Path(args.figures).mkdir(parents=True, exist_ok=True)
        paths = figures([r["name"] for r in scored], plots, apcor, Path(args.figures))
        print("figures: " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
