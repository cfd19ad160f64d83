"""Fit quality over all stars: mean normalised residual stamps, chi2/dof histogram, and
magnitude residuals against the catalogue.

The mean residual of all stars shows a model mismatch that single stars hide in their
noise (e.g. a ring when the wings are wrong). :func:`compute_residuals` returns the values
(no matplotlib); :func:`plot_residuals` draws them.
"""

import warnings

import numpy as np

from . import _style
from ._data import chi2_per_dof, fitted_rows, noise_sigma, stamps_and_models

__all__ = ["compute_residuals", "plot_residuals", "chi2_bins"]

#: 1.0857 = 2.5 / ln(10): magnitude error from a relative flux error.
_MAG_PER_RELFLUX = 2.5 / np.log(10.0)


def chi2_bins(values, n=40):
    """Log-spaced histogram edges covering every finite positive chi2/dof (and 0.3-3 at least)."""
    v = values[np.isfinite(values) & (values > 0)]
    lo = min(0.3, float(v.min())) if v.size else 0.3
    hi = max(3.0, float(v.max())) if v.size else 3.0
    return np.geomspace(lo, hi * (1 + 1e-9), n + 1)


def _stack(table, image, mask, psf=None):
    """Mean over fitted stars of (data - model) / flux and of (data - model) / sigma."""
    rows = np.nonzero(fitted_rows(table) & np.isfinite(np.asarray(table["fwhm"], float)))[0]
    if rows.size == 0:
        return None, None, 0
    sub = table[rows]
    _, data, model = stamps_and_models(sub, image, mask, psf)
    resid = data - model
    sigma, _ = noise_sigma(model, resid, table.meta, sub["read_noise"] if "read_noise" in sub.colnames else None)
    flux = np.asarray(sub["flux"], float)[:, None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        by_flux = np.nanmean(resid / flux, axis=0)
        by_sigma = np.nanmean(resid / sigma, axis=0)
    return by_flux, by_sigma, int(rows.size)


def _mag_residuals(table):
    """Fitted magnitude minus catalogue ``mag``, median offset removed, with errors."""
    if "mag" not in table.colnames:
        return None
    ok = fitted_rows(table)
    flux = np.asarray(table["flux"], float)
    err = np.asarray(table["flux_err"], float) if "flux_err" in table.colnames else np.full(len(table), np.nan)
    mag = np.asarray(table["mag"], float)
    zp = table.meta.get("zeropoint")
    with np.errstate(invalid="ignore", divide="ignore"):
        fit_mag = (zp or 0.0) - 2.5 * np.log10(flux)
        dmag_err = _MAG_PER_RELFLUX * err / flux
    ok &= np.isfinite(fit_mag) & np.isfinite(mag)
    if not ok.any():
        return None
    dmag = fit_mag - mag
    offset = float(np.median(dmag[ok]))
    flags = np.asarray(table["flags"], np.int64)
    return {
        "row": np.nonzero(ok)[0],
        "mag": mag[ok],
        "dmag": dmag[ok] - offset,
        "dmag_err": dmag_err[ok],
        "offset": offset,
        "flagged": flags[ok] != 0,
        "zeropoint": zp,
    }


def compute_residuals(table, image=None, mask=None, bins=None, psf=None):
    """Values of the residuals figure.

    ``mean_by_flux`` / ``mean_by_sigma``: mean over fitted stars of ``(data - model) /
    flux`` and ``(data - model) / sigma`` on the stamp grid (None without an image);
    ``n_stacked``; ``chi2_dof`` (every finite value of the table), ``hist_counts`` and
    ``hist_edges`` (``np.histogram`` of it); ``mag`` (or None without a ``mag`` column):
    catalogue magnitude, fitted minus catalogue magnitude with the median offset
    removed, its error and the offset.
    """
    rchi2 = chi2_per_dof(table)
    rchi2 = rchi2[np.isfinite(rchi2)]
    edges = chi2_bins(rchi2) if bins is None else np.asarray(bins, float)
    counts, edges = np.histogram(rchi2, bins=edges)
    by_flux = by_sigma = None
    n = 0
    if image is not None:
        by_flux, by_sigma, n = _stack(table, image, mask, psf)
    return {
        "mean_by_flux": by_flux,
        "mean_by_sigma": by_sigma,
        "n_stacked": n,
        "chi2_dof": rchi2,
        "hist_counts": counts,
        "hist_edges": edges,
        "mag": _mag_residuals(table),
    }


def _binned_median(x, y, nbins=8):
    edges = np.quantile(x, np.linspace(0, 1, nbins + 1))
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, nbins - 1)
    centres, medians = [], []
    for k in range(nbins):
        sel = idx == k
        if sel.sum() >= 3:
            centres.append(np.median(x[sel]))
            medians.append(np.median(y[sel]))
    return np.array(centres), np.array(medians)


