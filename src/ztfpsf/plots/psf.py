"""The PSF model itself: its stamp, its residual surface and the reserve stars by S/N.

:func:`compute_psf` evaluates a :class:`~ztfpsf.psf.PSFModel` (no matplotlib): the unit-flux
stamp at the image centre, and for a hybrid PSF its residual surface there on a fine grid
(in % of the stamp's peak) and at the four corners of the stars' region (how it varies);
the reserve stars' chi2/dof per S/N bin comes from the run's summary. :func:`plot_psf`
draws them.
"""

import numpy as np

from . import _style

__all__ = ["compute_psf", "plot_psf"]


def _surface(psf, x, y, t, flux=None):
    """The residual surface (no pixel integral) on the grid ``t x t`` around (x, y), of a
    star of ``flux`` (None: the reference flux of a surface with a flux term)."""
    import jax.numpy as jnp

    f = None if flux is None else np.array([flux])
    nodes = psf.residual_nodes(np.array([x]), np.array([y]), flux=f)[0].reshape(psf.grid.n, psf.grid.n)
    b = np.asarray(psf.grid.point_basis(jnp.asarray(t)))
    return b @ nodes @ b.T


def compute_psf(psf, reserve_by_snr=None, step=0.125):
    """Values of the PSF figure: ``stamp`` (17x17 at the centre of the image), ``surface``
    (hybrid: residual surface in % of the stamp's peak, ``extent`` in px) and ``corners``
    (the surface at the corners of the region minus at the centre, max |.| in %),
    ``flux_change`` (a surface with a flux term: at the bright end of its flux range minus
    at the faint end, in %, and ``flux_range`` in log10 flux), ``reserve`` (S/N bin ->
    chi2/dof, n), ``title``."""
    xmin, xmax, ymin, ymax = psf.bounds
    xc, yc = 0.5 * (xmin + xmax), 0.5 * (ymin + ymax)
    stamp = psf.stamp(xc, yc, shape=(17, 17))
    out = dict(stamp=stamp, surface=None, corners=None, extent=None, flux_change=None, flux_range=None, reserve=reserve_by_snr or {},
               title=f"{psf.model.name}{' + residual surface' if psf.residual is not None else ''}, "
                     f"{psf.mode} (degree {psf.degree}), flux within {psf.flux_radius:g} px")
    if psf.residual is not None:
        half = psf.grid.radius + 1.0
        t = np.arange(-half, half + step / 2, step)
        peak = np.max(stamp)
        out["surface"] = 100.0 * _surface(psf, xc, yc, t) / peak
        out["extent"] = (t[0], t[-1], t[0], t[-1])
        box = psf.support if psf.support is not None else np.array([[xmin, ymin], [xmax, ymax]])
        lo, hi = box.min(axis=0), box.max(axis=0)
        out["corners"] = max(float(np.max(np.abs(100.0 * _surface(psf, cx, cy, t) / peak - out["surface"])))
                             for cx in (lo[0], hi[0]) for cy in (lo[1], hi[1]))
        if psf.residual_flux:
            lg_lo, lg_hi = psf.bf_range
            out["flux_change"] = 100.0 * (_surface(psf, xc, yc, t, 10**lg_hi) - _surface(psf, xc, yc, t, 10**lg_lo)) / peak
            out["flux_range"] = (float(lg_lo), float(lg_hi))
    return out


def plot_psf(values, path=None):
    """Draw :func:`compute_psf`'s values: the stamp (log scale), the surface, the table."""
    flux = values.get("flux_change") is not None
    fig = _style.new_figure("psf_flux" if flux else "psf")
    axes = fig.subplots(1, 4 if flux else 3)
    ax = axes[0]
    im = ax.imshow(np.log10(np.maximum(values["stamp"], 1e-6)), origin="lower", cmap=_style.CMAP)
    fig.colorbar(im, ax=ax, label="log10 fraction of the flux per pixel")
    ax.set_title("PSF at the image centre (17x17)")
    ax = axes[1]
    if values["surface"] is not None:
        lim = float(np.max(np.abs(values["surface"]))) or 1.0
        im = ax.imshow(values["surface"], origin="lower", cmap=_style.CMAP_SIGNED, vmin=-lim, vmax=lim,
                       extent=values["extent"])
        fig.colorbar(im, ax=ax, label="% of the PSF's peak pixel")
        ax.set_xlabel("x offset [px]")
        ax.set_ylabel("y offset [px]")
        ax.set_title(f"residual surface (corners: up to {values['corners']:.2g} %)")
    else:
        _style.note(ax, "analytic PSF: no residual surface")
    if flux:
        ax = axes[2]
        lim = float(np.max(np.abs(values["flux_change"]))) or 1.0
        im = ax.imshow(values["flux_change"], origin="lower", cmap=_style.CMAP_SIGNED, vmin=-lim, vmax=lim,
                       extent=values["extent"])
        fig.colorbar(im, ax=ax, label="% of the PSF's peak pixel")
        ax.set_xlabel("x offset [px]")
        lo, hi = values["flux_range"]
        ax.set_title(f"bright minus faint (log10 flux {hi:.1f} - {lo:.1f})")
    ax = axes[-1]
    ax.set_axis_off()
    rows = [(k, "–" if v.get("chi2_dof") is None else f"{v['chi2_dof']:.3f}", str(v.get("n", 0)))
            for k, v in values["reserve"].items()]
    if rows:
        table = ax.table(cellText=rows, colLabels=("S/N", "reserve chi2/dof", "stars"), loc="center")
        table.scale(1.0, 1.6)
        ax.set_title("reserve stars (PSF fixed)")
    else:
        _style.note(ax, "no reserve statistics")
    fig.suptitle(values["title"])
    return _style.save(fig, path) if path is not None else fig
