"""Brighter-fatter: the stars' size and PSF - aperture magnitude against their flux.

:func:`compute_brighter_fatter` takes the points and fitted lines of
:mod:`ztfpsf.psf.brighter_fatter` (no matplotlib): the size of each star over the PSF's
(``ln_size`` of the run's table, else each star's free-fit fwhm) against log10 flux, and,
with the image and the PSF, PSF minus ``flux_radius`` aperture magnitude against the
magnitude; :func:`plot_brighter_fatter` draws them with binned medians and the fits.
"""

import numpy as np

from . import _style

__all__ = ["compute_brighter_fatter", "plot_brighter_fatter"]


def _binned(x, y, n_bins=8):
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2 * n_bins:
        return np.zeros(0), np.zeros(0)
    edges = np.quantile(x[ok], np.linspace(0, 1, n_bins + 1))
    which = np.clip(np.searchsorted(edges, x[ok], side="right") - 1, 0, n_bins - 1)
    xs = np.array([np.median(x[ok][which == b]) for b in range(n_bins)])
    ys = np.array([np.median(y[ok][which == b]) for b in range(n_bins)])
    return xs, ys


def compute_brighter_fatter(table, psf=None, image=None, mask=None):
    """Values of the figure: ``size`` and (with ``image`` and ``psf``) ``apcorr``, each a
    dict of points ``x, y``, binned medians ``bx, by`` and the line ``fit``
    (:func:`ztfpsf.psf.brighter_fatter.robust_line`); ``measure`` (size), ``law`` (the
    PSF's slope, or None), ``title``. Zero point and gain from the table's metadata, the
    sky noise from its ``read_noise`` column when present."""
    from ..psf import brighter_fatter as bf

    x, y, err, measure = bf.size_points(table, psf)
    out = dict(measure=measure, law=None, apcorr=None,
               size=dict(x=x, y=y, fit=bf.robust_line(x, y, err), bx=None, by=None))
    out["size"]["bx"], out["size"]["by"] = _binned(x, y)
    if psf is not None and getattr(psf, "flux_dependent", False):
        out["law"] = dict(slope=psf.bf_slope, slope_err=psf.bf_slope_err, flux_ref=psf.bf_ref)
    if image is not None and psf is not None and psf.flux_radius > 0:
        meta = table.meta
        rn = np.asarray(table["read_noise"], np.float64) if "read_noise" in table.colnames else meta.get("read_noise")
        mag, diff, err, mrange = bf.aperture_points(image, table, psf.flux_radius, mask=mask, zeropoint=meta.get("zeropoint"),
                                                    gain=meta.get("gain"), read_noise=rn)
        out["apcorr"] = dict(x=mag, y=diff, fit=bf.robust_line(mag, diff, err), radius=psf.flux_radius, range=mrange)
        out["apcorr"]["bx"], out["apcorr"]["by"] = _binned(mag, diff)
    out["title"] = "brighter-fatter: " + ("flux-dependent PSF, b = {:+.3%} per decade".format(psf.bf_slope)
                                          if out["law"] else "flux-independent PSF")
    return out


def _line(ax, fit, xs, scale, label):
    if fit.get("slope") is None:
        return
    xs = np.array([np.nanmin(xs), np.nanmax(xs)])
    ax.plot(xs, scale * (fit["intercept"] + fit["slope"] * (xs - fit["x0"])), color="C3", lw=2, label=label)
    ax.legend(loc="best", fontsize="small")


def plot_brighter_fatter(values, path=None):
    """Draw :func:`compute_brighter_fatter`'s values: size and PSF - aperture against flux."""
    fig = _style.new_figure("brighter_fatter")
    axes = fig.subplots(1, 2)
    ax, s = axes[0], values["size"]
    ok = np.isfinite(s["x"]) & np.isfinite(s["y"])
    if ok.any():
        ax.plot(s["x"][ok], 100 * s["y"][ok], ".", ms=3, alpha=0.4, color="C0")
        ax.plot(s["bx"], 100 * s["by"], "o", color="k", label="binned median")
        f = s["fit"]
        _line(ax, f, s["x"][ok], 100.0, f"slope {100 * f['slope']:+.2f} ± {100 * f['slope_err']:.2f} % per decade"
              if f.get("slope") is not None else "")
        lo, hi = np.nanpercentile(100 * s["y"][ok], [2, 98])
        ax.set_ylim(lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo))
    else:
        _style.note(ax, "no star to measure the size on")
    ax.set_xlabel("log10 flux [ADU]")
    ax.set_ylabel(f"star size / PSF size - 1 [%] ({values['measure']})")
    ax.set_title("size against flux")
    ax = axes[1]
    a = values["apcorr"]
    if a is not None and np.isfinite(a["y"]).any():
        ok = np.isfinite(a["x"]) & np.isfinite(a["y"])
        ax.plot(a["x"][ok], 1e3 * a["y"][ok], ".", ms=3, alpha=0.4, color="C0")
        ax.plot(a["bx"], 1e3 * a["by"], "o", color="k", label="binned median")
        f = a["fit"]
        _line(ax, f, a["x"][ok], 1e3, f"slope {1e3 * f['slope']:+.2f} ± {1e3 * f['slope_err']:.2f} mmag/mag"
              if f.get("slope") is not None else "")
        lo, hi = np.nanpercentile(1e3 * a["y"][ok], [2, 98])
        ax.set_ylim(lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo))
        ax.set_xlabel("PSF magnitude")
        ax.set_ylabel(f"PSF - {2 * a['radius']:g} px aperture [mmag]")
    else:
        _style.note(ax, "PSF - aperture needs the image and a PSF model")
    ax.set_title("PSF - aperture magnitude against magnitude")
    fig.suptitle(values["title"])
    return _style.save(fig, path) if path is not None else fig
