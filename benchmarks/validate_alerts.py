"""Validate ``ztfpsf alert`` on real ZTF alert packets against the pipeline's magpsf.

Not a test: it reads a directory of alert files given on the command line (e.g. the
project's shared data, ``../shared/data``: 240 public alerts, Avro and Parquet), measures
every alert, prints the acceptance table (median and robust scatter of mag - magpsf,
normalised differences, the pipeline's own magap - magpsf scatter, the fraction
measured, for rb >= 0.5 and rb < 0.5), the blank-sky check of the flux uncertainties,
the PSF sources used, and writes the figures ``docs/alerts_mag.png`` and
``docs/alerts_fwhm.png`` (``--docs`` to put them elsewhere) and the table (``--out``).

    python benchmarks/validate_alerts.py ../shared/data [--out alerts.parquet]

The statistics of the validation live here, not in the library: the comparison table
(:func:`compare_with_pipeline`) and the blank-sky test of the uncertainties
(:func:`blank_sky_pulls`); ``tests/test_alerts.py`` imports both.

The acceptance criteria checked (issue 7), over rb >= 0.5:
median |mag - magpsf| <= 0.02 mag (flags == 0); robust std of the normalised difference
< 1.3; in each magpsf bin the robust std of mag - magpsf <= that of magap - magpsf;
>= 95 % measured (flags == 0).
"""

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def compare_with_pipeline(table, *, rb_min=0.5, bins=(-np.inf, 16.0, 18.0, 19.5)):
    """Agreement of ``mag`` with the pipeline's ``magpsf``, as an astropy Table.

    One row for all alerts with ``rb >= rb_min`` and one per ``magpsf`` bin, then the
    same for ``rb < rb_min``: ``n`` alerts, ``n_measured`` (flags == 0) and their
    fraction, the median and robust std of ``mag - magpsf`` over the measured ones, the
    robust std of ``(mag - magpsf) / sqrt(mag_err**2 + sigmapsf**2)``, the robust std of
    the pipeline's own ``magap - magpsf`` (all alerts of the row) and the median
    ``mag_err / sigmapsf``.
    """
    from astropy.table import Table

    from ztfpsf.apcorr import robust_sigma

    col = lambda name: np.asarray(table[name], float)  # noqa: E731
    rb, magpsf = col("rb"), col("magpsf")
    d = col("mag") - magpsf
    nd = d / np.hypot(col("mag_err"), col("sigmapsf"))
    dap = col("magap") - magpsf
    ratio = col("mag_err") / col("sigmapsf")
    ok = np.asarray(table["flags"]) == 0
    rows = []
    for label, sel in ((f"rb >= {rb_min}", rb >= rb_min), (f"rb < {rb_min}", ~(rb >= rb_min))):
        groups = [("all", sel)]
        for lo, hi in zip(bins[:-1], bins[1:]):
            name = f"magpsf < {hi:g}" if not np.isfinite(lo) else f"{lo:g}-{hi:g}"
            groups.append((name, sel & (magpsf >= lo) & (magpsf < hi)))
        for name, m in groups:
            mm = m & ok
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                rows.append((
                    label, name, int(m.sum()), int(mm.sum()), mm.sum() / max(m.sum(), 1),
                    float(np.nanmedian(d[mm])) if mm.any() else np.nan, robust_sigma(d[mm]),
                    robust_sigma(nd[mm]), robust_sigma(dap[m]),
                    float(np.nanmedian(ratio[mm])) if mm.any() else np.nan,
                ))
    names = ("sample", "bin", "n", "n_measured", "frac_measured", "median_dmag", "rstd_dmag", "rstd_pull", "rstd_magap", "median_err_ratio")
    return Table(rows=rows, names=names)


