"""Loss curves of a fit, log-log: the total chi2 of all stars and a sample of single stars.

A history is the per-star chi2 at every iteration, ``(N, n_iter)``, as recorded by
``fit_stamps(..., return_history=True)`` (``table.meta['loss_history']``) or saved as
``<stem>.history.npy``; it is NaN after a star's (or its chunk's) loop ended, and for
stars that were never fitted. With the reweighted noise model the two passes follow each
other, the gap between them being all NaN.
"""

import numpy as np

from . import _style

__all__ = ["total_loss", "compute_loss", "plot_loss"]


def _carry_forward(hist):
    """Each star's last finite value carried over its trailing NaN (its loss after it stopped)."""
    out = hist.copy()
    for k in range(1, out.shape[1]):
        col = out[:, k]
        gap = ~np.isfinite(col)
        col[gap] = out[gap, k - 1]
    return out


def total_loss(history):
    """Total loss per iteration: the sum over stars of each star's current chi2.

    A star that has stopped keeps its final chi2 (carried forward), so the total does not
    drop when one chunk of stars ends before another. Iterations where no star has a
    value (after every loop ended, or between the two passes) are NaN; stars with no
    finite value at all are left out.
    """
    hist = np.asarray(history, dtype=np.float64)
    if hist.ndim != 2:
        raise ValueError(f"loss history must be (stars, iterations); got shape {hist.shape}")
    finite = np.isfinite(hist)
    hist = hist[finite.any(axis=1)]
    if hist.size == 0:
        return np.full(finite.shape[1], np.nan)
    filled = _carry_forward(hist)
    total = np.nansum(filled, axis=0)
    total[~np.isfinite(hist).any(axis=0)] = np.nan
    return total


def compute_loss(histories, dof=None, n_stars=20):
    """Values of the loss figure.

    ``histories``: one ``(N, n_iter)`` array, or ``{label: array}`` to compare fits
    (e.g. methods). ``dof`` (N,): per-star degrees of freedom, to show single stars as
    chi2/dof. Returns ``{"total": {label: (n_iter,)}, "stars": {label: (rows, curves)}}``
    with up to ``n_stars`` stars per fit, spread evenly over the ranks of their final loss.
    """
    if not isinstance(histories, dict):
        histories = {"fit": histories}
    total, stars = {}, {}
    for label, hist in histories.items():
        hist = np.asarray(hist, dtype=np.float64)
        total[label] = total_loss(hist)
        filled = _carry_forward(hist)
        last = filled[:, -1]
        ok = np.nonzero(np.isfinite(last))[0]
        if ok.size:
            ranked = ok[np.argsort(last[ok], kind="stable")]
            rows = ranked[np.unique(np.linspace(0, ranked.size - 1, min(n_stars, ranked.size)).round().astype(int))]
        else:
            rows = ok
        curves = hist[rows]
        if dof is not None:
            d = np.asarray(dof, dtype=np.float64)[rows]
            with np.errstate(divide="ignore", invalid="ignore"):
                curves = curves / np.where(d > 0, d, np.nan)[:, None]
        stars[label] = (rows, curves)
    return {"total": total, "stars": stars, "per_dof": dof is not None}


def plot_loss(values, path=None):
    """Draw :func:`compute_loss` values (log-log); save when ``path`` is given. Returns the Figure."""
    fig = _style.new_figure("loss")
    ax_total, ax_star = fig.subplots(1, 2)
    colours = [f"C{k}" for k in range(10)]
    for k, (label, total) in enumerate(values["total"].items()):
        it = np.arange(1, total.size + 1)
        ok = np.isfinite(total) & (total > 0)
        y = np.where(ok, total, np.nan)
        ax_total.plot(it, y, "-", color=colours[k % 10], lw=1.5, label=f"{label} ({np.sum(ok)} iterations)")
        rows, curves = values["stars"][label]
        for j, c in enumerate(curves):
            c = np.where(np.isfinite(c) & (c > 0), c, np.nan)
            ax_star.plot(np.arange(1, c.size + 1), c, "-", color=colours[k % 10], lw=0.7, alpha=0.6,
                         label=f"{label} ({len(rows)} stars)" if j == 0 else None)
    for ax in (ax_total, ax_star):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("iteration (1 = initial guess)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    ax_total.set_ylabel("total chi2 of all stars")
    ax_total.set_title("loss of the whole fit", fontsize=10)
    ax_star.set_ylabel("chi2 / dof" if values["per_dof"] else "chi2")
    ax_star.set_title("single stars (spread over the final-loss ranks)", fontsize=10)
    if path is not None:
        _style.save(fig, path)
    return fig
