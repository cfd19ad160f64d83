"""Stage 1, pixels: sky, the candidate's difference stamp and its noise, the sources of the
science cutouts and their stamps. numpy over the batch's (N, 63, 63) stacks: sorts,
matrix products and gathers, no loop over alerts.

Coordinates are 0-based pixels of the 63x63 frame of :class:`ztfpsf.io.alerts.AlertBatch`
(a cutout cut short by the channel's edge sits where the full cutout would have had it),
so the candidate is at ``31 + xpos - round(xpos)`` in every alert.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..flags import Flag
from ..io.alerts import CUTOUT_SIZE, frame_offset
from ..stamps import cut, stamp_origin
from .config import DEFAULT_NFRAMESREF

__all__ = ["robust_sky", "candidate_center", "Prepared", "prepare", "Peaks", "detect", "star_stamps"]

_SCIENCE, _TEMPLATE, _DIFFERENCE = 0, 1, 2
_SMOOTH = 1.0  # px: the Gaussian of the detection filter


# --------------------------------------------------------------------------------------
# statistics and geometry
# --------------------------------------------------------------------------------------
def _middle(sorted_rows, count):
    """Median of each row's first ``count`` values (the row sorted, NaN last), float64."""
    rows = np.arange(len(sorted_rows))
    lo, hi = np.maximum((count - 1) // 2, 0), np.maximum(count // 2, 0)
    return 0.5 * (sorted_rows[rows, lo].astype(np.float64) + sorted_rows[rows, hi])


def robust_sky(stack, mad=True):
    """Median and 1.4826 MAD (NaN without ``mad``) of each image's finite pixels: two
    ``(N,)`` float64 arrays, NaN where an image has fewer than 10 finite pixels. One sort
    per statistic for the whole stack (numpy's vectorised sort puts NaN last)."""
    v = np.asarray(stack).reshape(len(stack), -1)
    count = np.isfinite(v).sum(axis=1)
    s = np.sort(v, axis=1)
    med = _middle(s, count)
    sig = np.full(len(v), np.nan)
    if mad:
        s -= med[:, None].astype(s.dtype)
        np.abs(s, out=s)
        s.sort(axis=1)
        sig = 1.4826 * _middle(s, count)
    few = count < 10
    med[few], sig[few] = np.nan, np.nan
    return med, sig


def candidate_center(candidate, shape):
    """0-based (column, row) of the candidate in a cutout of ``shape`` (rows, columns).

    A full cutout is centred on the pixel nearest to (xpos, ypos) (1-based readout-channel
    coordinates): the candidate is at ``31 + xpos - round(xpos)``. A cutout cut short by
    the channel's edge lost its pixels on the side of that edge: a candidate within 31 px
    of pixel 1 lost the low side, so its position moves down by the missing count.
    ``candidate`` holds ``xpos`` and ``ypos`` (scalars or arrays).
    """
    ny, nx = shape
    out = []
    for pos, n in ((candidate["xpos"], nx), (candidate["ypos"], ny)):
        pos = np.asarray(pos, dtype=np.float64)
        c = (CUTOUT_SIZE - 1) // 2 + pos - np.round(pos) - frame_offset(pos, n)
        out.append(float(c) if c.ndim == 0 else c)
    return out[0], out[1]


def cut_frames(stack, alert, x0, y0, size):
    """``(M, size, size)`` stamps of frames ``stack[alert]`` with pixel [0, 0] at integer
    frame ``(x0, y0)``; NaN off the frame. :func:`ztfpsf.stamps.cut` on the stack seen as
    one tall image, with the rows that would spill into the next frame blanked."""
    n, ny, nx = stack.shape
    x0, y0 = np.asarray(x0, np.int64), np.asarray(y0, np.int64)
    out = cut(stack.reshape(n * ny, nx), x0, y0 + np.asarray(alert, np.int64) * ny, size)
    rows = y0[:, None] + np.arange(size)
    return np.where(((rows >= 0) & (rows < ny))[:, :, None], out, np.nan)


# --------------------------------------------------------------------------------------
# the candidate's stamp and noise
# --------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """What the forced fit needs from N alerts (arrays with the alerts on axis 0).

    flags : int64, NO_DATA / OFF_IMAGE so far; problem : object, why NO_DATA ('' if not)
    center : (N, 2) candidate (x, y) in the frame; offset : (N, 2) the difference
        cutout's pixel [0, 0] in the frame (subtract it for cutout coordinates)
    diff, diff_var : (N, s, s) float32 difference stamp and its variance (NaN = unusable)
    diff_origin : (N, 2) frame (x, y) of the stamp's pixel [0, 0]
    sky : (N, 3, 2) median and 1.4826 MAD of the science, template and difference cutouts
    zp : (N,) magzpsci; keys : (N, len(group_keys)) float64 group values (NaN if missing)
    """

    flags: np.ndarray
    problem: np.ndarray
    center: np.ndarray
    offset: np.ndarray
    diff: np.ndarray
    diff_var: np.ndarray
    diff_origin: np.ndarray
    sky: np.ndarray
    zp: np.ndarray
    keys: np.ndarray

    def __len__(self):
        return len(self.flags)

    @property
    def measurable(self):
        return (self.flags & Flag.NO_DATA) == 0

    def take(self, index):
        return Prepared(**{k: v[index] for k, v in vars(self).items()})

    @staticmethod
    def concat(parts):
        return Prepared(**{k: np.concatenate([vars(p)[k] for p in parts]) for k in vars(parts[0])})


def _problems(batch, sky_sig):
    """The first reason each alert cannot be measured ('' if it can)."""
    n = len(batch)
    problem = np.full(n, "", dtype=object)
    checks = [(batch.shape[:, _DIFFERENCE, 0] == 0, "no difference cutout"),
              (~np.isfinite(batch.difference).any(axis=(1, 2)), "difference cutout has no finite pixel")]
    for key in ("xpos", "ypos", "magzpsci"):
        checks.append((~np.isfinite(batch.field(key)), f"candidate field {key} missing"))
    checks.append((~(sky_sig > 0), "difference cutout has no usable sky"))
    for bad, why in reversed(checks):  # the first reason wins
        problem[bad] = why
    return problem


def prepare(batch, cfg):
    """Sky statistics, flags and the candidate's difference stamp with its noise:
    ``sky_var + S/gain + T/(gain * nframesref)`` (S, T the science and template pixels
    above their median, the sources' Poisson noise on both sides of the subtraction)."""
    n = len(batch)
    sky = np.full((n, 3, 2), np.nan)
    for k, name in enumerate(("science", "template", "difference")):
        if k == _TEMPLATE and not (cfg.source_noise or cfg.star_cutout == "template"):
            continue
        sky[:, k, 0], sky[:, k, 1] = robust_sky(batch.cutout(name), mad=k != _TEMPLATE or cfg.star_cutout == "template")
    problem = _problems(batch, sky[:, _DIFFERENCE, 1])
    flags = np.where(problem != "", int(Flag.NO_DATA), 0).astype(np.int64)
    # a cutout that could not be decoded is already explained by the packet's problems
    told = pd.Series(batch.problems, dtype=object).str.contains("difference cutout", regex=False).to_numpy(bool)
    problem[told & (problem == "no difference cutout")] = ""

    xpos, ypos = batch.field("xpos"), batch.field("ypos")
    with np.errstate(invalid="ignore"):
        center = np.column_stack([(CUTOUT_SIZE - 1) // 2 + xpos - np.round(xpos), (CUTOUT_SIZE - 1) // 2 + ypos - np.round(ypos)])
    center = np.where(np.isfinite(center), center, (CUTOUT_SIZE - 1) // 2)
    ox, oy = stamp_origin(center[:, 0], center[:, 1], cfg.stamp_size)
    idx = np.arange(n)
    diff = cut_frames(batch.difference, idx, ox, oy, cfg.stamp_size)
    var = np.broadcast_to((sky[:, _DIFFERENCE, 1] ** 2)[:, None, None], diff.shape).astype(np.float32)
    if cfg.source_noise:
        nref = batch.field("nframesref")
        nref = np.where(np.isfinite(nref) & (nref > 0), nref, DEFAULT_NFRAMESREF)
        same = batch.shape == batch.shape[:, _DIFFERENCE : _DIFFERENCE + 1]
        for k, name, scale in ((_SCIENCE, "science", 1.0), (_TEMPLATE, "template", 1.0 / nref)):
            use = same[:, k].all(axis=1) & np.isfinite(sky[:, k, 0])
            img = cut_frames(batch.cutout(name), idx, ox, oy, cfg.stamp_size)
            src = np.nan_to_num(np.clip(img - sky[:, k, 0, None, None], 0.0, None)) / cfg.gain
            var = var + np.where(use, scale, 0.0)[:, None, None] * src
    var = np.where(np.isfinite(diff), var, np.nan).astype(np.float32)

    offset = batch.offset.astype(np.int64)
    shape = batch.shape[:, _DIFFERENCE]
    h = cfg.stamp_size // 2
    c = center - offset
    inside = (c[:, 0] >= h) & (c[:, 0] <= shape[:, 1] - 1 - h) & (c[:, 1] >= h) & (c[:, 1] <= shape[:, 0] - 1 - h)
    flags[~inside & ((flags & Flag.NO_DATA) == 0)] |= Flag.OFF_IMAGE  # the stamp reaches beyond a cut-short cutout
    keys = np.column_stack([batch.field(k) for k in cfg.group_keys]) if cfg.group_keys else np.zeros((n, 0))
    return Prepared(
        flags=flags, problem=problem, center=center, offset=offset, diff=diff.astype(np.float32), diff_var=var,
        diff_origin=np.column_stack([ox, oy]), sky=sky, zp=batch.field("magzpsci"), keys=keys,
    )


# --------------------------------------------------------------------------------------
# sources of the science cutouts
# --------------------------------------------------------------------------------------
@dataclass
class Peaks:
    """Sources of the cutouts: ``alert`` (sorted), frame ``x, y`` (integer), ``snr``."""

    alert: np.ndarray
    x: np.ndarray
    y: np.ndarray
    snr: np.ndarray

    def __len__(self):
        return len(self.alert)


def _gaussian_matrix(n, sigma):
    """(n, n) matrix of a 1-D Gaussian filter (scipy.ndimage's kernel: radius 4 sigma,
    normalised; zero outside the image, ``mode='constant'``): ``z @ K`` filters rows."""
    r = int(4.0 * sigma + 0.5)
    t = np.arange(-r, r + 1)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w /= w.sum()
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    return np.where(np.abs(d) <= r, w[np.clip(d + r, 0, 2 * r)], 0.0).astype(np.float32)


def _max5(a):
    """5x5 running maximum of each image, zero outside (``maximum_filter(..., 5, mode='constant')``)."""
    n, ny, nx = a.shape
    p = np.zeros((n, ny + 4, nx + 4), a.dtype)
    p[:, 2:-2, 2:-2] = a
    cols = p[:, :, 0:nx].copy()
    for k in range(1, 5):
        np.maximum(cols, p[:, :, k : k + nx], out=cols)
    out = cols[:, 0:ny].copy()
    for k in range(1, 5):
        np.maximum(out, cols[:, k : k + ny], out=out)
    return out


def detect(stack, sky, use, shape, offset, detect_snr):
    """Peaks of the cutouts ``stack[use]``: the cutout minus its median, NaN as sky,
    smoothed with a Gaussian of 1 px (a matched filter for a point source; two matrix
    products per image), local maxima (5x5) above ``detect_snr`` times the smoothed
    noise, inside the cutout. ``sky``: (N, 2) median and robust sigma."""
    rows = np.nonzero(use & (sky[:, 1] > 0))[0]
    if rows.size == 0:
        return Peaks(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    n, ny, nx = stack.shape
    z = stack[rows] - sky[rows, 0, None, None].astype(np.float32)
    np.nan_to_num(z, copy=False, nan=0.0)
    k = _gaussian_matrix(nx, _SMOOTH)
    sm = np.matmul(k, (z.reshape(-1, nx) @ k).reshape(z.shape))
    noise = sky[rows, 1] / (2.0 * np.sqrt(np.pi) * _SMOOTH)  # noise of the smoothed image
    peak = (sm == _max5(sm)) & (sm > (detect_snr * noise)[:, None, None])
    oy, ox = offset[rows, 1, None, None], offset[rows, 0, None, None]
    yy, xx = np.arange(ny)[None, :, None], np.arange(nx)[None, None, :]
    peak &= (yy >= oy) & (yy < oy + shape[rows, 0, None, None]) & (xx >= ox) & (xx < ox + shape[rows, 1, None, None])
    i, y, x = np.nonzero(peak)
    return Peaks(rows[i], x, y, sm[i, y, x] / noise[i])


def star_stamps(stack, sky, peaks, stars, size, gain):
    """Stamps of the sources ``stars`` (indices into ``peaks``) for the PSF fit.

    Returns data, variance (sky + source Poisson), mask and origin: each stamp masks the
    pixels nearer to another source of its cutout than to its own (a simple deblending).
    A pixel p is nearer to source j than to the star o when ``|o-j|^2 + 2 (p-o).(o-j) < 0``:
    one half-plane per pair of sources, the pairs of all stars at once.
    """
    stars = np.asarray(stars, np.int64)
    a, x, y = peaks.alert[stars], peaks.x[stars], peaks.y[stars]
    h = size // 2
    data = cut_frames(stack, a, x - h, y - h, size).astype(np.float32)
    med, sig = sky[a, 0], sky[a, 1]
    var = (sig**2)[:, None, None] + np.clip(np.nan_to_num(data - med[:, None, None]), 0.0, None) / gain
    return data, var.astype(np.float32), _deblend_mask(peaks, stars, h), np.column_stack([x - h, y - h]).astype(np.float64)


def _deblend_mask(peaks, stars, h):
    size = 2 * h + 1
    mask = np.zeros((len(stars), size, size), bool)
    start = np.searchsorted(peaks.alert, peaks.alert[stars], side="left")
    count = np.searchsorted(peaks.alert, peaks.alert[stars], side="right") - start
    total = int(count.sum())
    if total == 0:
        return mask
    owner = np.repeat(np.arange(len(stars)), count)
    other = np.arange(total) - np.repeat(np.cumsum(count) - count, count) + np.repeat(start, count)
    dx = peaks.x[stars][owner] - peaks.x[other]
    dy = peaks.y[stars][owner] - peaks.y[other]
    d2 = dx * dx + dy * dy
    # a source farther than twice the stamp's half-diagonal is nearer to no stamp pixel
    keep = (other != stars[owner]) & (d2 < 8 * h * h)
    owner, dx, dy, d2 = owner[keep], dx[keep], dy[keep], d2[keep]
    if owner.size == 0:
        return mask
    q = np.arange(-h, h + 1)
    nearer = (d2[:, None, None] + 2 * (q[None, None, :] * dx[:, None, None] + q[None, :, None] * dy[:, None, None])) < 0
    first = np.r_[0, np.nonzero(np.diff(owner))[0] + 1]
    mask[owner[first]] = np.logical_or.reduceat(nearer, first, axis=0)
    return mask
