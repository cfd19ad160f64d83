"""PSF photometry of ZTF alert candidates, with a PSF shape measured on stars.

Every alert carries a 63x63 science, template and difference cutout centred on the
candidate. The candidate is measured on the difference cutout by a forced PSF fit
(``fit_stamps`` with the shape held fixed; flux, background and a sub-pixel position
free) with a pixel-integrated Moffat whose shape comes from *stars of the science
cutout*, never from the candidate alone: fitting the shape and the flux of a faint
candidate together is degenerate (alpha trades with flux by tenths of a magnitude).

Why the science cutout: the difference image is science minus (PSF-matched) reference
on the science image's PSF, so the science image's stars are the PSF the candidate
has. The template is a deep co-add with its own, usually sharper, PSF (on these alerts
its stars are 0.78x the science FWHM): it is not the difference's PSF.

The PSF of each alert (``psf_source``):

``local``
    the science cutout has well-measured stars (detection S/N >= ``shape_snr``, alpha
    determined to 30 %): weighted median (weights 1/fwhm_err**2) of their free-shape
    Moffat ``fwhm`` and ``alpha``. The candidate's own star is one of them when it is
    point-like, the best PSF star there is (same position, same exposure).
``local_fwhm``
    only fainter stars (S/N >= ``min_star_snr``): alpha is badly determined at low S/N
    (it trades with fwhm), so alpha is taken from the well-measured stars of the same
    readout-channel image (``pid``), else the same exposure (``jd``), else the same
    night (``nid``), else all alerts measured together, else ``default_alpha``; the
    stars are refitted with that alpha and the fwhm is their weighted median.
``quadrant``
    no usable star in the cutout: the PSF of the other alerts of the same
    readout-channel image (``pid``): same exposure, same CCD quadrant.
``exposure``, ``night``, ``batch``
    the PSF of the same exposure on other CCDs (``jd``), else of the night (``nid``),
    else of every alert measured together. The PSF varies over the focal plane, so it is
    checked on the candidate: its fwhm is fitted (alpha fixed) on the difference, and
    unless that is measured to 15 % and agrees within 3 sigma the alert is flagged
    ``SHAPE_UNTRUSTED`` (the borrowed PSF is still used).
``difference``
    nothing else: the candidate's own fwhm (alpha ``default_alpha``), ``SHAPE_UNTRUSTED``.

Flags: the forced fit's (``BAD`` bits: NaN values); ``MASKED_PIXELS`` only for masked
pixels within ``mask_radius`` FWHM of the candidate; ``OFF_IMAGE`` when the difference
stamp reaches beyond a (cut-short) cutout; ``CENTER_SHIFT`` beyond ``max_shift``;
``POOR_FIT`` for a poor fit (chi2/dof too high: a dipole, a bad subtraction);
``NO_SOURCE`` for a flux <= 0 (no magnitude); ``NO_DATA`` for an alert without a usable
difference cutout (the reason in column ``problem``).

Noise of a difference pixel: ``sky_var + S/gain + T/(gain * nframesref)`` with
``sky_var`` the robust (1.4826 MAD) variance of the difference cutout's pixels, ``S``
and ``T`` the science and template pixels above their sky (the Poisson noise of the
sources on both sides of the subtraction; the template is a co-add of ``nframesref``
frames, default 15) and ZTF's nominal gain 6.2 e-/ADU (``gain=``).

The flux is in DN on the difference cutout, a total (PSF) flux like ``magpsf``:
``mag = magzpsci - 2.5 log10(flux)``. Pure functions over :class:`ztfpsf.io.alerts.Alert`
lists; no I/O, no plotting.
"""

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table
from scipy import ndimage

from .fitting import fit_stamps
from .flags import BAD, Flag

log = logging.getLogger(__name__)

__all__ = [
    "ZTF_GAIN",
    "DEFAULT_NFRAMESREF",
    "AlertPSFConfig",
    "candidate_center",
    "find_stars",
    "fit_psf_stars",
    "psf_groups",
    "measure_alerts",
    "RESULT_COLUMNS",
    "PIPELINE_COLUMNS",
    "compare_with_pipeline",
    "blank_sky_pulls",
    "robust_std",
]

#: ZTF's nominal gain [e-/ADU] (the cutouts' headers carry none).
ZTF_GAIN = 6.2
#: Frames in a ZTF reference co-add when the packet does not say (``nframesref``).
DEFAULT_NFRAMESREF = 15
#: Cutout size of a full ZTF alert stamp.
CUTOUT_SIZE = 63

#: Candidate fields copied beside the measurement (the pipeline's values, ZTF names).
#: ``fwhm`` is renamed ``fwhm_ztf`` (``fwhm`` is ours).
PIPELINE_COLUMNS = (
    "magpsf", "sigmapsf", "chipsf", "magap", "sigmagap", "rb", "drb", "isdiffpos",
    "magzpsci", "classtar", "fid", "nid", "jd", "field", "rcid", "pid", "xpos", "ypos",
    "nframesref",
)
#: Columns of the result table, in order (then the pipeline's columns).
RESULT_COLUMNS = (
    "objectId", "candid", "flux", "flux_err", "mag", "mag_err", "x", "y", "background",
    "fwhm", "alpha", "chi2", "dof", "flags", "psf_source", "n_psf_stars",
)

