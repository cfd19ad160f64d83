"""The quadrant's PSF-fit catalogue: every source measured with the PSF, neighbours together.

:func:`psf_catalog` measures every detected (or catalogued) source of an image with its
PSF model (analytic or hybrid, :class:`~ztfpsf.psf.PSFModel`) held fixed at the source's
position: ``flux, x, y`` per source and one background per group, sources closer than
``link`` FWHM fitted simultaneously (:mod:`ztfpsf.psf.groups`, one compiled program per
padded group size). The passes:

1. every group fitted on the image as it is (from the detections' positions);
2. (``refit``) every group fitted again with the light of all other sources, as fitted in
   pass 1, subtracted from its window (the wings of bright neighbours outside the group),
   their light also in the noise model; with ``redetect``, sources found in the residual
   image of pass 1 (hidden by brighter ones) join before the groups are formed again.

Flags (:mod:`ztfpsf.flags`; values are kept unless a ``BAD`` bit is set): ``BLENDED``
another fitted source closer than ``blend_radius`` FWHM (below the resolution limit the
split of the light between them is not reliable); ``NEIGHBOUR`` a source outside the
group within the fit disc (a group too large for :data:`ztfpsf.psf.groups.SIZES`, fitted
in pieces: its light was subtracted, not fitted); ``SATURATED`` / ``MASKED_PIXELS``
saturated / masked pixels in the source's fit disc (not used); ``OFF_IMAGE`` the disc
leaves the image (NaN row when the position itself is off the image); ``OUTSIDE_PSF``
outside the PSF's region of validity (NaN row); ``EXTRAPOLATED``; ``CENTER_SHIFT`` moved
more than ``max_shift`` px from the detection; ``POOR_FIT`` (:func:`ztfpsf.blends.poor_fit`);
``NOT_CONVERGED``, ``FIT_FAILED`` (NaN row), ``NO_DATA`` (NaN row).

:func:`forced_groups` is forced photometry with the same passes: given positions are
measured at their positions (held: the group fit's ``held`` members) while the other
sources of the image (sep's detections or a catalogue) are fitted beside them.
"""

import logging
from dataclasses import asdict, dataclass

import numpy as np
from astropy.table import Table

from . import blends
from ._jax import with_x64
from .flags import BAD, Flag
from .psf.groups import Groups, flux_scale, make_groups, measure_groups, render_sources

log = logging.getLogger(__name__)

__all__ = ["CatalogOptions", "psf_catalog", "forced_groups", "write_catalog", "write_residual", "effective_fwhm"]


@dataclass(frozen=True)
class CatalogOptions:
    """Options of :func:`psf_catalog` (lengths in units of the PSF's median FWHM unless
    said otherwise)."""

    link: float = 3.0  # friends-of-friends linking length
    fit_radius: float = 3.0  # a source's fit disc (its pixels, chi2 and dof)
    blend_radius: float = 1.0  # resolution limit: closer pairs are BLENDED
    prior_sigma: float = 1.0  # px: position prior around the detection
    max_shift: float = 1.5  # px: CENTER_SHIFT beyond
    refit: bool = True  # second pass with the other sources' light subtracted
    redetect: bool = False  # detect in the residual of pass 1 before the second pass
    redetect_sigma: float = 5.0  # significance of a source found in the residual
    noise: str = "measured"  # see ztfpsf.stamps.noise_model
    dtype: str = "float32"
    backend: str = "auto"


def _start_flux(exposure, psf, x, y, sky):
    """A start flux from the pixel nearest each source: (pixel - sky) / the PSF's peak."""
    ny, nx = exposure.data.shape
    ix = np.clip(np.floor(x + 0.5).astype(np.int64), 0, nx - 1)
    iy = np.clip(np.floor(y + 0.5).astype(np.int64), 0, ny - 1)
    peak = np.nanmax(psf.stamp(np.median(x), np.median(y), (5, 5), extrapolate=True))
    pix = np.nan_to_num(exposure.data[iy, ix] - sky[iy, ix])
    return np.maximum(pix, 1.0) / peak


def _sources(exposure, psf, sources, background, fwhm):
    """``(id, x, y)`` of the sources to measure: given, or detected with sep."""
    from .detect import detect_stars
    from .photometry import positions_xy

    if sources is None:
        sources = detect_stars(exposure, background=background, fwhm=fwhm)
    ident, x, y, _, _ = positions_xy(sources, exposure.wcs)
    return np.asarray(ident), np.asarray(x, np.float64), np.asarray(y, np.float64)