def blank_sky_pulls(batch, table, *, n_per_alert=8, seed=0, config=None):
    """Pulls ``flux / flux_err`` of forced PSF fits at empty places of the difference
    cutouts of ``batch`` (an :class:`~ztfpsf.io.alerts.AlertBatch`), with each alert's own
    PSF (``table``: its results, same order) and noise model: a check of ``flux_err``
    (their spread is 1 when the uncertainties are right; ZTF's sigmapsf is not needed).

    Places are drawn at random at least ``stamp_size/2`` px inside the cutout, 3 FWHM
    from the candidate and 2 FWHM + 2 px from any source of the science cutout. Returns
    ``(pulls, alert_index)`` arrays.
    """
    from ztfpsf import fit_stamps
    from ztfpsf.alerts import AlertPSFConfig
    from ztfpsf.alerts.pixels import cut_frames, detect, prepare
    from ztfpsf.flags import BAD
    from ztfpsf.stamps import stamp_origin

    cfg = config or AlertPSFConfig()
    rng = np.random.default_rng(seed)
    prep = prepare(batch, cfg)
    peaks = detect(batch.science, prep.sky[:, 0], prep.measurable, batch.shape[:, 0], batch.offset, cfg.detect_snr)
    fwhm, alpha = np.asarray(table["fwhm"], float), np.asarray(table["alpha"], float)
    use = prep.measurable & ((np.asarray(table["flags"]) & BAD) == 0) & np.isfinite(fwhm)
    h = cfg.stamp_size // 2
    places = []
    for i in np.nonzero(use)[0]:
        (ny, nx), (ox, oy) = batch.shape[i, 2], batch.offset[i]
        if nx <= 2 * h + 1 or ny <= 2 * h + 1:
            continue
        x = ox + rng.uniform(h, nx - 1 - h, 10 * n_per_alert)
        y = oy + rng.uniform(h, ny - 1 - h, 10 * n_per_alert)
        keep = np.hypot(x - prep.center[i, 0], y - prep.center[i, 1]) >= 3 * fwhm[i]
        mine = peaks.alert == i
        if mine.any():
            near = np.hypot(x[:, None] - peaks.x[mine], y[:, None] - peaks.y[mine]).min(axis=1)
            keep &= near >= 2 * fwhm[i] + 2
        places += [(i, xx, yy) for xx, yy in zip(x[keep][:n_per_alert], y[keep][:n_per_alert])]
    if not places:
        return np.zeros(0), np.zeros(0, int)
    idx, x, y = (np.array(v) for v in zip(*places))
    # the noise model of the forced fit, over the whole cutout
    nref = batch.field("nframesref")
    nref = np.where(np.isfinite(nref) & (nref > 0), nref, 15)
    var = np.broadcast_to(prep.sky[:, 2, 1, None, None] ** 2, batch.difference.shape).copy()
    for k, name, scale in ((0, "science", np.ones(len(batch))), (1, "template", 1.0 / nref)):
        src = np.nan_to_num(np.clip(batch.cutout(name) - prep.sky[:, k, 0, None, None], 0.0, None)) / cfg.gain
        var += np.where(np.isfinite(prep.sky[:, k, 0]), scale, 0.0)[:, None, None] * src
    x0, y0 = stamp_origin(x, y, cfg.stamp_size)
    data = cut_frames(batch.difference, idx, x0, y0, cfg.stamp_size)
    v = np.where(np.isfinite(data), cut_frames(var, idx, x0, y0, cfg.stamp_size), np.nan)
    fit = fit_stamps(
        data, v, model="moffat", method=cfg.method, dtype=cfg.dtype,
        fixed={"fwhm": fwhm[idx], "alpha": alpha[idx], "x": x - x0, "y": y - y0},
    )
    pulls = np.asarray(fit["flux"], float) / np.asarray(fit["flux_err"], float)
    good = np.isfinite(pulls)  # a place on masked pixels has no fit
    return pulls[good], idx[good]


def _acceptance(cmp):
    real = cmp[cmp["sample"] == "rb >= 0.5"]
    allrow = real[real["bin"] == "all"][0]
    checks = [
        ("median mag - magpsf within +-0.02 mag", abs(allrow["median_dmag"]) <= 0.02, f"{allrow['median_dmag']:+.4f}"),
        ("robust std of normalised difference < 1.3", allrow["rstd_pull"] < 1.3, f"{allrow['rstd_pull']:.3f}"),
        (">= 95 % measured (flags == 0)", allrow["frac_measured"] >= 0.95, f"{allrow['n_measured']}/{allrow['n']} = {allrow['frac_measured']:.3f}"),
    ]
    for row in real[real["bin"] != "all"]:
        checks.append((
            f"bin {row['bin']}: rstd(mag - magpsf) <= rstd(magap - magpsf)",
            row["rstd_dmag"] <= row["rstd_magap"], f"{row['rstd_dmag']:.3f} vs {row['rstd_magap']:.3f}",
        ))
    return checks


