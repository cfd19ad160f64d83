"""Validate ``ztfpsf alert`` on real ZTF alert packets against the pipeline's magpsf.

Not a test: it reads a directory of alert files given on the command line (e.g. the
project's shared data, ``../shared/data``: 240 public alerts, Avro and Parquet), measures
every alert, prints the acceptance table (median and robust scatter of mag - magpsf,
normalised differences, the pipeline's own magap - magpsf scatter, the fraction
measured, for rb >= 0.5 and rb < 0.5), the blank-sky check of the flux uncertainties,
the PSF sources used, and writes the figures ``docs/alerts_mag.png`` and
``docs/alerts_fwhm.png`` (``--docs`` to put them elsewhere) and the table (``--out``).

    python benchmarks/validate_alerts.py ../shared/data [--out alerts.parquet]

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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="directory (searched recursively) or files of ZTF alerts")
    ap.add_argument("--docs", default=str(Path(__file__).resolve().parents[1] / "docs"), help="where to write alerts_mag.png and alerts_fwhm.png")
    ap.add_argument("--out", help="also write the result table (Parquet)")
    ap.add_argument("--gain", type=float, default=None, help="e-/ADU (default ZTF nominal 6.2)")
    ap.add_argument("--ablations", action="store_true", help="also measure with each design choice switched off (AlertPSFConfig switches) and print the comparison")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore", RuntimeWarning)

    from ztfpsf.alerts import blank_sky_pulls, compare_with_pipeline, measure_alerts, robust_std
    from ztfpsf.io.alerts import find_alert_files, read_alerts
    from ztfpsf.plots_alerts import plot_fwhm_comparison, plot_mag_comparison

    files = find_alert_files([args.data])
    t0 = time.perf_counter()
    alerts = []
    for f in files:
        try:
            alerts.extend(read_alerts(f))
        except ValueError as err:
            print(f"skipped: {err}", file=sys.stderr)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = measure_alerts(alerts, gain=args.gain)
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
    print(f"\nblank-sky pulls flux/flux_err ({pulls.size} places): robust std {robust_std(pulls):.3f}, median {np.median(pulls):+.3f}, |pull| > 5: {np.mean(np.abs(pulls) > 5):.3f}")
    real = np.asarray(table["rb"]) >= 0.5
    ok = real & (np.asarray(table["flags"]) == 0)
    sources, counts = np.unique(np.asarray(table["psf_source"])[real], return_counts=True)
    print("psf_source (rb >= 0.5): " + ", ".join(f"{s} {c}" for s, c in zip(sources, counts)))
    flagged = table[real & ~ok]
    if len(flagged):
        from ztfpsf.flags import decode

        print("flagged (rb >= 0.5): " + "; ".join(f"{r['objectId']} {'|'.join(decode(r['flags']))} ({r['psf_source']})" for r in flagged))
    chi2 = np.asarray(table["chi2"]) / np.maximum(np.asarray(table["dof"]), 1)
    print(f"median chi2/dof of the forced fits (rb >= 0.5, flags = 0): {np.median(chi2[ok]):.3f}")

    docs = Path(args.docs)
    plot_mag_comparison(table, docs / "alerts_mag.png")
    plot_fwhm_comparison(table, docs / "alerts_fwhm.png")
    print(f"figures: {docs / 'alerts_mag.png'}, {docs / 'alerts_fwhm.png'}")
    if args.out:
        table.write(args.out, format="parquet", overwrite=True)
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
    from ztfpsf.alerts import AlertPSFConfig, measure_alerts, robust_std

    print("\nablations (rb >= 0.5, all measured alerts whatever their flags):")
    print(f"  {'variant':<58} {'n':>4} {'median':>8} {'rstd':>6} {'rstd <16':>9} {'16-18':>6} {'18-19.5':>8} {'pull rstd':>9}")
    for name, change in ABLATIONS:
        cfg = AlertPSFConfig(**change) if gain is None else AlertPSFConfig(gain=gain, **change)
        t = default if not change else measure_alerts(alerts, config=cfg)
        magpsf = np.asarray(t["magpsf"], float)
        d = np.asarray(t["mag"], float) - magpsf
        m = (np.asarray(t["rb"]) >= 0.5) & np.isfinite(d)
        pull = d / np.hypot(np.asarray(t["mag_err"], float), np.asarray(t["sigmapsf"], float))
        bins = [robust_std(d[m & (magpsf >= lo) & (magpsf < hi)]) for lo, hi in ((-99, 16), (16, 18), (18, 19.5))]
        print(f"  {name:<58} {m.sum():>4} {np.median(d[m]):>+8.3f} {robust_std(d[m]):>6.3f} {bins[0]:>9.3f} {bins[1]:>6.3f} {bins[2]:>8.3f} {robust_std(pull[m]):>9.3f}")
        if change.get("free_shape"):
            print(f"  {'':<58} (median fitted alpha {np.nanmedian(np.asarray(t['alpha'])[m]):.2f})")


if __name__ == "__main__":
    sys.exit(main())