# star-fit flags that disqualify a star as a PSF star
_STAR_BAD = BAD | Flag.CENTER_SHIFT


@dataclass(frozen=True)
class AlertPSFConfig:
    """Options of the alert measurement (defaults measured on 240 public ZTF alerts).

    gain : e-/ADU for the sources' Poisson noise (ZTF nominal 6.2).
    star_size, stamp_size : odd sizes [px] of the science star stamps and of the
        difference stamp around the candidate.
    detect_snr : peaks of the smoothed science cutout above this S/N are sources (and
        neighbours to mask).
    min_star_snr : stars at least this bright are fitted for the PSF fwhm.
    shape_snr, max_alpha_rel_err : stars at least this bright whose alpha is known to
        this fraction of (alpha - 1) give the full shape (fwhm and alpha).
    alpha_range, fwhm_range : physical bounds of a PSF star's shape; alpha above the
        range (a Gaussian-like profile) is capped at its upper end.
    default_alpha : alpha when no well-measured star is known at all.
    max_shift : flag ``CENTER_SHIFT`` if the fitted candidate moved more than this [px]
        from the packet's position.
    max_chi2 : flag a forced fit whose chi2/dof exceeds ``max_chi2`` (times
        ``1 + (snr/chi2_snr_scale)**2``, room for the Moffat's imperfect match of
        bright stars) as a poor fit.
    mask_radius : masked pixels within this many FWHM of the candidate flag
        ``MASKED_PIXELS`` (farther ones only cost background pixels).
    group_keys : candidate fields whose equal values share the PSF alpha (in this order).
    max_iter : Levenberg-Marquardt iterations of the forced fits (their chi2 surface is
        flat along the position at low S/N: 30 sometimes stops short).

    The last four switch the method's choices off, to measure what each is worth
    (``benchmarks/validate_alerts.py --ablations``): ``star_cutout='template'`` takes
    the stars of the template cutout; ``fit_position=False`` holds the candidate at the
    packet's position; ``source_noise=False`` keeps only the sky variance;
    ``free_shape=True`` fits the shape of the candidate itself (no stars).
    """

    gain: float = ZTF_GAIN
    star_size: int = 17
    stamp_size: int = 21
    detect_snr: float = 5.0
    min_star_snr: float = 10.0
    shape_snr: float = 50.0
    max_alpha_rel_err: float = 0.3
    alpha_range: tuple = (1.5, 20.0)
    fwhm_range: tuple = (0.8, 12.0)
    default_alpha: float = 3.0
    max_shift: float = 1.0
    max_chi2: float = 3.0
    chi2_snr_scale: float = 50.0
    mask_radius: float = 2.0
    group_keys: tuple = ("pid", "jd", "nid")
    max_iter: int = 150
    star_cutout: str = "science"
    fit_position: bool = True
    source_noise: bool = True
    free_shape: bool = False

    def __post_init__(self):
        if self.star_cutout not in ("science", "template"):
            raise ValueError(f"star_cutout must be 'science' or 'template'; got {self.star_cutout!r}")
        if not self.gain > 0:
            raise ValueError(f"gain must be > 0 e-/ADU; got {self.gain}")
        if self.stamp_size % 2 == 0 or self.star_size % 2 == 0 or min(self.stamp_size, self.star_size) < 7:
            raise ValueError("stamp_size and star_size must be odd and >= 7")
    method: str = "lm"
    dtype: str = "float64"


# --------------------------------------------------------------------------------------
# geometry and pixels
# --------------------------------------------------------------------------------------
def candidate_center(candidate, shape, full=CUTOUT_SIZE):
    """0-based (column, row) of the candidate in a cutout of ``shape`` (rows, columns).

    A full cutout is centred on the pixel nearest to (xpos, ypos) (1-based readout-channel
    coordinates): the candidate is at ``31 + xpos - round(xpos)``. A cutout cut short by
    the channel's edge lost its pixels on the side of that edge: a candidate within 31 px
    of pixel 1 lost the low side, so its position moves down by the missing count.
    """
    ny, nx = shape
    out = []
    for pos, n in ((candidate["xpos"], nx), (candidate["ypos"], ny)):
        frac = pos - np.round(pos)
        c = (full - 1) // 2 + frac
        if n < full and np.round(pos) - (full - 1) // 2 < 1:
            c -= full - n
        out.append(float(c))
    return out[0], out[1]


def _robust_sky(img):
    """Median and 1.4826 MAD of the finite pixels (NaN, NaN if there are none)."""
    v = img[np.isfinite(img)]
    if v.size < 10:
        return np.nan, np.nan
    med = np.median(v)
    return float(med), float(1.4826 * np.median(np.abs(v - med)))


def _cut(img, x, y, size):
    """``size`` x ``size`` stamp centred on the pixel nearest (x, y), NaN off the image,
    and the image (x, y) of its pixel [0, 0]."""
    h = size // 2
    ny, nx = img.shape
    ix, iy = int(np.round(x)), int(np.round(y))
    out = np.full((size, size), np.nan)
    y0, y1, x0, x1 = max(iy - h, 0), min(iy + h + 1, ny), max(ix - h, 0), min(ix + h + 1, nx)
    if y0 < y1 and x0 < x1:
        out[y0 - (iy - h) : y1 - (iy - h), x0 - (ix - h) : x1 - (ix - h)] = img[y0:y1, x0:x1]
    return out, (ix - h, iy - h)


