"""Stage 2, the PSF of each alert: fits of the science cutouts' stars, the choice of the
shape (``psf_source``), and the PSFs of groups of alerts (image, exposure, night).

Every step is vectorised over all alerts and stars of a batch: one ``fit_stamps`` call per
kind of fit (and round, :mod:`.rounds`), weighted medians by group with one sort, group look-ups by ``searchsorted``.
"""

import numpy as np

from ..flags import BAD, Flag
from .rounds import fit_in_rounds

__all__ = ["STAR_BAD", "fit_stars", "judge_stars", "star_weights", "grouped_weighted_median", "PSFGroups", "verify_on_candidate"]

#: Star-fit flags that disqualify a star as a PSF star.
STAR_BAD = BAD | Flag.CENTER_SHIFT


def fit_stars(data, var, mask, origin, x, y, cfg, alpha=None):
    """Moffat fits of star stamps (image coordinates through ``origin``): shape free, or
    alpha held at ``alpha`` (per star) with the fwhm free."""
    return fit_in_rounds(
        data, var, model="moffat", mask=mask, origin=origin, x_init=x, y_init=y,
        fixed=None if alpha is None else {"alpha": alpha}, method=cfg.method, dtype=cfg.dtype, max_shift=2.0, min_snr=3.0,
    )


def star_weights(fwhm_err):
    return 1.0 / np.maximum(np.asarray(fwhm_err, float), 1e-3) ** 2


def judge_stars(fit, snr, cfg):
    """``(alpha, shape_ok)`` of free-shape star fits: alpha capped at the top of its range
    (a Gaussian-like profile), and whether the star gives the full shape: a sane fit (no
    failure flag, fwhm in range, alpha limit only from above), bright enough and alpha
    known to ``max_alpha_rel_err`` of (alpha - 1)."""
    flags = np.asarray(fit["flags"])
    fwhm, alpha = np.asarray(fit["fwhm"], float), np.asarray(fit["alpha"], float)
    fwhm_err, alpha_err = np.asarray(fit["fwhm_err"], float), np.asarray(fit["alpha_err"], float)
    lo, hi = cfg.alpha_range
    limit_alpha_only = ((flags & Flag.SHAPE_LIMIT) != 0) & (alpha >= hi)
    with np.errstate(invalid="ignore", divide="ignore"):
        fwhm_ok = (
            ((flags & STAR_BAD) == 0)
            & (((flags & Flag.SHAPE_LIMIT) == 0) | limit_alpha_only)
            & (fwhm >= cfg.fwhm_range[0]) & (fwhm <= cfg.fwhm_range[1])
            & np.isfinite(fwhm_err) & (fwhm_err > 0)
            & (snr >= cfg.min_star_snr)
        )
        rel = np.where(alpha >= hi, 0.0, alpha_err / np.maximum(alpha - 1.0, 1e-6))
        shape_ok = fwhm_ok & (snr >= cfg.shape_snr) & (alpha >= lo) & (rel <= cfg.max_alpha_rel_err)
    return np.where(np.isfinite(alpha), np.minimum(alpha, hi), alpha), shape_ok


def grouped_weighted_median(group, values, weights):
    """Weighted median of ``values`` in each group: ``(groups, medians, counts)``, groups
    sorted. The median is the first value (in increasing order) at which the cumulative
    weight reaches half the group's total. One lexsort for all groups."""
    group, values, weights = np.asarray(group), np.asarray(values, float), np.asarray(weights, float)
    if group.size == 0:
        return group[:0], np.zeros(0), np.zeros(0, np.int64)
    order = np.lexsort((values, group))
    g, v, w = group[order], values[order], weights[order]
    start = np.r_[0, np.nonzero(g[1:] != g[:-1])[0] + 1]
    count = np.diff(np.r_[start, g.size])
    cw = np.cumsum(w)
    within = cw - np.repeat(cw[start] - w[start], count)
    total = np.repeat(np.add.reduceat(w, start), count)
    pos = np.where(within >= 0.5 * total, np.arange(g.size), g.size)
    first = np.minimum(np.minimum.reduceat(pos, start), np.r_[start[1:], g.size] - 1)
    return g[start], v[first], count


