"""The residual image of ``ztfpsf catalog`` (data minus every fitted source) as a thumbnail,
beside the data on the same stretch.

:func:`compute_residual_image` (no matplotlib) shrinks both images by a block mean of
``factor x factor`` pixels, ``factor = ceil(max(ny, nx) / max_side)`` (default
``max_side`` 256): the image is padded with NaN to a multiple of ``factor`` and each block
is the mean of its finite pixels (NaN where it has none). One linear grey stretch serves
both panels: ``median - 5 sigma`` to ``median + 10 sigma`` of the residual thumbnail
(``sigma`` its 1.4826 MAD), so the residual shows the sky noise of the shrunk image and the
data its stars, and any source left in the residual stands out as it does in the data.
:func:`plot_residual_image` draws them.
"""

import math
import warnings

import numpy as np

from ..apcorr import robust_sigma
from . import _style

__all__ = ["MAX_SIDE", "block_mean", "thumbnail_factor", "compute_residual_image", "plot_residual_image"]

#: Longest side [thumbnail px] of the thumbnails.
MAX_SIDE = 256
#: The stretch: from LOW to HIGH robust sigma of the residual thumbnail around its median.
LOW, HIGH = -5.0, 10.0


def thumbnail_factor(shape, max_side=MAX_SIDE):
    """Side of the square pixel blocks averaged into one thumbnail pixel."""
    return max(1, math.ceil(max(shape) / int(max_side)))


def block_mean(image, factor):
    """Mean of the finite pixels of each ``factor x factor`` block of ``image`` (padded with
    NaN to a multiple of ``factor``); NaN for a block without one."""
    image = np.asarray(image, np.float64)
    if image.ndim != 2:
        raise ValueError(f"a thumbnail needs a 2-D image; got shape {image.shape}")
    ny, nx = image.shape
    f = int(factor)
    padded = np.full((math.ceil(ny / f) * f, math.ceil(nx / f) * f), np.nan)
    padded[:ny, :nx] = np.where(np.isfinite(image), image, np.nan)
    blocks = padded.reshape(padded.shape[0] // f, f, padded.shape[1] // f, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks
        return np.nanmean(blocks, axis=(1, 3))


def _stretch(thumb):
    """``(vmin, vmax)`` of the residual thumbnail (see the module)."""
    v = thumb[np.isfinite(thumb)]
    if not v.size:
        return 0.0, 1.0
    med = float(np.median(v))
    sigma = robust_sigma(v) or float(np.std(v)) or 1.0
    return med + LOW * sigma, med + HIGH * sigma


def compute_residual_image(residual, data=None, max_side=MAX_SIDE):
    """Values of the residual-image figure: ``residual`` and ``data`` thumbnails
    (:func:`block_mean` by ``factor``; ``data`` None when not given or of another shape),
    ``factor``, ``shape`` (of the full image), ``vmin, vmax`` (the stretch of both),
    ``note`` (why the data is not shown, or None)."""
    residual = np.asarray(residual, np.float64)
    factor = thumbnail_factor(residual.shape, max_side)
    res = block_mean(residual, factor)
    note, thumb = None, None
    if data is None:
        note = "no image: the data are not shown"
    elif np.shape(data) != residual.shape:
        note = f"the image is {np.shape(data)[1]}x{np.shape(data)[0]}, the residual {residual.shape[1]}x{residual.shape[0]}"
    else:
        thumb = block_mean(data, factor)
    vmin, vmax = _stretch(res)
    return dict(residual=res, data=thumb, factor=factor, shape=residual.shape, vmin=vmin, vmax=vmax, note=note)


def plot_residual_image(values, path=None):
    """Draw :func:`compute_residual_image`'s values: data and residual, one stretch."""
    fig = _style.new_figure("residual_image")
    axes = fig.subplots(1, 2)
    f, (ny, nx) = values["factor"], values["shape"]
    kw = dict(origin="lower", cmap="gray", vmin=values["vmin"], vmax=values["vmax"], interpolation="nearest")
    if values["data"] is not None:
        axes[0].imshow(values["data"], **kw)
        axes[0].set_title("data")
    else:
        _style.note(axes[0], values["note"] or "no data")
    im = axes[1].imshow(values["residual"], **kw)
    axes[1].set_title("data - fitted sources")
    fig.colorbar(im, ax=axes[1], label="ADU (block mean)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{nx}x{ny} px, {f}x{f} px blocks averaged; one linear stretch (median {LOW:+g} to {HIGH:+g} "
                 "robust sigma of the residual)")
    return _style.save(fig, path) if path is not None else fig
