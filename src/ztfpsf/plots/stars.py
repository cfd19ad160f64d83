"""Per-star figure: data, model and residual on one colour scale, residual / sigma, 3-D view.

:func:`compute_stars` returns the arrays (no matplotlib); :func:`plot_star` draws one
star's arrays; :func:`plot_stars` does both for chosen ids or the worst and typical fits.
"""

import logging
from pathlib import Path

import numpy as np

from ..flags import decode
from . import _style
from ._data import chi2_per_dof, fitted_rows, noise_sigma, stamps_and_models

log = logging.getLogger(__name__)

__all__ = ["select_stars", "compute_stars", "plot_star", "plot_stars"]


def _row_of_ids(table, ids):
    """Row indices of the given ids (compared as strings: ids come from a command line too)."""
    if "id" not in table.colnames:
        raise ValueError("the results table has no 'id' column; choose stars with worst/typical")
    keys = {str(v): i for i, v in enumerate(table["id"])}
    missing = [str(i) for i in ids if str(i) not in keys]
    if missing:
        raise ValueError(f"no star with id {', '.join(missing)} in the results table")
    return [keys[str(i)] for i in ids]


def select_stars(table, ids=None, worst=0, typical=0):
    """Rows to draw: ``[(row index, reason), ...]``.

    ``ids``: these stars (reason ``'chosen'``). ``worst``: the N fitted stars with the
    largest chi2/dof (``'worst'``). ``typical``: the N fitted stars whose chi2/dof is
    closest to the median (``'typical'``). A star is listed once, with its first reason.
    Only stars with measured values (no BAD flag) can be worst or typical.
    """
    chosen = [(i, "chosen") for i in _row_of_ids(table, ids)] if ids else []
    rchi2 = chi2_per_dof(table)
    ok = np.nonzero(fitted_rows(table) & np.isfinite(rchi2))[0]
    if worst and ok.size:
        order = ok[np.argsort(-rchi2[ok], kind="stable")]
        chosen += [(int(i), "worst") for i in order[:worst]]
    if typical and ok.size:
        dist = np.abs(rchi2[ok] - np.median(rchi2[ok]))
        order = ok[np.argsort(dist, kind="stable")]
        chosen += [(int(i), "typical") for i in order[:typical]]
    seen, out = set(), []
    for i, reason in chosen:
        if i not in seen:
            seen.add(i)
            out.append((i, reason))
    return out


def compute_stars(table, image, rows, mask=None, psf=None):
    """Arrays of the per-star figure for the given rows (list of indices or ``(index, reason)``).

    Each star is a dict: ``row, id, reason, origin`` (image x, y of stamp pixel [0, 0]),
    ``data``, ``model`` (re-rendered from the table), ``residual = data - model``,
    ``sigma``, ``residual_sigma = residual / sigma`` (NaN on unused pixels), ``noise``
    (how sigma was obtained), ``params`` (row values), ``chi2_dof``, ``flags``.
    """
    rows = [(r, "chosen") if np.isscalar(r) else tuple(r) for r in rows]
    if not rows:
        return []
    index = np.array([int(r) for r, _ in rows])
    sub = table[index]
    origins, data, model = stamps_and_models(sub, image, mask, psf)
    residual = data - model
    sigma, how = noise_sigma(model, residual, table.meta, sub["read_noise"] if "read_noise" in sub.colnames else None)
    saturation = table.meta.get("saturation")
    used = np.isfinite(data) & (data < saturation if saturation else True)
    with np.errstate(divide="ignore", invalid="ignore"):
        residual_sigma = np.where(used, residual / sigma, np.nan)
    rchi2 = chi2_per_dof(sub)
    stars = []
    for k, (row, reason) in enumerate(rows):
        params = {c: sub[c][k] for c in sub.colnames}
        stars.append(
            {
                "row": int(row),
                "id": params.get("id", row),
                "reason": reason,
                "origin": (int(origins[k, 0]), int(origins[k, 1])),
                "data": data[k],
                "model": model[k],
                "residual": residual[k],
                "sigma": sigma[k],
                "residual_sigma": residual_sigma[k],
                "noise": how,
                "params": params,
                "chi2_dof": float(rchi2[k]),
                "flags": int(params["flags"]),
                "model_name": table.meta.get("model", "moffat"),
            }
        )
    return stars


def _fmt(params, name, digits=3):
    v = params.get(name)
    if v is None or not np.isfinite(v):
        return None
    e = params.get(name + "_err")
    if e is not None and np.isfinite(e) and e > 0:
        return f"{name}={v:.{digits}f}±{e:.{digits}f}"
    return f"{name}={v:.{digits}f}"


def _title(star):
    p = star["params"]
    parts = [f"{star['reason']} star id={star['id']}"]
    parts += [s for s in (_fmt(p, "x", 2), _fmt(p, "y", 2)) if s]
    if np.isfinite(p["flux"]):
        parts.append(f"flux={p['flux']:.4g}±{p.get('flux_err', np.nan):.2g}")
    parts += [s for s in (_fmt(p, n) for n in ("fwhm", "alpha", "e1", "e2", "sigma_x", "sigma_y", "rho")) if s]
    parts.append(f"chi2/dof={star['chi2_dof']:.3g}")
    names = decode(star["flags"])
    parts.append("flags=" + ("|".join(names) if names else "0"))
    return "  ".join(parts)


