"""Stage 4, the result table: flags, magnitudes and the pipeline's own values beside ours,
one row per alert, as a pandas DataFrame (column arithmetic, no loop over alerts)."""

import numpy as np
import pandas as pd

from ..flags import BAD, Flag

__all__ = ["RESULT_COLUMNS", "PIPELINE_COLUMNS", "UNITS", "packet_columns", "result_frame", "table_meta"]

#: Candidate fields copied beside the measurement (the pipeline's values, ZTF names).
#: ``fwhm`` is renamed ``fwhm_ztf`` (``fwhm`` is ours).
PIPELINE_COLUMNS = (
    "magpsf", "sigmapsf", "chipsf", "magap", "sigmagap", "rb", "drb", "isdiffpos",
    "magzpsci", "classtar", "fid", "nid", "jd", "field", "rcid", "pid", "xpos", "ypos",
    "nframesref",
)
#: Columns of the result table, in order (then the pipeline's columns, ``fwhm_ztf``,
#: ``source`` and ``problem``).
RESULT_COLUMNS = (
    "objectId", "candid", "flux", "flux_err", "mag", "mag_err", "x", "y", "background",
    "fwhm", "alpha", "chi2", "dof", "flags", "psf_source", "n_psf_stars",
)
_INT_FIELDS = ("fid", "nid", "field", "rcid", "pid", "nframesref")
UNITS = {"flux": "DN", "flux_err": "DN", "background": "DN", "mag": "mag", "mag_err": "mag", "x": "pix", "y": "pix", "fwhm": "pix"}


def table_meta(cfg):
    """What the columns mean (``DataFrame.attrs``, Parquet metadata)."""
    return dict(
        gain=cfg.gain,
        model="moffat",
        psf="shape from the science cutout's stars (psf_source), held fixed on the difference cutout",
        noise="sky_var (1.4826 MAD of the difference cutout) + S/gain + T/(gain*nframesref)",
        coordinates="x, y: 0-based pixels of the difference cutout",
        mag="magzpsci - 2.5 log10(flux)",
        units=UNITS,
    )


def packet_columns(batch):
    """The packet's columns of the result (identifiers, the pipeline's values, where it came
    from and what was wrong with it), one row per alert of ``batch``."""
    out = {"objectId": pd.array(batch.objectId.astype(str), dtype=object), "candid": batch.candid}
    for key in PIPELINE_COLUMNS:
        if key == "isdiffpos":
            col = batch.candidate[key] if key in batch.candidate else pd.Series([None] * len(batch), dtype=object)
            out[key] = col.astype(object).where(col.notna(), "").astype(str).to_numpy(dtype=object)
        else:
            out[key] = batch.field(key, np.int64 if key in _INT_FIELDS else np.float64)
    out["fwhm_ztf"] = batch.field("fwhm")
    out["source"] = batch.source
    out["packet_problem"] = batch.problems
    return pd.DataFrame(out)


def _masked_near(prep, x, y, fwhm, radius):
    """Masked (NaN) pixels of the difference stamp within ``radius`` FWHM of (x, y)."""
    bad = ~(np.isfinite(prep.diff) & np.isfinite(prep.diff_var))
    s = bad.shape[1]
    grid = np.arange(s)
    dx = prep.diff_origin[:, 0, None] + grid[None, :] - x[:, None]
    dy = prep.diff_origin[:, 1, None] + grid[None, :] - y[:, None]
    r = radius * np.where(np.isfinite(fwhm), fwhm, 3.0)
    near = (dx[:, None, :] ** 2 + dy[:, :, None] ** 2) <= (r**2)[:, None, None]
    return (bad & near).any(axis=(1, 2))


def result_frame(packet, prep, fit, psf, cfg):
    """The result rows of ``prep``'s alerts: ``fit`` the forced fits (dict of arrays, NaN
    where an alert was not fitted), ``psf`` the chosen shapes (``source``, ``n_stars``,
    ``flags``), ``packet`` their :func:`packet_columns`."""
    measured = prep.measurable
    ff = np.where(measured, fit["flags"], 0).astype(np.int64) & ~Flag.MASKED_PIXELS
    flags = prep.flags | psf["flags"] | ff
    col = {c: np.where(measured, fit[c], np.nan) for c in ("flux", "flux_err", "x", "y", "background", "fwhm", "alpha", "chi2")}
    x = np.where(np.isfinite(col["x"]), col["x"], prep.center[:, 0])
    y = np.where(np.isfinite(col["y"]), col["y"], prep.center[:, 1])
    flags[measured & _masked_near(prep, x, y, col["fwhm"], cfg.mask_radius)] |= Flag.MASKED_PIXELS
    ok = measured & ((ff & BAD) == 0)
    dof = np.where(measured, fit["dof"], 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = col["flux"] / col["flux_err"]
        red = col["chi2"] / np.maximum(dof, 1)
        flags[ok & (red > cfg.max_chi2 * (1.0 + (snr / cfg.chi2_snr_scale) ** 2))] |= Flag.POOR_FIT
        positive = ok & (col["flux"] > 0)
        flags[ok & ~positive] |= Flag.NOT_POSITIVE  # a value, not a failure: no magnitude
        mag = np.where(positive, prep.zp - 2.5 * np.log10(np.where(positive, col["flux"], 1.0)), np.nan)
        mag_err = np.where(positive, 2.5 / np.log(10.0) * col["flux_err"] / col["flux"], np.nan)
    # positions in the difference cutout's own pixels (a cut-short cutout starts later in its frame)
    col["x"] = col["x"] - prep.offset[:, 0]
    col["y"] = col["y"] - prep.offset[:, 1]
    out = pd.DataFrame({
        "objectId": packet["objectId"].to_numpy(), "candid": packet["candid"].to_numpy(),
        "flux": col["flux"], "flux_err": col["flux_err"], "mag": mag, "mag_err": mag_err,
        "x": col["x"], "y": col["y"], "background": col["background"], "fwhm": col["fwhm"], "alpha": col["alpha"],
        "chi2": col["chi2"], "dof": dof.astype(np.int32), "flags": flags.astype(np.int32),
        "psf_source": np.asarray(psf["source"], dtype=object), "n_psf_stars": np.asarray(psf["n_stars"]).astype(np.int32),
    })
    for c in packet.columns:
        if c not in out and c != "packet_problem":
            out[c] = packet[c].to_numpy()
    ours, theirs = prep.problem.astype(object), packet["packet_problem"].to_numpy(dtype=object)
    out["problem"] = np.where(theirs == "", ours, np.where(ours == "", theirs, ours + "; " + theirs))
    return out
