"""End to end: one simulated ZTF quadrant (read, select, fit, write), cold and warm, and
many quadrants on a local Dask cluster.

    python benchmarks/bench_pipeline.py                       # 64 quadrants, 2 workers
    python benchmarks/bench_pipeline.py --quadrants 8 --workers 2

Quadrants are simulated once into ``--data`` (default /tmp/ztfpsf-bench; ~55 MB each) with
distinct CCD/quadrant ids and seeds, each with its catalogue beside it.
"""

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ztfpsf
from ztfpsf.config import FitConfig
from ztfpsf.io.results import read_json
from ztfpsf.pipeline import output_paths, process_image, run
from ztfpsf.simulate import simulate_quadrant


def make_quadrants(data_dir, count):
    data_dir = Path(data_dir)
    paths = []
    for rcid in range(count):
        ccd, qid = rcid // 4 + 1, rcid % 4 + 1
        existing = sorted(data_dir.glob(f"ztf_*_c{ccd:02d}_o_q{qid}_sciimg.fits"))
        if existing:
            paths.append(existing[0])
            continue
        paths.append(Path(simulate_quadrant(data_dir, seed=100 + rcid, ccd=ccd, qid=qid)["sciimg"]))
        print(f"  simulated {paths[-1].name}", flush=True)
    return paths


def cli_seconds(image, out, env):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ztfpsf", "-q", "fit", str(image), "--catalog", "auto", "--out", str(out), "--overwrite"],
                   env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quadrants", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "ztfpsf-bench"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    print(f"ztfpsf {ztfpsf.__version__}; {os.cpu_count()} CPU cores; quadrants in {args.data}")
    images = make_quadrants(args.data, args.quadrants)
    config = FitConfig(catalog="auto")
    out = Path(tempfile.mkdtemp(prefix="ztfpsf-bench-out-"))
    try:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, ZTFPSF_CACHE_DIR=cache)
            cold = cli_seconds(images[0], out / "cli", env)
            warm = cli_seconds(images[0], out / "cli", env)
        print("\none quadrant, `ztfpsf fit` in a fresh process (Python start-up and imports included):")
        print(f"  cold (empty compilation cache) {cold:6.2f} s")
        print(f"  warm (populated cache)         {warm:6.2f} s")

        process_image(images[0], config.replace(overwrite=True), out / "warm")  # compile in this process
        t0 = time.perf_counter()
        summary = process_image(images[0], config.replace(overwrite=True), out / "warm")
        steady = time.perf_counter() - t0
        stages = ", ".join(f"{k} {v:.2f}" for k, v in summary["timings"].items())
        print(f"  warm, in a running process     {steady:6.2f} s  ({summary['n_fitted']} stars; {stages})")

        t0 = time.perf_counter()
        record = run(images, config, out / "many", workers=args.workers)
        wall = time.perf_counter() - t0
        n_stars = sum(read_json(output_paths(p, out / "many")["summary"]).get("n_fitted", 0) for p in images)
        print(f"\n{len(images)} quadrants on a LocalCluster of {args.workers} workers: {wall:.1f} s wall "
              f"({wall / len(images):.2f} s per quadrant, {n_stars} stars, {record['n_ok']} ok, {record['n_failed']} failed; "
              "cluster start and each worker's compilation included)")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