def _redetect(exposure, background, residual, x, y, fwhm, sigma):
    """Positions of point sources in the residual image of a pass, farther than one FWHM
    from every source already measured (sep on the residual, same background)."""
    from dataclasses import replace

    from scipy.spatial import cKDTree

    from .detect import detect_stars

    found = detect_stars(replace(exposure, data=residual.astype(exposure.data.dtype)), background=background, fwhm=fwhm,
                         threshold=3.0)
    fx, fy, snr = (np.asarray(found[k], np.float64) for k in ("x", "y", "snr"))
    keep = np.isfinite(fx) & (snr >= sigma)
    if len(x) and keep.any():
        d, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([fx[keep], fy[keep]]))
        keep[np.flatnonzero(keep)[d <= fwhm]] = False
    log.info("%s: %d new sources in the residual (S/N >= %g, > 1 FWHM from the others)", exposure.name, int(keep.sum()), sigma)
    return fx[keep], fy[keep]


def _judge(res, x_init, y_init, grouped, groups, fwhm, fit_radius, opt):
    """Catalogue-level warning bits: BLENDED, NEIGHBOUR, CENTER_SHIFT, POOR_FIT
    (``grouped``: the positions the groups were formed from)."""
    from scipy.spatial import cKDTree

    n = len(res["x"])
    flags = np.zeros(n, np.int64)
    ok = np.isfinite(res["x"]) & np.isfinite(res["y"]) & np.isfinite(res["flux"])
    idx = np.flatnonzero(ok)
    if idx.size > 1:
        tree = cKDTree(np.column_stack([res["x"][idx], res["y"][idx]]))
        d, _ = tree.query(np.column_stack([res["x"][idx], res["y"][idx]]), k=2)
        flags[idx[d[:, 1] < opt.blend_radius * fwhm]] |= int(Flag.BLENDED)
    sidx = np.flatnonzero(groups.split)  # only pieces of a split group have neighbours outside
    if sidx.size:
        gx, gy = grouped
        every = np.flatnonzero(groups.label >= 0)
        tree = cKDTree(np.column_stack([gx[every], gy[every]]))
        for i, near in zip(sidx, tree.query_ball_point(np.column_stack([gx[sidx], gy[sidx]]), fit_radius)):
            if np.any(groups.label[every[near]] != groups.label[i]):
                flags[i] |= int(Flag.NEIGHBOUR)
    with np.errstate(invalid="ignore", divide="ignore"):
        flags[ok & (np.hypot(res["x"] - x_init, res["y"] - y_init) > opt.max_shift)] |= int(Flag.CENTER_SHIFT)
        snr = res["flux"] / res["flux_err"]
    flags[ok & blends.poor_fit(res["chi2"], res["dof"], snr)] |= int(Flag.POOR_FIT)
    return flags


def _pass(exposure, psf, src, background, scene, fwhm, opt, progress, rounds=2):
    """Group the sources (at their start positions) and fit every group once."""
    groups = make_groups(src["sx"], src["sy"], opt.link * fwhm, use=src["use"])
    res = measure_groups(psf, exposure, src["sx"], src["sy"], src["flux"], groups, centre=(src["px"], src["py"]),
                         held=src["held"], background=background, scene=scene, scale=src["scale"], noise=opt.noise,
                         fit_radius=opt.fit_radius * fwhm, prior_sigma=opt.prior_sigma, rounds=rounds, dtype=opt.dtype,
                         backend=opt.backend, progress=progress)
    return groups, res


