"""PSF over the image: maps of fwhm and alpha and an ellipticity whisker plot.

From the star fits (one point per fitted star) and, when a spatially varying PSF model
is given, from the model on a grid. :func:`compute_maps` returns the values (no
matplotlib), :func:`plot_maps` draws them.
"""

import logging

import numpy as np

from . import _style
from ._data import fitted_rows

log = logging.getLogger(__name__)

__all__ = ["compute_maps", "plot_maps", "star_ellipticity", "independent_shapes", "load_psf_model"]


def independent_shapes(table):
    """The table with each star's own free-shape fit in the shape columns.

    After a joint PSF fit the shape columns hold the PSF at the star and the star's own
    fit is in ``star_<name>`` columns; the maps compare those with the model."""
    star = [c for c in table.colnames if c.startswith("star_")]
    if not star:
        return table
    view = table.copy(copy_data=False)
    for c in star:
        view[c[len("star_"):]] = table[c]
    return view


def star_ellipticity(table):
    """(e1, e2) of every row from the table's shape columns, or None for a circular model.

    Elliptical Moffat: its ``e1, e2``. Gaussian: from ``sigma_x, sigma_y, rho``
    (``e = (Ixx - Iyy, 2 Ixy) / (Ixx + Iyy)``, the same convention).
    """
    if "e1" in table.colnames and "e2" in table.colnames:
        return np.asarray(table["e1"], float), np.asarray(table["e2"], float)
    if {"sigma_x", "sigma_y", "rho"} <= set(table.colnames):
        sx, sy, rho = (np.asarray(table[c], float) for c in ("sigma_x", "sigma_y", "rho"))
        sxx, syy, sxy = sx * sx, sy * sy, rho * sx * sy
        with np.errstate(invalid="ignore", divide="ignore"):
            return (sxx - syy) / (sxx + syy), 2.0 * sxy / (sxx + syy)
    return None


def _image_shape(table):
    shape = table.meta.get("image_shape")
    if shape:
        return int(shape[0]), int(shape[1])
    x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
    return int(np.nanmax(y, initial=0)) + 1, int(np.nanmax(x, initial=0)) + 1


def load_psf_model(path):
    """A spatially varying PSF model read with ``ztfpsf.psf.PSFModel.read``, or None.

    None (with a log message) when the file does not exist or the module is unavailable.
    """
    from pathlib import Path

    if path is None or not Path(path).is_file():
        return None
    try:
        from ..psf import PSFModel
    except ImportError as err:
        log.info("PSF model %s not drawn: ztfpsf.psf unavailable (%s)", path, err)
        return None
    return PSFModel.read(path)


def _call(fn, *args, **kwargs):
    """A model method's value, or None where the model lacks the quantity."""
    if fn is None:
        return None
    try:
        return fn(*args, **kwargs)
    except (ValueError, NotImplementedError) as err:  # e.g. alpha of a Gaussian PSF
        log.debug("PSF model: %s", err)
        return None


def _model_values(psf_model, x, y):
    """Evaluate the model's maps at points (1-D arrays); quantities it lacks are None."""
    out = {}
    for name in ("fwhm", "alpha"):
        v = _call(getattr(psf_model, name, None), x, y)
        out[name] = None if v is None else np.asarray(v, dtype=float).reshape(x.shape)
    fn = getattr(psf_model, "ellipticity", None)
    try:  # ztfpsf.psf.PSFModel gives |e| unless components=True
        ell = _call(fn, x, y, components=True)
    except TypeError:
        ell = _call(fn, x, y)
    if not (isinstance(ell, (tuple, list)) and len(ell) == 2):
        out["e1"] = out["e2"] = None
    else:
        out["e1"] = np.asarray(ell[0], dtype=float).reshape(x.shape)
        out["e2"] = np.asarray(ell[1], dtype=float).reshape(x.shape)
    return out


def compute_maps(table, psf_model=None, grid=16):
    """Values of the maps figure.

    Returns ``{"image_shape": (ny, nx), "stars": {...}, "model": {...} or None}``:
    ``stars`` holds ``row, x, y, fwhm`` and, when the model has them, ``alpha``, ``e1``,
    ``e2`` of the fitted stars (rows without a BAD flag and with a finite fwhm);
    ``model`` holds ``x, y`` (grid-cell centres, 1-D) and ``fwhm, alpha, e1, e2``
    (``(grid, grid)`` arrays, None where the model lacks them) evaluated on the grid.
    """
    ny, nx = _image_shape(table)
    table = independent_shapes(table)
    rows = np.nonzero(fitted_rows(table) & np.isfinite(np.asarray(table["fwhm"], float)))[0]
    stars = {"row": rows, "x": np.asarray(table["x"], float)[rows], "y": np.asarray(table["y"], float)[rows]}
    stars["fwhm"] = np.asarray(table["fwhm"], float)[rows]
    stars["alpha"] = np.asarray(table["alpha"], float)[rows] if "alpha" in table.colnames else None
    ell = star_ellipticity(table)
    stars["e1"], stars["e2"] = (ell[0][rows], ell[1][rows]) if ell is not None else (None, None)
    model = None
    if psf_model is not None:
        gx = (np.arange(grid) + 0.5) * nx / grid - 0.5
        gy = (np.arange(grid) + 0.5) * ny / grid - 0.5
        X, Y = np.meshgrid(gx, gy)
        model = {"x": gx, "y": gy, **_model_values(psf_model, X.ravel(), Y.ravel())}
        for k in ("fwhm", "alpha", "e1", "e2"):
            if model[k] is not None:
                model[k] = model[k].reshape(grid, grid)
    return {"image_shape": (ny, nx), "stars": stars, "model": model, "model_name": table.meta.get("model")}


