"""``ztfpsf alert``: PSF photometry of the candidates of ZTF alert packets (Avro or Parquet).

A thin layer over :func:`ztfpsf.alerts.measure_files`: every file given (and every alert
file in the directories given) is read once, as one stream of batches, in this process;
alerts borrow PSFs from the other alerts of their image, exposure and night across all
files. Results are written as they are finished (Parquet), so memory stays bounded
whatever the input size. ``--workers N`` (N > 1) or ``--scheduler`` measure the files
on Dask instead, one task per file (PSFs then borrowed within a file). A file that cannot
be read is reported and skipped; the others are measured (exit code 1 when some file
failed, 2 when none could be read).
"""

import functools
import logging
import sys
from pathlib import Path

import numpy as np

HELP = "PSF photometry of ZTF alert candidates (Avro/Parquet packets) against the pipeline's magpsf"
log = logging.getLogger("ztfpsf.alert")

_SHOW = ("objectId", "candid", "mag", "mag_err", "magpsf", "sigmapsf", "fwhm", "flags", "psf_source")


def add_arguments(p):
    from ..io.alerts import DEFAULT_CHUNK

    p.add_argument("paths", nargs="+", metavar="FILE", help="alert files (.avro, .parquet) or directories searched for them")
    p.add_argument("--out", metavar="FILE.parquet", help="write the result table here (Parquet, streamed; .ecsv/.csv/.fits by suffix); default: print it")
    p.add_argument("--gain", type=float, default=None, help="e-/ADU for the sources' Poisson noise (default: ZTF nominal 6.2)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help=f"alerts decoded and measured at a time (default {DEFAULT_CHUNK}: ~0.1 GB of cutouts)")
    p.add_argument("--workers", type=int, default=1, help="Dask worker processes, one file per task (default 1: this process, all files one stream)")
    p.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (tcp://host:8786): one file per task")


def measure_file(path, config=None, chunk_size=None):
    """One file's results as a DataFrame (a Dask task: module level, picklable)."""
    import pandas as pd

    from ..alerts import measure_files

    frames = list(measure_files([path], config=config, **({"chunk_size": chunk_size} if chunk_size else {})))
    return pd.concat(frames, ignore_index=True) if frames else None


# ---- command -------------------------------------------------------------------------
def _config(args):
    from ..alerts import AlertPSFConfig
    from ..cli import UserError

    if args.gain is not None and not args.gain > 0:
        raise UserError(f"--gain must be > 0 e-/ADU; got {args.gain}")
    if args.chunk < 1:
        raise UserError(f"--chunk must be >= 1; got {args.chunk}")
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


def _frames(files, cfg, args, failed):
    """Result DataFrames as they are finished; failed files appended to ``failed``."""
    from ..alerts import measure_files

    if args.workers <= 1 and args.scheduler is None:
        yield from measure_files(files, config=cfg, chunk_size=args.chunk, on_error=lambda path, err: failed.append((str(path), str(err))))
        return
    from ..parallel import map_files

    task = functools.partial(measure_file, config=cfg, chunk_size=args.chunk)
    for r in map_files(task, files, workers=args.workers, scheduler=args.scheduler, desc="alert files"):
        if not r.ok:
            failed.append((r.path, r.error))
        elif r.value is not None:
            yield r.value


class _Summary:
    """Counts for the closing line, gathered frame by frame."""

    def __init__(self):
        self.n, self.ok, self.d = 0, 0, []

    def add(self, frame):
        ok = frame["flags"].to_numpy() == 0
        self.n += len(frame)
        self.ok += int(ok.sum())
        self.d.append((frame["mag"] - frame["magpsf"]).to_numpy(float)[ok])

    def line(self):
        d = np.concatenate(self.d) if self.d else np.zeros(0)
        med = f", median mag - magpsf {np.nanmedian(d):+.3f}" if d.size else ""
        return f"{self.n} alerts, {self.ok} measured with flags == 0{med}"


class _NoResults(Exception):
    """No alert could be read: nothing to write."""


def _stream_parquet(frames, out, cfg, summary):
    """Write frames to ``out`` as they come, atomically (a temporary file renamed at the
    end; nothing is left when no alert could be read)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..alerts.results import table_meta
    from ..io.results import METADATA_KEY, atomic_path

    with atomic_path(out) as tmp:
        writer = None
        try:
            for frame in frames:
                if len(frame) == 0:
                    continue
                summary.add(frame)
                table = pa.Table.from_pandas(frame, preserve_index=False)
                if writer is None:
                    meta = {METADATA_KEY: json.dumps(table_meta(cfg)).encode()}
                    writer = pq.ParquetWriter(tmp, table.schema.with_metadata(meta))
                writer.write_table(table.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise _NoResults


def _write_table(frames, out):
    """Formats other than Parquet: all rows at once through astropy, atomically."""
    import pandas as pd
    from astropy.table import Table

    from ..io.results import atomic_write

    fmt = {".ecsv": "ascii.ecsv", ".csv": "ascii.csv", ".fits": "fits"}.get(out.suffix.lower(), "ascii.ecsv")
    table = Table.from_pandas(pd.concat(frames, ignore_index=True))
    atomic_write(out, lambda tmp: table.write(tmp, format=fmt))


def run(args):
    import pandas as pd

    from ..cli import UserError

    cfg = _config(args)
    files = _files(args)
    failed, summary, kept = [], _Summary(), []
    out = Path(args.out) if args.out else None
    frames = _frames(files, cfg, args, failed)
    try:
        if out is not None and out.suffix.lower() in (".parquet", ".parq"):
            _stream_parquet(frames, out, cfg, summary)
        else:
            for frame in frames:
                if len(frame):
                    summary.add(frame)
                    kept.append(frame)
            if out is not None and kept:
                _write_table(kept, out)
    except _NoResults:
        pass
    except OSError as err:
        raise UserError(f"{out}: cannot write: {err.strerror or err}") from None
    if summary.n == 0:
        if len(failed) == 1:
            raise UserError(failed[0][1])
        for _, err in failed:
            print(f"ztfpsf alert: {err}", file=sys.stderr)
        raise UserError(f"none of the {len(files)} files could be read ({len(failed)} failed)")
    for _, err in failed:
        print(f"ztfpsf alert: {err}", file=sys.stderr)
    if out is not None:
        log.info("wrote %s", out)
    else:
        table = pd.concat(kept, ignore_index=True)[list(_SHOW)]
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(summary.line() + (f"; {len(failed)} file(s) failed" if failed else ""))
    return 1 if failed else 0