def plot_residuals(values, path=None):
    """Draw :func:`compute_residuals` values; save when ``path`` is given. Returns the Figure."""
    from matplotlib.colors import Normalize
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    fig = _style.new_figure("residuals")
    axes = fig.subplots(1, 4, width_ratios=[1, 1, 1.2, 1.4])
    n = values["n_stacked"]
    for ax, key, title, scale, unit in (
        (axes[0], "mean_by_flux", "mean (data - model) / flux", 100.0, "% of flux"),
        (axes[1], "mean_by_sigma", "mean (data - model) / sigma", 1.0, "sigma"),
    ):
        arr = values[key]
        if arr is None:
            _style.note(ax, "no image: residual stamps not drawn")
            continue
        a = arr * scale
        lim = float(np.nanmax(np.abs(a))) if np.any(np.isfinite(a)) else 1.0
        im = ax.imshow(a, origin="lower", cmap=_style.CMAP_SIGNED, norm=Normalize(-lim, lim), interpolation="nearest")
        ax.set_title(f"{title}\n{n} stars", fontsize=10)
        ax.set_xlabel("stamp x [px]")
        ax.set_ylabel("stamp y [px]")
        fig.colorbar(im, ax=ax, shrink=0.85, label=unit)
    ax = axes[2]
    if values["chi2_dof"].size:
        ax.stairs(values["hist_counts"], values["hist_edges"], fill=True, alpha=0.6, color="tab:blue")
        med = float(np.median(values["chi2_dof"]))
        ax.axvline(med, color="k", ls="--", lw=1, label=f"median {med:.3g}")
        ax.axvline(1.0, color="tab:green", lw=1, label="1")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("chi2 / dof")
        ax.set_ylabel("stars")
        ax.set_title(f"chi2/dof of {values['chi2_dof'].size} fits", fontsize=10)
        ax.legend(fontsize=8)
    else:
        _style.note(ax, "no finite chi2/dof")
    ax = axes[3]
    m = values["mag"]
    if m is None:
        _style.note(ax, "no catalogue 'mag' column: no magnitude residuals")
    else:
        for sel, colour, label in ((~m["flagged"], "tab:blue", "flags = 0"), (m["flagged"], "tab:orange", "flagged")):
            if sel.any():
                ax.errorbar(m["mag"][sel], m["dmag"][sel], yerr=m["dmag_err"][sel], fmt="o", ms=3, lw=0.6,
                            color=colour, label=label)
        if m["mag"].size >= 24:
            cx, cy = _binned_median(m["mag"], m["dmag"])
            ax.plot(cx, cy, "k-", lw=1.5, label="binned median")
        ax.axhline(0.0, color="0.5", lw=0.8)
        lim = np.nanpercentile(np.abs(m["dmag"]), 98) * 1.5 if m["dmag"].size else 0.1
        ax.set_ylim(-max(lim, 0.02), max(lim, 0.02))
        ax.set_xlabel("catalogue mag")
        zp = "" if m["zeropoint"] is not None else ", no zero point"
        ax.set_ylabel("fit - catalogue - offset [mag]")
        ax.set_title(f"magnitude residuals (offset {m['offset']:+.3f} mag{zp})", fontsize=10)
        ax.legend(fontsize=8)
    if path is not None:
        _style.save(fig, path)
    return fig
