"""``ztfpsf alert``: PSF photometry of the candidates of ZTF alert packets (Avro or Parquet).

One file: read and measured here. Several files: two passes over the files with
:func:`ztfpsf.parallel.map_files` (a Dask LocalCluster by default, ``--scheduler`` for an
existing cluster, ``--workers 1`` for this process): the first fits the PSF stars of every
file, so that alerts can borrow the PSF alpha and shape of their exposure and night from
the other files (:func:`ztfpsf.alerts.psf_groups`); the second measures every file with
those groups. A file that cannot be read is reported and skipped; the others are measured
(exit code 1 when some file failed, 2 when none could be read).
"""

import functools
import logging
import os
import sys
from pathlib import Path

import numpy as np

HELP = "PSF photometry of ZTF alert candidates (Avro/Parquet packets) against the pipeline's magpsf"
log = logging.getLogger("ztfpsf.alert")

_SHOW = ("objectId", "candid", "mag", "mag_err", "magpsf", "sigmapsf", "fwhm", "flags", "psf_source")


def add_arguments(p):
    p.add_argument("paths", nargs="+", metavar="FILE", help="alert files (.avro, .parquet) or directories searched for them")
    p.add_argument("--out", metavar="FILE.parquet", help="write the result table here (Parquet; .ecsv/.csv/.fits by suffix); default: print it")
    p.add_argument("--gain", type=float, default=None, help="e-/ADU for the sources' Poisson noise (default: ZTF nominal 6.2)")
    p.add_argument("--workers", type=int, default=None, help="Dask worker processes for several files (default: the usable cores; 1: this process)")
    p.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (tcp://host:8786)")
    p.add_argument("--no-groups", action="store_true", help="measure each file on its own stars only (no PSF borrowed from other files)")


# ---- per-file tasks (module level: picklable for Dask) --------------------------------
def file_stars(path, config=None):
    """Pass 1: the PSF-star table of one file (with the alerts' group keys)."""
    from ..alerts import fit_psf_stars
    from ..io.alerts import read_alerts

    alerts = read_alerts(path, strict=False)
    return fit_psf_stars(alerts, config) if alerts else None


def measure_file(path, config=None, groups=None):
    """Pass 2: the measurement table of one file's alerts."""
    from ..alerts import measure_alerts
    from ..io.alerts import read_alerts

    alerts = read_alerts(path, strict=False)
    return measure_alerts(alerts, config=config, groups=groups) if alerts else None


# ---- command -------------------------------------------------------------------------
def _config(args):
    from ..alerts import AlertPSFConfig

    if args.gain is not None and not args.gain > 0:
        from ..cli import UserError

        raise UserError(f"--gain must be > 0 e-/ADU; got {args.gain}")
    return AlertPSFConfig() if args.gain is None else AlertPSFConfig(gain=args.gain)


def _files(args):
    from ..cli import UserError
    from ..io.alerts import find_alert_files

    for p in args.paths:
        if not Path(p).exists():
            raise UserError(f"{p}: no such file or directory")
    files = find_alert_files(args.paths)
    if not files:
        raise UserError(f"no alert files (.avro, .parquet) in {', '.join(args.paths)}")
    return files


def _run_files(files, cfg, args):
    """Result tables of every file, in order, and the (path, error) of the failed ones."""
    from astropy.table import vstack

    from ..alerts import psf_groups
    from ..parallel import map_files

    kw = {"workers": args.workers, "scheduler": args.scheduler}
    groups = None
    if len(files) > 1 and not args.no_groups:
        stars = map_files(functools.partial(file_stars, config=cfg), files, desc="PSF stars", **kw)
        tables = [r.value for r in stars if r.ok and r.value is not None and len(r.value)]
        groups = psf_groups(vstack(tables, metadata_conflicts="silent"), cfg) if tables else {}
    results = map_files(functools.partial(measure_file, config=cfg, groups=groups), files, desc="alerts", **kw)
    tables = [r.value for r in results if r.ok and r.value is not None]
    failed = [(r.path, r.error) for r in results if not r.ok]
    return tables, failed


def _write(table, out):
    from ..cli import UserError

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    fmt = "parquet" if out.suffix.lower() in (".parquet", ".parq") else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt:
            table.write(tmp, format=fmt, overwrite=True)
        else:
            table.write(tmp, format={".ecsv": "ascii.ecsv", ".csv": "ascii.csv", ".fits": "fits"}.get(out.suffix.lower(), "ascii.ecsv"), overwrite=True)
        os.replace(tmp, out)  # atomic: no half-written result file
    except OSError as err:
        raise UserError(f"{out}: cannot write: {err.strerror or err}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def summarize(table):
    """One-line summary: alerts, measured (flags == 0), median mag - magpsf of those."""
    ok = np.asarray(table["flags"]) == 0
    d = np.asarray(table["mag"] - table["magpsf"])[ok]
    med = f", median mag - magpsf {np.nanmedian(d):+.3f}" if ok.any() else ""
    return f"{len(table)} alerts, {int(ok.sum())} measured with flags == 0{med}"


def run(args):
    from astropy.table import vstack

    from ..cli import UserError

    cfg = _config(args)
    files = _files(args)
    tables, failed = _run_files(files, cfg, args)
    for path, err in failed:
        print(f"ztfpsf alert: {path}: {err}", file=sys.stderr)
    if not tables:
        if len(failed) == 1:
            raise UserError(failed[0][1].split(": ", 1)[-1])
        raise UserError(f"none of the {len(files)} files could be read ({len(failed)} failed)")
    table = vstack(tables, metadata_conflicts="silent")
    if args.out:
        _write(table, args.out)
        log.info("wrote %s", args.out)
    else:
        show = table[[c for c in _SHOW if c in table.colnames]]
        for c in ("mag", "mag_err", "magpsf", "sigmapsf", "fwhm"):
            show[c].info.format = ".3f"
        show.pprint(max_lines=-1, max_width=-1)
    print(summarize(table) + (f"; {len(failed)} file(s) failed" if failed else ""))
    return 1 if failed else 0
