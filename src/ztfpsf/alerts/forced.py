"""Stage 3, the forced fit: a pixel-integrated Moffat of the chosen shape on every
candidate's difference stamp, flux, background and sub-pixel position free; one
``fit_stamps`` call for all candidates with a shape (and one for the rare candidates with
none, whose shape is then free too)."""

import numpy as np

from .rounds import fit_in_rounds

__all__ = ["FIT_COLUMNS", "forced_fit"]

#: Columns of the forced fit kept for the result table.
FIT_COLUMNS = ("flux", "flux_err", "x", "y", "background", "fwhm", "alpha", "chi2", "dof", "flags")


def forced_fit(prep, fwhm, alpha, cfg):
    """Fit the measurable candidates of ``prep`` with the shapes ``fwhm, alpha`` (NaN fwhm:
    shape free); frame coordinates. Returns a dict of :data:`FIT_COLUMNS` (NaN rows for
    the alerts not fitted)."""
    n = len(prep)
    out = {c: np.full(n, np.nan) for c in FIT_COLUMNS}
    out["dof"], out["flags"] = np.zeros(n, np.int64), np.zeros(n, np.int64)
    has_shape = np.isfinite(fwhm)
    for rows in (np.nonzero(prep.measurable & has_shape)[0], np.nonzero(prep.measurable & ~has_shape)[0]):
        if rows.size == 0:
            continue
        xc, yc = prep.center[rows, 0], prep.center[rows, 1]
        fixed = {"fwhm": fwhm[rows], "alpha": alpha[rows]} if has_shape[rows[0]] else {}
        start = {"x_init": xc, "y_init": yc}
        if not cfg.fit_position:
            fixed, start = {**fixed, "x": xc, "y": yc}, {}
        fit = fit_in_rounds(
            prep.diff[rows], prep.diff_var[rows], model="moffat", origin=prep.diff_origin[rows].astype(float),
            method=cfg.method, dtype=cfg.dtype, max_shift=cfg.max_shift, max_iter=cfg.max_iter, fixed=fixed or None, **start,
        )
        for c in FIT_COLUMNS:
            out[c][rows] = np.asarray(fit[c])
    return out