def plot_star(star, path=None):
    """Draw one star from :func:`compute_stars`; save it when ``path`` is given. Returns the Figure.

    Panels: data, model, residual (one shared asinh colour scale, image coordinates);
    residual / sigma (diverging, +-5); 3-D view of the data (points) with the model as a
    wireframe.
    """
    from matplotlib.colors import AsinhNorm, Normalize

    # fixed layout: data, model, residual, colour bar | residual/sigma, colour bar | 3-D
    fig = _style.new_figure("star", layout=None)
    gs = fig.add_gridspec(1, 9, width_ratios=[1, 1, 1, 0.06, 0.28, 1, 0.06, 0.12, 1.35],
                          left=0.05, right=0.985, bottom=0.14, top=0.84, wspace=0.12)
    data, model, resid = star["data"], star["model"], star["residual"]
    x0, y0 = star["origin"]
    ny, nx = data.shape
    extent = (x0 - 0.5, x0 + nx - 0.5, y0 - 0.5, y0 + ny - 0.5)
    finite = np.concatenate([a[np.isfinite(a)] for a in (data, model, resid)])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    noise = np.nanmedian(star["sigma"]) if np.any(np.isfinite(star["sigma"])) else 1.0
    norm = AsinhNorm(linear_width=max(3.0 * float(noise), 1e-6), vmin=lo, vmax=max(hi, lo + 1e-6))
    p = star["params"]
    for k, (arr, label) in enumerate(((data, "data"), (model, "model"), (resid, "data - model"))):
        ax = fig.add_subplot(gs[0, k])
        im = ax.imshow(arr, origin="lower", extent=extent, cmap=_style.CMAP, norm=norm, interpolation="nearest")
        ax.set_title(f"{label} [ADU]", fontsize=10)
        ax.set_xlabel("x [px]")
        if k:
            ax.tick_params(labelleft=False)
        else:
            ax.set_ylabel("y [px]")
        if np.isfinite(p["x"]) and np.isfinite(p["y"]):
            ax.plot([p["x"]], [p["y"]], "+", color="w", ms=8, mew=1)
    fig.colorbar(im, cax=fig.add_subplot(gs[0, 3]), ticks=_asinh_ticks(norm), format="%g")
    ax = fig.add_subplot(gs[0, 5])
    ims = ax.imshow(star["residual_sigma"], origin="lower", extent=extent, cmap=_style.CMAP_SIGNED,
                    norm=Normalize(-5, 5), interpolation="nearest")
    ax.set_title("(data - model) / sigma", fontsize=10)
    ax.set_xlabel("x [px]")
    ax.tick_params(labelleft=False)
    fig.colorbar(ims, cax=fig.add_subplot(gs[0, 6]), extend="both")
    _surface(fig.add_subplot(gs[0, 8], projection="3d"), data, model, x0, y0)
    fig.suptitle(_title(star), fontsize=9)
    if path is not None:
        _style.save(fig, path)
    return fig


def _asinh_ticks(norm, min_gap=0.07):
    """Colour-bar ticks for an asinh scale: 0 and signed powers of ten, spread apart."""
    lo, hi = norm.vmin, norm.vmax
    top = int(np.ceil(np.log10(max(abs(lo), abs(hi), 1e-12))))
    cands = [0.0] + [s * 10.0**k for k in range(top - 8, top + 1) for s in (1, -1)]
    cands = sorted(c for c in cands if lo <= c <= hi)
    chosen = []
    for c in sorted(cands, key=lambda c: (c != 0, -abs(c))):  # 0, then the largest decades
        if all(abs(float(norm(c)) - float(norm(t))) >= min_gap for t in chosen):
            chosen.append(c)
    return sorted(chosen)


def _surface(ax, data, model, x0, y0):
    """3-D view: data as red points, model as a blue wireframe (as in the ZTF study)."""
    ny, nx = data.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    xx, yy = xx + x0, yy + y0
    ok = np.isfinite(data)
    ax.scatter(xx[ok], yy[ok], data[ok], s=3, color="tab:red", depthshade=False, label="data")
    if np.all(np.isfinite(model)):
        ax.plot_wireframe(xx, yy, model, color="tab:blue", linewidth=0.5, label="model")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_zlabel("ADU")
    ax.tick_params(labelsize=7, pad=0)
    ax.set_box_aspect(None, zoom=0.9)
    ax.legend(loc="upper left", fontsize=7)


def plot_stars(table, image, out_dir, stem, *, ids=None, worst=0, typical=0, mask=None, fmt="png", psf=None):
    """One figure per chosen star, ``<out_dir>/<stem>.star-<id>.<fmt>``. Returns the paths."""
    from tqdm.auto import tqdm

    rows = select_stars(table, ids=ids, worst=worst, typical=typical)
    stars = compute_stars(table, image, rows, mask=mask, psf=psf)
    paths = []
    for star in tqdm(stars, desc="star figures", unit="star", disable=len(stars) < 20, leave=False):
        path = Path(out_dir) / f"{stem}.star-{star['id']}.{fmt}"
        plot_star(star, path)
        paths.append(path)
    return paths