def find_stars(science, detect_snr=5.0, smooth=1.0):
    """Peaks of a science cutout: columns, rows and detection S/N of each source.

    The cutout minus its median is smoothed with a Gaussian of ``smooth`` px (a matched
    filter for a point source) and local maxima (5x5) above ``detect_snr`` times the
    smoothed noise are kept; NaN pixels count as sky.
    """
    med, sig = _robust_sky(science)
    if not np.isfinite(sig) or sig <= 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    z = np.where(np.isfinite(science), science - med, 0.0)
    sm = ndimage.gaussian_filter(z, smooth, mode="constant")
    noise = sig / (2.0 * np.sqrt(np.pi) * smooth)  # noise of the smoothed image
    peaks = (sm == ndimage.maximum_filter(sm, 5, mode="constant")) & (sm > detect_snr * noise)
    rows, cols = np.nonzero(peaks)
    return cols, rows, sm[rows, cols] / noise


# --------------------------------------------------------------------------------------
# per-alert preparation: stamps and noise (numpy)
# --------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    """What the fits need from one alert."""

    index: int
    flags: int = 0
    problem: str = ""
    center: tuple = (np.nan, np.nan)
    diff: np.ndarray | None = None
    diff_var: np.ndarray | None = None
    diff_origin: tuple = (0, 0)
    stars: list = field(default_factory=list)  # (data, variance, mask, origin, x, y, snr)


def _cutout_problem(alert):
    """Why an alert cannot be measured ('' if it can)."""
    if alert.difference is None:
        return "no difference cutout"
    if not np.isfinite(alert.difference).any():
        return "difference cutout has no finite pixel"
    for key in ("xpos", "ypos", "magzpsci"):
        v = alert.candidate.get(key)
        if v is None or not np.isfinite(v):
            return f"candidate field {key} missing"
    return ""


def _source_terms(alert, cfg):
    """Poisson variance [DN^2] of the sources on both sides of the subtraction."""
    shape = alert.difference.shape
    var = np.zeros(shape)
    nref = alert.candidate.get("nframesref")
    nref = nref if nref is not None and np.isfinite(nref) and nref > 0 else DEFAULT_NFRAMESREF
    for img, scale in ((alert.science, 1.0), (alert.template, 1.0 / nref)):
        if img is None or img.shape != shape:
            continue
        med, _ = _robust_sky(img)
        if np.isfinite(med):
            var += scale * np.nan_to_num(np.clip(img - med, 0.0, None)) / cfg.gain
    return var


def _prepare(index, alert, cfg):
    p = _Prepared(index)
    p.problem = _cutout_problem(alert)
    if p.problem:
        p.flags |= Flag.NO_DATA
        return p
    diff = np.asarray(alert.difference, dtype=np.float64)
    p.center = candidate_center(alert.candidate, diff.shape)
    _, sig = _robust_sky(diff)
    if not np.isfinite(sig) or sig <= 0:
        p.problem, p.flags = "difference cutout has no usable sky", p.flags | Flag.NO_DATA
        return p
    var = sig**2 + (_source_terms(alert, cfg) if cfg.source_noise else np.zeros(diff.shape))
    p.diff, origin = _cut(diff, *p.center, cfg.stamp_size)
    p.diff_var, _ = _cut(var, *p.center, cfg.stamp_size)
    p.diff_origin = origin
    h = cfg.stamp_size // 2
    ny, nx = diff.shape
    if not (h <= p.center[0] <= nx - 1 - h and h <= p.center[1] <= ny - 1 - h):
        p.flags |= Flag.OFF_IMAGE  # the stamp reaches beyond the cutout
    stars_img = alert.cutout(cfg.star_cutout)
    if stars_img is not None and stars_img.shape == diff.shape and not cfg.free_shape:
        p.stars = _star_stamps(np.asarray(stars_img, dtype=np.float64), cfg)
    return p