def main(argv=None):
    import ztfpsf

    ztfpsf.configure()  # a benchmark owns its process: float64, all cores, compilation cache
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="directory (searched recursively) or files of ZTF alerts")
    ap.add_argument("--docs", default=str(Path(__file__).resolve().parents[1] / "docs"), help="where to write alerts_mag.png and alerts_fwhm.png")
    ap.add_argument("--out", help="also write the result table (Parquet)")
    ap.add_argument("--gain", type=float, default=None, help="e-/ADU (default ZTF nominal 6.2)")
    ap.add_argument("--ablations", action="store_true", help="also measure with each design choice switched off (AlertPSFConfig switches) and print the comparison")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore", RuntimeWarning)

    from ztfpsf.alerts import measure_batch
    from ztfpsf.io.alerts import AlertBatch, find_alert_files, iter_batches
    from ztfpsf.apcorr import robust_sigma
    from ztfpsf.plots_alerts import plot_fwhm_comparison, plot_mag_comparison

    files = find_alert_files([args.data])
    t0 = time.perf_counter()
    alerts = AlertBatch.concat(iter_batches(files, on_error=lambda path, err: print(f"skipped: {err}", file=sys.stderr)))
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = measure_batch(alerts, gain=args.gain)
    t_fit = time.perf_counter() - t0
    nights = sorted(set(int(n) for n in table["nid"]))
    print(f"{len(alerts)} alerts from {len(files)} files (nights {nights[0]}-{nights[-1]}): read in {t_read:.1f} s, measured in {t_fit:.1f} s (compilation included)\n")

    cmp = compare_with_pipeline(table)
    for c in ("frac_measured", "median_dmag", "rstd_dmag", "rstd_pull", "rstd_magap", "median_err_ratio"):
        cmp[c].info.format = ".3f"
    cmp.pprint(max_lines=-1, max_width=-1)
    print()
    ok_all = True
    for name, ok, value in _acceptance(cmp):
        ok_all &= bool(ok)
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {value}")

    pulls, _ = blank_sky_pulls(alerts, table)
    print(f"\nblank-sky pulls flux/flux_err ({pulls.size} places): robust std {robust_sigma(pulls):.3f}, median {np.median(pulls):+.3f}, |pull| > 5: {np.mean(np.abs(pulls) > 5):.3f}")
    real = np.asarray(table["rb"]) >= 0.5
    ok = real & (np.asarray(table["flags"]) == 0)
    sources, counts = np.unique(np.asarray(table["psf_source"])[real], return_counts=True)
    print("psf_source (rb >= 0.5): " + ", ".join(f"{s} {c}" for s, c in zip(sources, counts)))
    flagged = table[real & ~ok]
    if len(flagged):
        from ztfpsf.flags import decode

        print("flagged (rb >= 0.5): " + "; ".join(f"{r.objectId} {'|'.join(decode(r.flags))} ({r.psf_source})" for r in flagged.itertuples()))
    chi2 = np.asarray(table["chi2"]) / np.maximum(np.asarray(table["dof"]), 1)
    print(f"median chi2/dof of the forced fits (rb >= 0.5, flags = 0): {np.median(chi2[ok]):.3f}")

    docs = Path(args.docs)
    plot_mag_comparison(table, docs / "alerts_mag.png")
    plot_fwhm_comparison(table, docs / "alerts_fwhm.png")
    print(f"figures: {docs / 'alerts_mag.png'}, {docs / 'alerts_fwhm.png'}")
    if args.out:
        table.to_parquet(args.out, index=False)
        print(f"table: {args.out}")
    if args.ablations:
        _ablations(alerts, table, args.gain)
    return 0 if ok_all else 1


ABLATIONS = (
    ("default: science stars, position free, sky + source noise", {}),
    ("shape fitted on the candidate itself (no stars)", {"free_shape": True}),
    ("stars of the template cutout instead of the science", {"star_cutout": "template"}),
    ("position held at the packet's (xpos, ypos)", {"fit_position": False}),
    ("sky noise only (no source Poisson term)", {"source_noise": False}),
)


def _ablations(alerts, default, gain):
    """mag - magpsf over rb >= 0.5 (any flags, so that every variant has the same alerts)."""
    from ztfpsf.alerts import AlertPSFConfig, measure_batch
    from ztfpsf.apcorr import robust_sigma

    print("\nablations (rb >= 0.5, all measured alerts whatever their flags):")
    print(f"  {'variant':<58} {'n':>4} {'median':>8} {'rstd':>6} {'rstd <16':>9} {'16-18':>6} {'18-19.5':>8} {'pull rstd':>9}")
    for name, change in ABLATIONS:
        cfg = AlertPSFConfig(**change) if gain is None else AlertPSFConfig(gain=gain, **change)
        t = default if not change else measure_batch(alerts, config=cfg)
        magpsf = np.asarray(t["magpsf"], float)
        d = np.asarray(t["mag"], float) - magpsf
        m = (np.asarray(t["rb"]) >= 0.5) & np.isfinite(d)
        pull = d / np.hypot(np.asarray(t["mag_err"], float), np.asarray(t["sigmapsf"], float))
        bins = [robust_sigma(d[m & (magpsf >= lo) & (magpsf < hi)]) for lo, hi in ((-99, 16), (16, 18), (18, 19.5))]
        print(f"  {name:<58} {m.sum():>4} {np.median(d[m]):>+8.3f} {robust_sigma(d[m]):>6.3f} {bins[0]:>9.3f} {bins[1]:>6.3f} {bins[2]:>8.3f} {robust_sigma(pull[m]):>9.3f}")
        if change.get("free_shape"):
            print(f"  {'':<58} (median fitted alpha {np.nanmedian(np.asarray(t['alpha'])[m]):.2f})")


if __name__ == "__main__":
    sys.exit(main())