class PSFGroups:
    """PSF shapes of groups of alerts from their well-measured (``shape_ok``) stars.

    A group is the alerts sharing the value of one of ``keys`` (``pid``: one readout-channel
    image; ``jd``: one exposure; ``nid``: one night), and "all" the stars given; its shape
    is the weighted median (weights 1/fwhm_err**2) of its stars' ``fwhm`` and ``alpha``.
    Stars are added batch after batch (:meth:`add`), so one object carried across the
    batches of a night lets later alerts borrow the PSF of earlier ones (a broker's
    consumer loop); memory: 40 bytes per star.
    """

    def __init__(self, keys=("pid", "jd", "nid")):
        self.keys = tuple(keys)
        self._parts = []
        self._summary = None

    def __len__(self):
        return sum(len(p[0]) for p in self._parts)

    def add(self, fwhm, alpha, weight, keys):
        """Add stars: their ``fwhm``, ``alpha``, ``weight`` and group values ``keys``
        (``(n, len(self.keys))``, NaN where an alert lacks a value)."""
        keys = np.asarray(keys, np.float64).reshape(len(fwhm), len(self.keys))
        if len(fwhm):
            self._parts.append((np.asarray(fwhm, float), np.asarray(alpha, float), np.asarray(weight, float), keys))
            self._summary = None

    def _stars(self):
        if len(self._parts) > 1:
            self._parts = [tuple(np.concatenate(c) for c in zip(*self._parts))]
        return self._parts[0] if self._parts else (np.zeros(0), np.zeros(0), np.zeros(0), np.zeros((0, len(self.keys))))

    def summary(self):
        """Per key: ``(values, fwhm, alpha, n_stars)`` of each group, values sorted; then
        the same for all stars (one group)."""
        if self._summary is None:
            fwhm, alpha, w, keys = self._stars()
            out = []
            for k in range(len(self.keys)):
                m = np.isfinite(keys[:, k])
                vals, f, n = grouped_weighted_median(keys[m, k], fwhm[m], w[m])
                _, a, _ = grouped_weighted_median(keys[m, k], alpha[m], w[m])
                out.append((vals, f, a, n))
            zeros = np.zeros(fwhm.size, np.int64)
            _, f, n = grouped_weighted_median(zeros, fwhm, w)
            _, a, _ = grouped_weighted_median(zeros, alpha, w)
            out.append((np.zeros(f.size), f, a, n))
            self._summary = out
        return self._summary

    def lookup(self, keys, levels, use_all=False):
        """Shape of the first group, among ``levels`` (key names), that each alert belongs
        to, else of all stars with ``use_all``: ``(fwhm, alpha, n_stars, level)``, NaN and
        level ``''`` where there is none; level is the key name or ``'all'``."""
        keys = np.asarray(keys, np.float64)
        n = len(keys)
        fwhm, alpha, nst = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, np.int64)
        level = np.full(n, "", dtype=object)
        summary = self.summary()
        for name in levels:
            k = self.keys.index(name)
            vals, f, a, cnt = summary[k]
            if vals.size == 0:
                continue
            pos = np.clip(np.searchsorted(vals, keys[:, k]), 0, vals.size - 1)
            hit = (level == "") & (vals[pos] == keys[:, k])
            fwhm[hit], alpha[hit], nst[hit], level[hit] = f[pos[hit]], a[pos[hit]], cnt[pos[hit]], name
        _, f, a, cnt = summary[-1]
        if use_all and f.size:
            rest = level == ""
            fwhm[rest], alpha[rest], nst[rest], level[rest] = f[0], a[0], cnt[0], "all"
        return fwhm, alpha, nst, level


def verify_on_candidate(diff, var, center, origin, fwhm, alpha, cfg):
    """Fit the candidate's fwhm (alpha held) on its difference stamp: ``(fwhm, trusted)``.
    A borrowed ``fwhm`` is trusted when the candidate's is measured to 15 % or better and
    agrees within 3 sigma (the PSF varies over the focal plane)."""
    fit = fit_in_rounds(
        diff, var, model="moffat", x_init=center[:, 0] - origin[:, 0], y_init=center[:, 1] - origin[:, 1],
        fixed={"alpha": alpha}, method=cfg.method, dtype=cfg.dtype, max_shift=cfg.max_shift, max_iter=cfg.max_iter,
    )
    f, fe = np.asarray(fit["fwhm"], float), np.asarray(fit["fwhm_err"], float)
    with np.errstate(invalid="ignore"):
        measured = (
            ((np.asarray(fit["flags"]) & STAR_BAD) == 0)
            & (f >= cfg.fwhm_range[0]) & (f <= cfg.fwhm_range[1]) & (fe / f <= 0.15)
        )
        trusted = measured & (np.abs(f - fwhm) <= 3.0 * fe)
    return f, trusted
