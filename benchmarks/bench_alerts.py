"""ZTF alerts at broker scale: a night of alerts in one Parquet file, end to end.

The real packets of a folder (the 240 of ``../shared/data``) are replicated, with new
``candid``, to ``--n`` alerts (default 100,000) in one Parquet file of Fink's layout (one
row per alert, ``candidate`` and the cutouts as structs), with four broken packets among
them (a truncated difference stamp, no difference cutout, an empty stamp, no candidate).
The file is then measured by ``ztfpsf.alerts.measure_files`` in a fresh process (reading,
decoding, every fit and the result file included; JAX start-up and compilation too, with
the persistent compilation cache as it is): alerts/s, CPU seconds, peak memory (max RSS),
seconds per stage. The peer, in the same process: the same library called alert by alert
(``measure_batch`` on one alert at a time, the per-alert structure of the old code).

    python benchmarks/bench_alerts.py ../shared/data [--n 100000] [--chunk 2048] [--workdir DIR]

Machine load matters (the peer and the file share the machine with whatever else runs):
the load average before and after is printed.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KEEP = ("objectId", "candid", "schemavsn", "candidate", "cutoutScience", "cutoutTemplate", "cutoutDifference")


def machine():
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def _packets(folder):
    """Every packet of the folder as a dict of the fields kept (Avro and Parquet)."""
    import fastavro
    import pyarrow.parquet as pq

    from ztfpsf.io.alerts import find_alert_files

    out = []
    for f in find_alert_files([folder]):
        if f.suffix == ".avro":
            with open(f, "rb") as fh:
                out += [{k: r.get(k) for k in KEEP} for r in fastavro.reader(fh)]
        else:
            out += pq.read_table(f, columns=list(KEEP)).to_pylist()
    return out


def _broken(packet, kind):
    p = {k: (dict(v) if isinstance(v, dict) else v) for k, v in packet.items()}
    if kind == "truncated":
        p["cutoutDifference"]["stampData"] = p["cutoutDifference"]["stampData"][:3000]
    elif kind == "missing":
        p["cutoutDifference"] = None
    elif kind == "empty":
        p["cutoutScience"]["stampData"] = p["cutoutTemplate"]["stampData"] = p["cutoutDifference"]["stampData"] = b""
    elif kind == "no candidate":
        p["candidate"] = None
    return p


BROKEN = ("truncated", "missing", "empty", "no candidate")


def make_night(folder, n, path):
    """Write ``n`` alerts (the folder's packets replicated, new candids, four broken) to
    ``path``; returns the candid of each broken packet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    packets = _packets(folder)
    base = pa.Table.from_pylist(packets)
    bad = pa.Table.from_pylist([_broken(packets[k], kind) for k, kind in enumerate(BROKEN)], schema=base.schema)
    reps = -(-(n - len(BROKEN)) // len(packets))
    table = pa.concat_tables([base] * reps).slice(0, n - len(BROKEN))
    step = max(1, table.num_rows // (len(BROKEN) + 1))
    parts = []
    for k in range(len(BROKEN)):
        parts += [table.slice(k * step, step), bad.slice(k, 1)]
    parts.append(table.slice(len(BROKEN) * step))
    table = pa.concat_tables(parts)
    candid = 9_000_000_000_000_000_000 + np.arange(table.num_rows, dtype=np.int64)
    table = table.set_column(table.schema.get_field_index("candid"), "candid", pa.array(candid))
    pq.write_table(table, path, row_group_size=8192)
    broken = [int(candid[(k + 1) * step + k]) for k in range(len(BROKEN))]
    return dict(zip(BROKEN, broken)), len(packets)


def measure(path, out, chunk, peer_n):
    """In this (fresh) process: the file end to end, then the per-alert peer."""
    t_start = time.perf_counter()
    import pyarrow as pa
    import pyarrow.parquet as pq

    import ztfpsf
    from ztfpsf.alerts import measure_batch, measure_files
    from ztfpsf.io.alerts import batch_from_table

    ztfpsf.configure()
    timings = {}
    c0, t0 = time.process_time(), time.perf_counter()
    writer, n, flags = None, 0, []
    for frame in measure_files([path], chunk_size=chunk, timings=timings):
        table = pa.Table.from_pandas(frame, preserve_index=False)
        writer = writer or pq.ParquetWriter(out, table.schema)
        writer.write_table(table)
        n += len(frame)
    writer.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    result = dict(n=n, wall=wall, cpu=cpu, since_start=time.perf_counter() - t_start, timings=timings,
                  max_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
    # a second pass: compilation done, the steady state of a long-running consumer
    c0, t0 = time.process_time(), time.perf_counter()
    n2 = sum(len(f) for f in measure_files([path], chunk_size=chunk))
    result.update(n2=n2, wall2=time.perf_counter() - t0, cpu2=time.process_time() - c0)
    # the peer: one alert per call
    rows = pq.ParquetFile(path).read_row_group(0).slice(0, peer_n + 10)
    for k in range(10):  # warm-up: compile the one-alert programs
        measure_batch(batch_from_table(rows.slice(k, 1)))
    c0, t0 = time.process_time(), time.perf_counter()
    for k in range(10, 10 + peer_n):
        measure_batch(batch_from_table(rows.slice(k, 1)))
    result.update(peer_n=peer_n, peer_wall=time.perf_counter() - t0, peer_cpu=time.process_time() - c0)
    measure_batch(rows.slice(10, peer_n))  # compile the programs of this batch size
    t0 = time.perf_counter()
    measure_batch(rows.slice(10, peer_n))
    result.update(batch_wall=time.perf_counter() - t0)
    print(json.dumps(result))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="folder of real alert packets (Avro/Parquet), e.g. ../shared/data")
    ap.add_argument("--n", type=int, default=100_000, help="alerts in the night file")
    ap.add_argument("--chunk", type=int, default=2048, help="alerts decoded and measured at a time (the library's default)")
    ap.add_argument("--peer", type=int, default=200, help="alerts measured one per call by the peer")
    ap.add_argument("--workdir", help="where to write the night file and the results (default: a temporary folder)")
    ap.add_argument("--measure", nargs=2, metavar=("NIGHT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        return measure(*args.measure, args.chunk, args.peer)

    import pandas as pd

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        night, out = work / f"night_{args.n}.parquet", work / f"night_{args.n}.alerts.parquet"
        t0 = time.perf_counter()
        broken, n_real = make_night(args.data, args.n, night)
        print(f"night file: {args.n:,} alerts ({n_real} real packets replicated, {len(broken)} broken), "
              f"{night.stat().st_size / 1e9:.2f} GB, written in {time.perf_counter() - t0:.0f} s")
        load0 = os.getloadavg()
        proc = subprocess.run([sys.executable, __file__, args.data, "--measure", str(night), str(out), "--chunk", str(args.chunk), "--peer", str(args.peer)],
                              capture_output=True, text=True)
        load1 = os.getloadavg()
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        res = pd.read_parquet(out, columns=["candid", "flags", "problem", "psf_source"])

    n = r["n"]
    print(f"load average before/after: {load0[0]:.1f} / {load1[0]:.1f} (other work on the machine slows every figure)")
    print(f"\nend to end, fresh process ({r['since_start']:.1f} s with imports), chunks of {args.chunk}:")
    print(f"  {n:,} alerts in {r['wall']:.1f} s = {n / r['wall']:,.0f} alerts/s (compilation included); "
          f"CPU {r['cpu']:.1f} s = {1e3 * r['cpu'] / n:.2f} CPU-ms per alert; peak memory (max RSS) {r['max_rss_gb']:.2f} GB")
    print(f"  second pass (compiled): {r['n2'] / r['wall2']:,.0f} alerts/s, {1e3 * r['cpu2'] / r['n2']:.2f} CPU-ms per alert")
    print("  stage seconds (first pass): " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()))
    peer_rate = r["peer_n"] / r["peer_wall"]
    print(f"\npeer, same process: one alert per call: {peer_rate:.1f} alerts/s ({r['peer_n']} alerts, CPU {1e3 * r['peer_cpu'] / r['peer_n']:.0f} ms per alert); "
          f"the same {r['peer_n']} in one call: {r['peer_n'] / r['batch_wall']:.0f} alerts/s")
    print(f"ratio, the night file (first pass) / the per-alert peer: {n / r['wall'] / peer_rate:.0f}x")

    ok = res["flags"].to_numpy() == 0
    print(f"\nmeasured (flags == 0): {ok.mean():.3f} of all alerts")
    for kind, candid in broken.items():
        row = res[res["candid"] == candid].iloc[0]
        print(f"  broken packet ({kind}): flags {row['flags']}, problem: {row['problem']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
