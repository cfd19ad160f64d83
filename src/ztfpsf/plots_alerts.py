"""Figures of the alert measurement against the ZTF pipeline (``ztfpsf alert`` tables).

Plain matplotlib ``Figure`` objects on the Agg canvas (no pyplot, no display); matplotlib
is imported inside the functions. Each function takes the result table of
:func:`ztfpsf.alerts.measure_batch` (or the Parquet file it was written to) and returns
the figure, saved to ``path`` when one is given.
"""

from pathlib import Path

import numpy as np

from .apcorr import robust_sigma

__all__ = ["plot_mag_comparison", "plot_fwhm_comparison"]

DPI = 100


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _table(table):
    if isinstance(table, (str, Path)):
        from astropy.table import Table

        return Table.read(table)
    return table


def _save(fig, path):
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    return fig


def _col(t, name):
    return np.asarray(t[name], dtype=float)


def _binned_rstd(x, y, edges):
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (x >= lo) & (x < hi) & np.isfinite(y)
        if m.sum() >= 3:
            out.append((lo, hi, robust_sigma(y[m])))
    return np.array(out).reshape(-1, 3)


def plot_mag_comparison(table, path=None, *, rb_min=0.5):
    """``mag`` against the pipeline's ``magpsf`` (left) and ``mag - magpsf`` with the
    pipeline's own ``magap - magpsf`` for comparison (right); the robust scatter of both
    in magnitude bins on the right panel."""
    t = _table(table)
    magpsf, mag = _col(t, "magpsf"), _col(t, "mag")
    err = np.hypot(_col(t, "mag_err"), _col(t, "sigmapsf"))
    real = _col(t, "rb") >= rb_min
    ok = np.asarray(t["flags"]) == 0
    groups = (
        (real & ok, f"rb >= {rb_min}, flags = 0", "C0", "o"),
        (real & ~ok, f"rb >= {rb_min}, flagged", "C3", "x"),
        (~real, f"rb < {rb_min} (any flags)", "0.6", "."),
    )
    fig = _figure((12.0, 5.0))
    ax1, ax2 = fig.subplots(1, 2)
    lo, hi = np.nanmin(magpsf) - 0.3, np.nanmax(magpsf) + 0.3
    ax1.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="1:1")
    for m, label, color, marker in groups:
        ax1.errorbar(magpsf[m], mag[m], yerr=_col(t, "mag_err")[m], xerr=_col(t, "sigmapsf")[m], fmt=marker, color=color, ms=4, lw=0.5, label=f"{label} ({int(m.sum())})")
    ax1.set(xlabel="ZTF magpsf [mag]", ylabel="ztfpsf mag = magzpsci - 2.5 log10(flux) [mag]", xlim=(lo, hi), ylim=(lo, hi))
    ax1.legend(loc="upper left", fontsize=8)
    ax1.set_title("PSF photometry of the candidates: ztfpsf vs ZTF")

    d = mag - magpsf
    ap = _col(t, "magap") - magpsf
    ax2.axhline(0.0, color="k", lw=0.8)
    ax2.plot(magpsf[real], ap[real], "s", color="0.75", ms=3, label="ZTF magap - magpsf (rb >= %g)" % rb_min)
    for m, label, color, marker in groups[:2]:
        ax2.errorbar(magpsf[m], d[m], yerr=err[m], fmt=marker, color=color, ms=4, lw=0.5, label=f"mag - magpsf, {label}")
    edges = np.array([lo, 16.0, 18.0, 19.5, hi])
    edges = edges[np.r_[True, np.diff(edges) > 0]]
    ours_b = _binned_rstd(magpsf[real & ok], d[real & ok], edges)
    ap_b = _binned_rstd(magpsf[real], ap[real], edges)
    ax2.hlines(ours_b[:, 2], ours_b[:, 0], ours_b[:, 1], color="C0", lw=2.5, label="robust std per bin, mag - magpsf")
    ax2.hlines(ap_b[:, 2], ap_b[:, 0], ap_b[:, 1], color="0.3", lw=2.0, ls="--", label="robust std per bin, magap - magpsf")
    ax2.set(xlabel="ZTF magpsf [mag]", ylabel="magnitude difference [mag]", ylim=(-0.6, 0.6))
    med = np.nanmedian(d[real & ok]) if (real & ok).any() else np.nan
    ax2.set_title(f"median mag - magpsf = {med:+.3f} (rb >= {rb_min}, flags = 0)")
    ax2.legend(loc="lower left", fontsize=7)
    return _save(fig, path)


def plot_fwhm_comparison(table, path=None, *, rb_min=0.5):
    """Our PSF ``fwhm`` (Moffat, from the science cutout's stars) against the pipeline's
    candidate ``fwhm`` (SExtractor Gaussian core, column ``fwhm_ztf``), by ``psf_source``,
    and their ratio against magpsf."""
    t = _table(table)
    ours, ztf, magpsf = _col(t, "fwhm"), _col(t, "fwhm_ztf"), _col(t, "magpsf")
    source = np.asarray(t["psf_source"]).astype(str)
    real = _col(t, "rb") >= rb_min
    fig = _figure((12.0, 5.0))
    ax1, ax2 = fig.subplots(1, 2)
    top = np.nanmax(np.r_[ours, ztf]) * 1.05 if np.isfinite(np.r_[ours, ztf]).any() else 8.0
    ax1.plot([0, top], [0, top], "k-", lw=0.8, label="1:1")
    for k, src in enumerate(sorted(set(source))):
        m = source == src
        ax1.plot(ztf[m & real], ours[m & real], "o", color=f"C{k}", ms=4, label=f"{src}, rb >= {rb_min} ({int((m & real).sum())})")
        ax1.plot(ztf[m & ~real], ours[m & ~real], "x", color=f"C{k}", ms=4)
        ax2.plot(magpsf[m], ours[m] / ztf[m], "o", color=f"C{k}", ms=3, label=src)
    ax1.set(xlabel="ZTF fwhm of the candidate (SExtractor) [px]", ylabel="ztfpsf PSF fwhm (Moffat, science stars) [px]", xlim=(0, top), ylim=(0, top))
    ax1.legend(loc="upper left", fontsize=8, title="psf_source (x: rb < %g)" % rb_min, title_fontsize=8)
    ax1.set_title("PSF FWHM: ztfpsf vs the pipeline's candidate fwhm")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set(xlabel="ZTF magpsf [mag]", ylabel="fwhm / fwhm_ztf", yscale="log")
    ratio = ours / ztf
    ax2.set_title(f"median ratio {np.nanmedian(ratio[real]):.2f} (rb >= {rb_min})")
    ax2.legend(fontsize=8)
    return _save(fig, path)