def _prepare(exposure, psf, ident, x, y, background, held=None):
    """The sources as columns: ``id``, ``x, y`` (as given), ``use`` (measurable), start
    ``sx, sy``, prior centres ``px, py``, start ``flux``, flux ``scale``, ``flags``,
    ``redetected``, ``held`` (position not fitted)."""
    ny, nx = exposure.data.shape
    finite = np.isfinite(x) & np.isfinite(y)
    on_image = finite & (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
    in_psf = finite & psf.contains(np.nan_to_num(x), np.nan_to_num(y))
    flags = np.where(on_image, 0, int(Flag.OFF_IMAGE)) | np.where(on_image & ~in_psf, int(Flag.OUTSIDE_PSF), 0)
    use = on_image & in_psf
    xs, ys = np.where(use, x, np.nan), np.where(use, y, np.nan)
    x0, y0 = np.nan_to_num(x), np.nan_to_num(y)
    flux = np.where(use, _start_flux(exposure, psf, x0, y0, background.level), np.nan)
    return dict(id=np.asarray(ident), x=x, y=y, use=use, sx=xs, sy=ys, px=xs, py=ys, flux=flux,
                scale=np.where(use, flux_scale(psf, x0, y0, flux=flux), 1.0), flags=flags.astype(np.int64), redetected=np.zeros(len(x), bool),
                held=np.zeros(len(x), bool) if held is None else np.asarray(held, bool))


def _restart(src, res, opt):
    """Pass 2 starts where pass 1 ended unless that went astray (a faint source drawn to
    the wing of a bright neighbour outside its group); the prior stays on the detection."""
    with np.errstate(invalid="ignore"):
        good = ((res["flags"] & int(BAD)) == 0) & (res["flux"] > 0)
        good &= np.hypot(res["x"] - src["px"], res["y"] - src["py"]) <= opt.max_shift
    return dict(src, sx=np.where(good, res["x"], src["sx"]), sy=np.where(good, res["y"], src["sy"]),
                flux=np.where(good, res["flux"], src["flux"]))


def _with_redetected(exposure, psf, src, background, fwhm, opt):
    """``src`` with the sources found in the residual of pass 1 appended."""
    ny, nx = exposure.data.shape
    scene = render_sources(psf, (ny, nx), src["sx"], src["sy"], src["flux"], scale=src["scale"])
    use = src["use"]
    nxs, nys = _redetect(exposure, background, exposure.data - scene, src["sx"][use], src["sy"][use], fwhm, opt.redetect_sigma)
    if not len(nxs):
        return src
    flux = _start_flux(exposure, psf, nxs, nys, background.level + scene)
    new = dict(id=-1 - np.arange(len(nxs)), x=nxs, y=nys, use=np.ones(len(nxs), bool), sx=nxs, sy=nys, px=nxs, py=nys,
               flux=flux, scale=flux_scale(psf, nxs, nys, flux=flux),
               flags=np.zeros(len(nxs), np.int64), redetected=np.ones(len(nxs), bool), held=np.zeros(len(nxs), bool))
    return {k: np.concatenate([src[k], new[k]]) for k in src}


def _table(exposure, psf, src, res, groups, flags, fwhm, opt):
    """The output table (see :func:`psf_catalog`)."""
    from .photometry import magnitudes

    bad = (flags & int(BAD)) != 0
    cols = {k: np.where(bad, np.nan, v) for k, v in res.items() if k not in ("flags", "dof", "n_iter")}
    out = Table(meta={"coordinates": "0-based pixel coordinates, pixel centres at integers"})
    out["id"] = src["id"]
    out["x_init"], out["y_init"] = src["x"], src["y"]
    for k in ("x", "x_err", "y", "y_err"):
        out[k] = cols[k]
    out["ra"], out["dec"] = _sky(exposure, cols["x"], cols["y"])
    for k in ("flux", "flux_err", "background", "background_err"):
        out[k] = cols[k]
    out["mag"], out["mag_err"] = magnitudes(cols["flux"], cols["flux_err"], exposure.zeropoint)
    out["chi2"], out["dof"] = cols["chi2"], np.where(bad, 0, res["dof"]).astype(np.int32)
    out["flags"] = flags.astype(np.int32)
    out["group_id"], out["group_size"] = groups.label, groups.size
    out["redetected"] = src["redetected"]
    for c in ("x_init", "y_init", "x", "y", "x_err", "y_err"):
        out[c].unit = "pix"
    out.meta.update(
        image=str(getattr(exposure, "path", "")), psf_model=psf.model.name, psf_mode=psf.mode,
        psf_hybrid=psf.residual is not None, flux_radius=psf.flux_radius, zeropoint=exposure.zeropoint, fwhm=fwhm,
        fwhm_note="effective FWHM [px] of the PSF at the centre of its region (lengths of the options are in its units)",
        n_groups=groups.n_groups, options=asdict(opt),
        flux="flux within the PSF's flux_radius [ADU]; mag = zeropoint - 2.5 log10(flux)",
    )
    return out


def effective_fwhm(psf, x=None, y=None, oversampling=5, size=25):
    """FWHM [px] of the PSF as the image shows it (the analytic profile and, for a hybrid,
    its residual surface, integrated over the pixels) at ``(x, y)`` (default the centre of
    its region): the diameter of the circle whose area is the area above half the maximum,
    on an image ``oversampling`` times finer made of stamps rendered at sub-pixel phases.
    (A hybrid PSF's own ``fwhm`` is that of its analytic core, which can be far narrower.)"""
    xmin, xmax, ymin, ymax = psf.bounds
    x = 0.5 * (xmin + xmax) if x is None else float(x)
    y = 0.5 * (ymin + ymax) if y is None else float(y)
    phases = (np.arange(oversampling) - (oversampling - 1) / 2) / oversampling
    px, py = (v.ravel() for v in np.meshgrid(phases, phases))
    origin = np.column_stack([np.full(px.size, np.floor(x + 0.5) - size // 2), np.full(px.size, np.floor(y + 0.5) - size // 2)])
    img = psf.render(x + px, y + py, origin, (size, size))
    area = np.sum(img >= 0.5 * img.max()) / oversampling**2
    return float(2.0 * np.sqrt(area / np.pi))


@with_x64
def psf_catalog(exposure, psf, sources=None, *, background=None, options=None, residual=False, progress=False):
    """Measure every source of ``exposure`` with ``psf``, neighbours fitted together.

    Parameters
    ----------
    exposure : ztfpsf.io.fits.Exposure
    psf : PSFModel or path of a PSF file
    sources : Table, dict, DataFrame or (N, 2) array, optional
        ``x, y`` (0-based pixels) or ``ra, dec`` [deg] (with the image's WCS) and an
        optional ``id``; default: sep's detections (:func:`ztfpsf.detect.detect_stars`).
    background : ztfpsf.detect.Background, optional
        Sky level and rms (estimated when not given): the noise model and start background.
    options : CatalogOptions
    residual : bool
        Also return the residual image ``data - all fitted sources`` (sky kept).
    progress : bool
        A progress bar over the groups on a terminal.

    Returns
    -------
    (Table, residual image or None)
        One row per source: ``id, x_init, y_init, x, x_err, y, y_err, ra, dec, flux,
        flux_err`` (on the PSF's flux scale: within its ``flux_radius``), ``background,
        background_err`` (the group's), ``mag, mag_err`` (with
        the image's zero point; NaN without one or for ``flux <= 0``), ``chi2, dof`` (over the
        source's own fit disc), ``flags``, ``group_id, group_size``, ``redetected``
        (found in the residual of pass 1; ``id`` -1, -2, ...). Sources that cannot be
        measured are NaN rows with their flag.
    """
    from .detect import estimate_background
    from .psf import PSFModel

    opt = options or CatalogOptions()
    if not isinstance(psf, PSFModel):
        psf = PSFModel.read(psf)
    bkg = background if background is not None else estimate_background(exposure)
    fwhm = effective_fwhm(psf)
    src = _prepare(exposure, psf, *_sources(exposure, psf, sources, bkg, fwhm), bkg)
    log.info("%s: %d sources, PSF fwhm %.2f px, linking length %.1f px", exposure.name, int(src["use"].sum()), fwhm,
             opt.link * fwhm)
    src, groups, res, flags = _measure(exposure, psf, src, bkg, fwhm, opt, progress)
    out = _table(exposure, psf, src, res, groups, flags, fwhm, opt)
    log.info("%s: %d sources in %d groups; %d unflagged, %d blended, %d NaN rows", exposure.name, len(out), groups.n_groups,
             int(np.sum(flags == 0)), int(np.sum((flags & int(Flag.BLENDED)) != 0)), int(np.sum((flags & int(BAD)) != 0)))
    image = None
    if residual:
        light = render_sources(psf, exposure.data.shape, out["x"], out["y"], out["flux"], scale=src["scale"])
        image = exposure.data - light.astype(exposure.data.dtype)
    return out, image


def _measure(exposure, psf, src, bkg, fwhm, opt, progress):
    """The passes of :func:`psf_catalog` on the prepared sources ``src``: returns ``src``
    (with any redetected sources appended), the groups, the result columns and the flags."""
    refit = opt.refit or opt.redetect
    groups, res = _pass(exposure, psf, src, bkg, None, fwhm, opt, progress, rounds=1 if refit else 2)
    if refit:
        src = _restart(src, res, opt)
        if opt.redetect:
            src = _with_redetected(exposure, psf, src, bkg, fwhm, opt)
        scene = render_sources(psf, exposure.data.shape, src["sx"], src["sy"], src["flux"], scale=src["scale"])
        groups, res = _pass(exposure, psf, src, bkg, scene, fwhm, opt, progress)
    flags = src["flags"] | res["flags"] | _judge(res, src["px"], src["py"], (src["sx"], src["sy"]), groups, fwhm,
                                                 opt.fit_radius * fwhm, opt)
    measured = np.isfinite(res["x"]) & np.isfinite(res["y"])
    flags[measured & ~psf.supported(np.nan_to_num(res["x"]), np.nan_to_num(res["y"]))] |= int(Flag.EXTRAPOLATED)
    return src, groups, res, flags


def _others(fx, fy, x, y, radius):
    """Mask of the sources ``(x, y)`` farther than ``radius`` [px] from every forced
    position ``(fx, fy)`` (a closer one is taken to be that position's own source)."""
    from scipy.spatial import cKDTree

    keep = np.isfinite(x) & np.isfinite(y)
    ok = np.isfinite(fx) & np.isfinite(fy)
    if ok.any() and keep.any():
        d, _ = cKDTree(np.column_stack([fx[ok], fy[ok]])).query(np.column_stack([x[keep], y[keep]]))
        keep[np.flatnonzero(keep)[d <= radius]] = False
    return keep


@with_x64
def forced_groups(exposure, psf, positions, sources="detect", *, fit_position=False, background=None, options=None,
                  match_radius=0.5, progress=False):
    """Forced photometry at ``positions`` with their neighbours fitted together: the
    groups, passes and flags of :func:`psf_catalog`, the positions held.

    The forced positions and the other sources (``sources``: ``"detect"`` for sep's
    detections, or a table of ``x, y`` / ``ra, dec``) are grouped by friends of friends and
    fitted together; a forced position keeps its given ``x, y`` (unless ``fit_position``:
    then it has the catalogue's position prior around it) while the other sources' flux,
    x, y are fitted. Other sources within ``match_radius`` FWHM of a forced position are
    that position's own source and dropped.

    Returns the :func:`psf_catalog` table of the forced positions only, in their order
    (``x_err, y_err`` 0 where held); its metadata says how many other sources were fitted.
    """
    from .detect import estimate_background
    from .photometry import positions_xy
    from .psf import PSFModel

    opt = options or CatalogOptions()
    if not isinstance(psf, PSFModel):
        psf = PSFModel.read(psf)
    if isinstance(sources, str) and sources != "detect":
        raise ValueError(f"sources must be 'detect' or a table of x, y or ra, dec; got {sources!r}")
    bkg = background if background is not None else estimate_background(exposure)
    fwhm = effective_fwhm(psf)
    fid, fx, fy, _, _ = positions_xy(positions, exposure.wcs)
    fx, fy = np.asarray(fx, np.float64), np.asarray(fy, np.float64)
    _, ox, oy = _sources(exposure, psf, None if isinstance(sources, str) else sources, bkg, fwhm)
    keep = _others(fx, fy, ox, oy, match_radius * fwhm)
    log.info("%s: %d forced positions, %d other sources (%d within %.2g FWHM of a position taken as its own)",
             exposure.name, len(fx), int(keep.sum()), int(np.sum(np.isfinite(ox) & ~keep)), match_radius)
    n, m = len(fx), int(keep.sum())
    src = _prepare(exposure, psf, np.concatenate([np.arange(n), -1 - np.arange(m)]), np.concatenate([fx, ox[keep]]),
                   np.concatenate([fy, oy[keep]]), bkg, held=np.arange(n + m) < (0 if fit_position else n))
    src, groups, res, flags = _measure(exposure, psf, src, bkg, fwhm, opt, progress)
    first = lambda d: {k: v[:n] for k, v in d.items()}
    sub = Groups(groups.label[:n], groups.size[:n], {}, groups.split[:n], groups.link)
    out = _table(exposure, psf, first(src), first(res), sub, flags[:n], fwhm, opt)
    out["id"] = np.asarray(fid)
    out.meta.update(n_groups=groups.n_groups, n_other_sources=int(len(src["x"]) - n),
                    other_sources="sep detections" if isinstance(sources, str) else "catalogue", match_radius=match_radius)
    return out


def _sky(exposure, x, y):
    ra, dec = np.full(len(x), np.nan), np.full(len(x), np.nan)
    ok = np.isfinite(x) & np.isfinite(y)
    if exposure.wcs is not None and ok.any():
        from .io.catalog import pixel_to_sky

        ra[ok], dec[ok] = pixel_to_sky(x[ok], y[ok], exposure.wcs)
    return ra, dec


def write_catalog(table, path):
    """Write the catalogue as Parquet (atomically, metadata under the ``ztfpsf`` key)."""
    from .io.results import write_parquet

    return write_parquet(table, path, dict(table.meta))


def write_residual(image, header, path):
    """Write the residual image as FITS (atomically), with the image's header (WCS)."""
    from astropy.io import fits

    from .io.results import atomic_write

    hdr = header.copy() if header is not None else fits.Header()
    hdr["ZPSFRES"] = ("data - sources", "ztfpsf catalog: fitted sources subtracted")
    return atomic_write(path, lambda tmp: fits.PrimaryHDU(np.asarray(image, np.float32), hdr).writeto(tmp))