def _robust_limits(*arrays):
    vals = np.concatenate([np.ravel(a)[np.isfinite(np.ravel(a))] for a in arrays if a is not None] or [np.zeros(0)])
    if vals.size == 0:
        return None, None
    lo, hi = np.percentile(vals, [2, 98])
    return (float(lo), float(hi)) if hi > lo else (float(lo) - 0.05, float(hi) + 0.05)


def _frame(ax, shape, title):
    ny, nx = shape
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    ax.set_aspect("equal")
    ax.set_xlabel("x [px]")
    ax.set_ylabel("y [px]")
    ax.set_title(title, fontsize=10)


def _whisker_ref(*pairs):
    """Reference |e| of the whisker key: the 90th percentile over every panel (one scale for all)."""
    e = np.concatenate([np.hypot(np.ravel(a), np.ravel(b)) for a, b in pairs if a is not None] or [np.zeros(0)])
    e = e[np.isfinite(e)]
    return max(float(np.percentile(e, 90)) if e.size else 0.0, 0.01)


def _whiskers(ax, x, y, e1, e2, shape, ref):
    """Headless sticks of length proportional to |e| along the major axis, angle atan2(e2, e1)/2."""
    e = np.hypot(e1, e2)
    theta = 0.5 * np.arctan2(e2, e1)
    ok = np.isfinite(e) & np.isfinite(x) & np.isfinite(y)
    # a stick of |e| = ref spans 1/12 of the image width
    scale = ref * 12.0 / shape[1]
    q = ax.quiver(x[ok], y[ok], (e * np.cos(theta))[ok], (e * np.sin(theta))[ok], angles="xy", scale_units="xy",
                  scale=scale, headwidth=0, headlength=0, headaxislength=0, pivot="middle", width=0.004)
    ax.quiverkey(q, 0.68, 1.035, ref, f"|e| = {ref:.2g}", labelpos="E", coordinates="axes",
                 fontproperties={"size": 8})
    return q


def plot_maps(values, path=None):
    """Draw :func:`compute_maps` values; save when ``path`` is given. Returns the Figure.

    Top row, the star fits: fwhm and alpha as coloured points at the fitted positions,
    ellipticity whiskers. Bottom row (with a PSF model): the model's maps on a grid with
    the same colour scales.
    """
    s, m, shape = values["stars"], values["model"], values["image_shape"]
    fig = _style.new_figure("maps_model" if m is not None else "maps")
    nrows = 2 if m is not None else 1
    axes = fig.subplots(nrows, 3, squeeze=False)
    for col, name in enumerate(("fwhm", "alpha")):
        vmin, vmax = _robust_limits(s[name], m[name] if m else None)
        ax = axes[0, col]
        unit = " [px]" if name == "fwhm" else ""
        if s[name] is None or s["x"].size == 0:
            _style.note(ax, f"no {name} in the star fits (model {values.get('model_name')})")
        else:
            sc = ax.scatter(s["x"], s["y"], c=s[name], s=18, cmap=_style.CMAP, vmin=vmin, vmax=vmax, edgecolors="none")
            _frame(ax, shape, f"{name}{unit} of {s['x'].size} star fits (median {np.nanmedian(s[name]):.3g})")
            fig.colorbar(sc, ax=ax, shrink=0.9)
        if m is not None:
            ax = axes[1, col]
            if m[name] is None:
                _style.note(ax, f"the PSF model has no {name}")
                continue
            ny, nx = shape
            im = ax.imshow(m[name], origin="lower", extent=(-0.5, nx - 0.5, -0.5, ny - 0.5), cmap=_style.CMAP,
                           vmin=vmin, vmax=vmax, interpolation="nearest", aspect="equal")
            _frame(ax, shape, f"{name}{unit} of the PSF model")
            fig.colorbar(im, ax=ax, shrink=0.9)
    ref = _whisker_ref((s["e1"], s["e2"]), (m["e1"], m["e2"]) if m is not None else (None, None))
    ax = axes[0, 2]
    if s["e1"] is None or s["x"].size == 0:
        _style.note(ax, f"no ellipticity: model {values.get('model_name')} is circular")
    else:
        _whiskers(ax, s["x"], s["y"], s["e1"], s["e2"], shape, ref)
        _frame(ax, shape, "")
        ax.set_title("ellipticity of the star fits", loc="left", fontsize=10)
    if m is not None:
        ax = axes[1, 2]
        if m["e1"] is None:
            _style.note(ax, "the PSF model has no ellipticity")
        else:
            X, Y = np.meshgrid(m["x"], m["y"])
            _whiskers(ax, X.ravel(), Y.ravel(), m["e1"].ravel(), m["e2"].ravel(), shape, ref)
            _frame(ax, shape, "")
            ax.set_title("ellipticity of the PSF model", loc="left", fontsize=10)
    if path is not None:
        _style.save(fig, path)
    return fig