def _star_stamps(science, cfg):
    """Stamps of the sources of a science cutout for the PSF fit; each masks the pixels
    nearer to another source than to its own (a simple deblending)."""
    cols, rows, snr = find_stars(science, cfg.detect_snr)
    med, sig = _robust_sky(science)
    h = cfg.star_size // 2
    ny, nx = science.shape
    out = []
    for i in np.nonzero(snr >= cfg.min_star_snr)[0]:
        x, y = cols[i], rows[i]
        if not (h // 2 <= x <= nx - 1 - h // 2 and h // 2 <= y <= ny - 1 - h // 2):
            continue  # too close to the cutout's edge to hold the wings
        data, (ox, oy) = _cut(science, x, y, cfg.star_size)
        yy, xx = np.mgrid[oy : oy + cfg.star_size, ox : ox + cfg.star_size]
        d_own = np.hypot(xx - x, yy - y)
        mask = np.zeros(data.shape, bool)
        for j in range(cols.size):
            if j != i:
                mask |= np.hypot(xx - cols[j], yy - rows[j]) < d_own
        var = sig**2 + np.clip(np.nan_to_num(data - med), 0.0, None) / cfg.gain
        out.append((data, var, mask, (ox, oy), float(x), float(y), float(snr[i])))
    return out


# --------------------------------------------------------------------------------------
# PSF stars
# --------------------------------------------------------------------------------------
def fit_psf_stars(alerts, config=None, *, _prepared=None):
    """Free-shape Moffat fits of the stars of every alert's science cutout.

    Returns one row per star: ``alert`` (index into ``alerts``), ``star``, ``x, y``
    (cutout pixels), ``snr_det``, the fit's ``fwhm, fwhm_err, alpha, alpha_err, flux,
    chi2, dof, flags``, ``fwhm_ok`` (a sane free-shape fit: no failure flag, fwhm in
    range), ``shape_ok`` (also bright enough and alpha determined well enough to give the
    full shape) and the alert's group keys (``pid, jd, nid`` as strings).
    """
    cfg = config or AlertPSFConfig()
    prepared = _prepared if _prepared is not None else [_prepare(i, a, cfg) for i, a in enumerate(alerts)]
    rows = [(p.index, k, s) for p in prepared for k, s in enumerate(p.stars)]
    t = Table()
    if rows:
        data, var, mask, origin = (np.array([r[2][j] for r in rows]) for j in range(4))
        xi = np.array([r[2][4] for r in rows])
        yi = np.array([r[2][5] for r in rows])
        fit = fit_stamps(
            data, var, model="moffat", mask=mask, origin=origin.astype(float), x_init=xi, y_init=yi,
            method=cfg.method, dtype=cfg.dtype, max_shift=2.0, min_snr=3.0,
        )
        t["alert"] = np.array([r[0] for r in rows], dtype=np.int64)
        t["star"] = np.array([r[1] for r in rows], dtype=np.int32)
        t["x"], t["y"] = np.asarray(fit["x"]), np.asarray(fit["y"])
        t["snr_det"] = np.array([r[2][6] for r in rows])
        for c in ("flux", "flux_err", "fwhm", "fwhm_err", "alpha", "alpha_err", "chi2", "dof", "flags"):
            t[c] = np.asarray(fit[c])
    else:
        for c, dt in (("alert", np.int64), ("star", np.int32)):
            t[c] = np.zeros(0, dt)
        for c in ("x", "y", "snr_det", "flux", "flux_err", "fwhm", "fwhm_err", "alpha", "alpha_err", "chi2"):
            t[c] = np.zeros(0)
        t["dof"] = np.zeros(0, np.int32)
        t["flags"] = np.zeros(0, np.int32)
    _judge_stars(t, cfg)
    for key in cfg.group_keys:
        t[key] = np.array([_group_value(alerts[i], key) for i in t["alert"]], dtype=object).astype(str)
    return t


def _judge_stars(t, cfg):
    """Columns ``fwhm_ok`` and ``shape_ok`` of a star table; alpha above the range capped."""
    if len(t) == 0:
        t["fwhm_ok"] = np.zeros(0, bool)
        t["shape_ok"] = np.zeros(0, bool)
        return
    flags = np.asarray(t["flags"])
    fwhm, alpha = np.asarray(t["fwhm"], float), np.asarray(t["alpha"], float)
    fwhm_err, alpha_err = np.asarray(t["fwhm_err"], float), np.asarray(t["alpha_err"], float)
    lo, hi = cfg.alpha_range
    # SHAPE_LIMIT from alpha above its bound is a Gaussian-like profile: kept, capped
    limit_alpha_only = ((flags & Flag.SHAPE_LIMIT) != 0) & (alpha >= hi)
    with np.errstate(invalid="ignore"):
        fwhm_ok = (
            ((flags & _STAR_BAD) == 0)
            & (((flags & Flag.SHAPE_LIMIT) == 0) | limit_alpha_only)
            & (fwhm >= cfg.fwhm_range[0]) & (fwhm <= cfg.fwhm_range[1])
            & np.isfinite(fwhm_err) & (fwhm_err > 0)
            & (np.asarray(t["snr_det"]) >= cfg.min_star_snr)
        )
        rel = np.where(alpha >= hi, 0.0, alpha_err / np.maximum(alpha - 1.0, 1e-6))
        shape_ok = fwhm_ok & (np.asarray(t["snr_det"]) >= cfg.shape_snr) & (alpha >= lo) & (rel <= cfg.max_alpha_rel_err)
    t["alpha"] = np.where(np.isfinite(alpha), np.minimum(alpha, hi), alpha)
    t["fwhm_ok"] = fwhm_ok
    t["shape_ok"] = shape_ok


def _group_value(alert, key):
    v = alert.candidate.get(key)
    return "" if v is None else repr(v)


def _weighted_median(values, weights):
    values, weights = np.asarray(values, float), np.asarray(weights, float)
    order = np.argsort(values)
    values, weights = values[order], weights[order]
    c = np.cumsum(weights)
    return float(values[np.searchsorted(c, 0.5 * c[-1])])


def _star_weights(t):
    err = np.asarray(t["fwhm_err"], float)
    return 1.0 / np.maximum(err, 1e-3) ** 2


def psf_groups(stars, config=None):
    """Shapes of groups of alerts from their well-measured stars (``shape_ok``).

    Returns a dict ``{(key, value): (fwhm, alpha, n_stars)}`` for each of
    ``config.group_keys`` (``pid``: one readout-channel image, ``jd``: one exposure,
    ``nid``: one night) and ``("all", "")`` for every star given: weighted medians over
    the stars. Computed over many files, it lets each file use its neighbours' stars
    (``measure_alerts(..., groups=)``).
    """
    cfg = config or AlertPSFConfig()
    good = stars[np.asarray(stars["shape_ok"], bool)] if len(stars) else stars
    out = {}
    if len(good) == 0:
        return out
    w = _star_weights(good)
    for key in cfg.group_keys:
        if key not in good.colnames:
            continue
        vals = np.asarray(good[key]).astype(str)
        for v in np.unique(vals):
            if v in ("", "None", "nan"):
                continue
            m = vals == v
            out[(key, v)] = (_weighted_median(good["fwhm"][m], w[m]), _weighted_median(good["alpha"][m], w[m]), int(m.sum()))
    out[("all", "")] = (_weighted_median(good["fwhm"], w), _weighted_median(good["alpha"], w), len(good))
    return out


def _group_lookup(groups, alert, keys, exclude_all=False):
    """(fwhm, alpha, n, key) of the first group of ``keys`` that this alert belongs to."""
    for key in keys:
        g = groups.get((key, _group_value(alert, key)))
        if g is not None:
            return g + (key,)
    if not exclude_all and ("all", "") in groups:
        return groups[("all", "")] + ("all",)
    return None


def _choose_psfs(alerts, prepared, stars, groups, cfg):
    """Per alert: fwhm, alpha, psf_source, n_psf_stars, extra flags."""
    n = len(alerts)
    fwhm, alpha = np.full(n, np.nan), np.full(n, np.nan)
    source = np.full(n, "none", dtype=object)
    nstars = np.zeros(n, int)
    flags = np.zeros(n, np.int64)
    idx = np.asarray(stars["alert"]) if len(stars) else np.zeros(0, int)
    shape_ok = np.asarray(stars["shape_ok"], bool) if len(stars) else np.zeros(0, bool)

    if cfg.free_shape:  # the degenerate baseline, for comparison: nothing from stars
        usable = np.array([not p.flags & Flag.NO_DATA for p in prepared], bool)
        source[usable] = "difference"
        flags[usable] |= Flag.SHAPE_UNTRUSTED
        return fwhm, alpha, source, nstars, flags

    refit = []  # alerts whose fwhm is measured on faint stars at a fixed alpha
    for i in range(n):
        if prepared[i].flags & Flag.NO_DATA:
            continue
        local = shape_ok & (idx == i)
        if local.any():
            s = stars[local]
            w = _star_weights(s)
            fwhm[i], alpha[i] = _weighted_median(s["fwhm"], w), _weighted_median(s["alpha"], w)
            source[i], nstars[i] = "local", int(local.sum())
        elif prepared[i].stars:
            g = _group_lookup(groups, alerts[i], cfg.group_keys)
            alpha[i] = g[1] if g is not None else cfg.default_alpha
            refit.append(i)

    if refit:
        _refit_fwhm(refit, prepared, alpha, fwhm, source, nstars, cfg)

    # no usable star in the cutout: the same readout-channel image's PSF, else a wider
    # group's, kept only if the candidate itself agrees with it (see _verify_on_candidate)
    verify = []
    for i in range(n):
        if prepared[i].flags & Flag.NO_DATA or np.isfinite(fwhm[i]):
            continue
        g = _group_lookup(groups, alerts[i], ("pid",), exclude_all=True)
        if g is not None:
            fwhm[i], alpha[i], nstars[i], source[i] = g[0], g[1], g[2], "quadrant"
            continue
        g = _group_lookup(groups, alerts[i], ("jd", "nid"))
        if g is not None:
            fwhm[i], alpha[i], nstars[i] = g[0], g[1], g[2]
            source[i] = {"jd": "exposure", "nid": "night", "all": "batch"}[g[3]]
        else:
            alpha[i], source[i] = cfg.default_alpha, "difference"
        verify.append(i)
    if verify:
        _verify_on_candidate(verify, prepared, fwhm, alpha, source, flags, cfg)
    return fwhm, alpha, source, nstars, flags


def _verify_on_candidate(rows, prepared, fwhm, alpha, source, flags, cfg):
    """Check a borrowed PSF against the candidate: fit its fwhm (alpha fixed) on the
    difference stamp. A borrowed fwhm within ``3 sigma`` of the candidate's, measured to
    ``15 %`` or better, is kept as trusted; otherwise the alert is ``SHAPE_UNTRUSTED``.
    With nothing borrowed (``difference``) the candidate's own fwhm is used, untrusted."""
    data = np.array([prepared[i].diff for i in rows])
    var = np.array([prepared[i].diff_var for i in rows])
    xc = np.array([prepared[i].center[0] - prepared[i].diff_origin[0] for i in rows])
    yc = np.array([prepared[i].center[1] - prepared[i].diff_origin[1] for i in rows])
    fit = fit_stamps(
        data, var, model="moffat", x_init=xc, y_init=yc, fixed={"alpha": alpha[rows]},
        method=cfg.method, dtype=cfg.dtype, max_shift=cfg.max_shift, max_iter=cfg.max_iter,
    )
    f, fe = np.asarray(fit["fwhm"], float), np.asarray(fit["fwhm_err"], float)
    with np.errstate(invalid="ignore"):
        measured = (
            ((np.asarray(fit["flags"]) & _STAR_BAD) == 0)
            & (f >= cfg.fwhm_range[0]) & (f <= cfg.fwhm_range[1]) & (fe / f <= 0.15)
        )
    for j, i in enumerate(rows):
        if source[i] == "difference":
            if np.isfinite(f[j]):
                fwhm[i] = f[j]
            flags[i] |= Flag.SHAPE_UNTRUSTED
        elif not (measured[j] and abs(f[j] - fwhm[i]) <= 3.0 * fe[j]):
            flags[i] |= Flag.SHAPE_UNTRUSTED


def _refit_fwhm(refit, prepared, alpha, fwhm, source, nstars, cfg):
    """Fit the fwhm of the stars of ``refit`` alerts with alpha held fixed (at low S/N a
    free alpha makes the free-shape fit fail or wander; one shape parameter does not)."""
    rows = [(i, k) for i in refit for k in range(len(prepared[i].stars))]
    data, var, mask, origin = (np.array([prepared[i].stars[k][j] for i, k in rows]) for j in range(4))
    xi = np.array([prepared[i].stars[k][4] for i, k in rows])
    yi = np.array([prepared[i].stars[k][5] for i, k in rows])
    which = np.array([i for i, _ in rows])
    fit = fit_stamps(
        data, var, model="moffat", mask=mask, origin=origin.astype(float), x_init=xi, y_init=yi,
        fixed={"alpha": alpha[which]}, method=cfg.method, dtype=cfg.dtype, max_shift=2.0,
    )
    f = np.asarray(fit["fwhm"])
    # SHAPE_LIMIT may come from the fixed alpha at its cap: the fwhm range is checked here
    ok = (
        ((np.asarray(fit["flags"]) & _STAR_BAD) == 0)
        & np.isfinite(np.asarray(fit["fwhm_err"]))
        & (f >= cfg.fwhm_range[0]) & (f <= cfg.fwhm_range[1])
    )
    for i in refit:
        m = ok & (which == i)
        if m.any():
            fwhm[i] = _weighted_median(np.asarray(fit["fwhm"])[m], 1.0 / np.maximum(np.asarray(fit["fwhm_err"])[m], 1e-3) ** 2)
            source[i], nstars[i] = "local_fwhm", int(m.sum())


# --------------------------------------------------------------------------------------
# the forced fit on the difference
# --------------------------------------------------------------------------------------
def _forced_fit(prepared, fwhm, alpha, source, cfg):
    """Fit every measurable alert's difference stamp; returns a fit table per alert (or None)."""
    n = len(prepared)
    out = [None] * n
    fixed_rows = [i for i in range(n) if not prepared[i].flags & Flag.NO_DATA and np.isfinite(fwhm[i])]
    # a candidate whose own fwhm could not be fitted either: shape and flux free
    free_rows = [i for i in range(n) if not prepared[i].flags & Flag.NO_DATA and not np.isfinite(fwhm[i])]
    for rows, fixed in ((fixed_rows, True), (free_rows, False)):
        if not rows:
            continue
        data = np.array([prepared[i].diff for i in rows])
        var = np.array([prepared[i].diff_var for i in rows])
        origin = np.array([prepared[i].diff_origin for i in rows], float)
        xc = np.array([prepared[i].center[0] for i in rows])
        yc = np.array([prepared[i].center[1] for i in rows])
        fix = {"fwhm": fwhm[rows], "alpha": alpha[rows]} if fixed else {}
        pos = {"x_init": xc, "y_init": yc}
        if not cfg.fit_position:
            fix, pos = {**fix, "x": xc, "y": yc}, {}
        fit = fit_stamps(
            data, var, model="moffat", origin=origin, method=cfg.method, dtype=cfg.dtype,
            max_shift=cfg.max_shift, max_iter=cfg.max_iter, fixed=fix or None, **pos,
        )
        for j, i in enumerate(rows):
            out[i] = fit[j]
    return out


def _masked_near(p, x, y, fwhm, cfg):
    """Masked (NaN) pixels of the difference stamp within mask_radius FWHM of (x, y)."""
    bad = ~(np.isfinite(p.diff) & np.isfinite(p.diff_var))
    if not bad.any():
        return False
    ox, oy = p.diff_origin
    yy, xx = np.mgrid[oy : oy + bad.shape[0], ox : ox + bad.shape[1]]
    r = cfg.mask_radius * (fwhm if np.isfinite(fwhm) else 3.0)
    return bool((bad & (np.hypot(xx - x, yy - y) <= r)).any())


def measure_alerts(alerts, *, config=None, groups=None, gain=None, progress=False):
    """PSF photometry of every alert's candidate; one row per alert, in input order.

    Parameters
    ----------
    alerts : list of :class:`ztfpsf.io.alerts.Alert`
    config : :class:`AlertPSFConfig`, optional
    groups : dict, optional
        Group shapes from :func:`psf_groups` computed over a larger set of alerts (e.g.
        every file of a night); default: from these alerts' own stars.
    gain : float, optional
        e-/ADU for the sources' Poisson noise; overrides ``config.gain`` (ZTF: 6.2).

    Returns
    -------
    astropy.table.Table
        :data:`RESULT_COLUMNS` then the pipeline's :data:`PIPELINE_COLUMNS` (``fwhm`` as
        ``fwhm_ztf``), ``source`` and ``problem``. ``x, y`` are 0-based difference-cutout
        pixels. Alerts that cannot be measured are NaN rows with ``NO_DATA`` (the reason
        in ``problem``); nothing is raised for a bad alert.
    """
    cfg = config or AlertPSFConfig()
    if gain is not None:
        cfg = dataclasses.replace(cfg, gain=float(gain))
    alerts = list(alerts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        prepared = [_prepare(i, a, cfg) for i, a in enumerate(alerts)]
        stars = fit_psf_stars(alerts, cfg, _prepared=prepared)
        if groups is None:
            groups = psf_groups(stars, cfg)
        fwhm, alpha, source, nstars, shape_flags = _choose_psfs(alerts, prepared, stars, groups, cfg)
        fits = _forced_fit(prepared, fwhm, alpha, source, cfg)
    return _result_table(alerts, prepared, fits, fwhm, alpha, source, nstars, shape_flags, cfg)


def _result_table(alerts, prepared, fits, fwhm, alpha, source, nstars, shape_flags, cfg):
    n = len(alerts)
    col = {c: np.full(n, np.nan) for c in ("flux", "flux_err", "mag", "mag_err", "x", "y", "background", "fwhm", "alpha", "chi2")}
    dof = np.zeros(n, np.int32)
    flags = np.zeros(n, np.int64)
    for i, (p, fit) in enumerate(zip(prepared, fits)):
        flags[i] = p.flags | shape_flags[i]
        if fit is None:
            flags[i] |= Flag.NO_DATA
            continue
        ff = int(fit["flags"]) & ~Flag.MASKED_PIXELS
        flags[i] |= ff
        for c in ("flux", "flux_err", "x", "y", "background", "chi2", "fwhm", "alpha"):
            col[c][i] = fit[c]
        dof[i] = fit["dof"]
        if _masked_near(p, col["x"][i] if np.isfinite(col["x"][i]) else p.center[0],
                        col["y"][i] if np.isfinite(col["y"][i]) else p.center[1], col["fwhm"][i], cfg):
            flags[i] |= Flag.MASKED_PIXELS
        if ff & BAD:
            continue
        snr = col["flux"][i] / col["flux_err"][i]
        red = col["chi2"][i] / max(dof[i], 1)
        if red > cfg.max_chi2 * (1.0 + (snr / cfg.chi2_snr_scale) ** 2):
            flags[i] |= Flag.POOR_FIT
        if col["flux"][i] > 0:
            zp = alerts[i].candidate["magzpsci"]
            col["mag"][i] = zp - 2.5 * np.log10(col["flux"][i])
            col["mag_err"][i] = 2.5 / np.log(10.0) * col["flux_err"][i] / col["flux"][i]
        else:
            flags[i] |= Flag.NO_SOURCE  # not positive on the difference: no magnitude
    t = Table()
    t["objectId"] = np.array([a.objectId for a in alerts], dtype=str) if n else np.zeros(0, str)
    t["candid"] = np.array([a.candid for a in alerts], dtype=np.int64)
    for c in ("flux", "flux_err", "mag", "mag_err", "x", "y", "background", "fwhm", "alpha", "chi2"):
        t[c] = col[c]
    t["dof"] = dof
    t["flags"] = flags.astype(np.int32)
    t["psf_source"] = np.array(source, dtype=str) if n else np.zeros(0, str)
    t["n_psf_stars"] = nstars.astype(np.int32)
    for c in PIPELINE_COLUMNS:
        t[c] = _pipeline_column(alerts, c)
    t["fwhm_ztf"] = _pipeline_column(alerts, "fwhm")
    t["source"] = np.array([a.source for a in alerts], dtype=str) if n else np.zeros(0, str)
    t["problem"] = np.array(["; ".join(filter(None, [p.problem] + list(a.problems))) for p, a in zip(prepared, alerts)], dtype=str) if n else np.zeros(0, str)
    for c in ("flux", "flux_err", "background"):
        t[c].unit = "DN"
    for c in ("mag", "mag_err"):
        t[c].unit = "mag"
    for c in ("x", "y", "fwhm"):
        t[c].unit = "pix"
    t.meta.update(
        gain=cfg.gain,
        model="moffat",
        psf="shape from the science cutout's stars (psf_source), held fixed on the difference cutout",
        noise="sky_var (1.4826 MAD of the difference cutout) + S/gain + T/(gain*nframesref)",
        coordinates="x, y: 0-based pixels of the difference cutout",
        mag="magzpsci - 2.5 log10(flux)",
    )
    return t


def _pipeline_column(alerts, key):
    vals = [a.candidate.get(key) for a in alerts]
    if key == "isdiffpos":
        return np.array(["" if v is None else str(v) for v in vals], dtype=str) if vals else np.zeros(0, str)
    if key in ("fid", "nid", "field", "rcid", "pid", "nframesref"):
        return np.array([-1 if v is None else int(v) for v in vals], dtype=np.int64)
    return np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)


# --------------------------------------------------------------------------------------
# checks against the pipeline and of the uncertainties
# --------------------------------------------------------------------------------------
def robust_std(values):
    """1.4826 x the median absolute deviation of the finite values (NaN if none)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.nan
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def compare_with_pipeline(table, *, rb_min=0.5, bins=(-np.inf, 16.0, 18.0, 19.5)):
    """Agreement of ``mag`` with the pipeline's ``magpsf``, as an astropy Table.

    One row for all alerts with ``rb >= rb_min`` and one per ``magpsf`` bin, then the
    same for ``rb < rb_min``: ``n`` alerts, ``n_measured`` (flags == 0) and their
    fraction, the median and robust std of ``mag - magpsf`` over the measured ones, the
    robust std of ``(mag - magpsf) / sqrt(mag_err**2 + sigmapsf**2)``, the robust std of
    the pipeline's own ``magap - magpsf`` (all alerts of the row) and the median
    ``mag_err / sigmapsf``.
    """
    rb = np.asarray(table["rb"], float)
    magpsf = np.asarray(table["magpsf"], float)
    d = np.asarray(table["mag"], float) - magpsf
    nd = d / np.hypot(np.asarray(table["mag_err"], float), np.asarray(table["sigmapsf"], float))
    dap = np.asarray(table["magap"], float) - magpsf
    ratio = np.asarray(table["mag_err"], float) / np.asarray(table["sigmapsf"], float)
    ok = np.asarray(table["flags"]) == 0
    rows = []
    for label, sel in ((f"rb >= {rb_min}", rb >= rb_min), (f"rb < {rb_min}", ~(rb >= rb_min))):
        groups = [("all", sel)]
        for lo, hi in zip(bins[:-1], bins[1:]):
            name = f"magpsf < {hi:g}" if not np.isfinite(lo) else f"{lo:g}-{hi:g}"
            groups.append((name, sel & (magpsf >= lo) & (magpsf < hi)))
        for name, m in groups:
            mm = m & ok
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                rows.append((
                    label, name, int(m.sum()), int(mm.sum()), mm.sum() / max(m.sum(), 1),
                    float(np.nanmedian(d[mm])) if mm.any() else np.nan, robust_std(d[mm]),
                    robust_std(nd[mm]), robust_std(dap[m]),
                    float(np.nanmedian(ratio[mm])) if mm.any() else np.nan,
                ))
    names = ("sample", "bin", "n", "n_measured", "frac_measured", "median_dmag", "rstd_dmag", "rstd_pull", "rstd_magap", "median_err_ratio")
    return Table(rows=rows, names=names)


def blank_sky_pulls(alerts, table, *, n_per_alert=8, seed=0, config=None):
    """Pulls ``flux / flux_err`` of forced PSF fits at empty places of the difference
    cutouts, with each alert's own PSF and noise model: a check of ``flux_err`` (their
    spread is 1 when the uncertainties are right; ZTF's sigmapsf is not needed).

    Places are drawn at random at least ``stamp_size/2`` px inside the cutout, 3 FWHM
    from the candidate and 2 FWHM from any source of the science cutout. Returns
    ``(pulls, alert_index)`` arrays.
    """
    cfg = config or AlertPSFConfig()
    rng = np.random.default_rng(seed)
    h = cfg.stamp_size // 2
    data, var, xs, ys, fw, al, idx = [], [], [], [], [], [], []
    for i, (alert, row) in enumerate(zip(alerts, table)):
        if (int(row["flags"]) & BAD) or not np.isfinite(row["fwhm"]) or _cutout_problem(alert):
            continue
        diff = np.asarray(alert.difference, float)
        _, sig = _robust_sky(diff)
        full_var = sig**2 + _source_terms(alert, cfg)
        cols, rows_, _ = find_stars(np.asarray(alert.science, float), cfg.detect_snr) if alert.science is not None else ([], [], [])
        xc, yc = candidate_center(alert.candidate, diff.shape)
        ny, nx = diff.shape
        for _ in range(10 * n_per_alert):
            if sum(1 for k in idx if k == i) >= n_per_alert or nx <= 2 * h + 1 or ny <= 2 * h + 1:
                break
            x, y = rng.uniform(h, nx - 1 - h), rng.uniform(h, ny - 1 - h)
            if np.hypot(x - xc, y - yc) < 3 * row["fwhm"]:
                continue
            if len(cols) and np.min(np.hypot(np.asarray(cols) - x, np.asarray(rows_) - y)) < 2 * row["fwhm"] + 2:
                continue
            d, (ox, oy) = _cut(diff, x, y, cfg.stamp_size)
            v, _ = _cut(full_var, x, y, cfg.stamp_size)
            data.append(d), var.append(v), xs.append(x - ox), ys.append(y - oy)
            fw.append(row["fwhm"]), al.append(row["alpha"]), idx.append(i)
    if not data:
        return np.zeros(0), np.zeros(0, int)
    fit = fit_stamps(
        np.array(data), np.array(var), model="moffat", method=cfg.method, dtype=cfg.dtype,
        fixed={"fwhm": np.array(fw), "alpha": np.array(al), "x": np.array(xs), "y": np.array(ys)},
    )
    pulls = np.asarray(fit["flux"], float) / np.asarray(fit["flux_err"], float)
    good = np.isfinite(pulls)  # a place on masked pixels has no fit
    return pulls[good], np.asarray(idx)[good]
