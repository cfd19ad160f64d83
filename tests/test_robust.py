"""Nothing lost, nothing silently wrong: runs killed at random moments, hostile inputs,
file permissions, and a library that leaves its host's JAX alone."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import ztfpsf
from ztfpsf.flags import BAD, Flag
from ztfpsf.io.results import atomic_write, read_json, read_parquet, save_npy, write_json, write_parquet
from ztfpsf.pipeline import is_done, output_paths
from ztfpsf.simulate import simulate_quadrant, simulate_stamps

REPO = Path(__file__).resolve().parents[1]


def _python(code, **env):
    """Run ``code`` in a fresh interpreter; return its stdout (fails with its stderr)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# --------------------------------------------------------------------------------------
# a library that behaves
# --------------------------------------------------------------------------------------
def test_import_leaves_the_hosts_jax_alone():
    """Before: importing ztfpsf switched on float64, set the CPU devices and a compilation
    cache in the home directory, for the whole host process."""
    out = _python("""
        import json, jax
        keys = ("jax_enable_x64", "jax_num_cpu_devices", "jax_compilation_cache_dir")
        before = {k: getattr(jax.config, k) for k in keys}
        import ztfpsf, ztfpsf.pipeline, ztfpsf.photometry, ztfpsf.cli, ztfpsf.parallel, ztfpsf.simulate
        after = {k: getattr(jax.config, k) for k in keys}
        ztfpsf.configure()
        configured = {k: getattr(jax.config, k) for k in keys}
        print(json.dumps([before, after, configured]))
    """, ZTFPSF_CPU_DEVICES="2", ZTFPSF_CACHE_DIR="/tmp/ztfpsf-test-cache")
    before, after, configured = json.loads(out)
    assert after == before and before["jax_enable_x64"] is False
    assert configured == {"jax_enable_x64": True, "jax_num_cpu_devices": 2, "jax_compilation_cache_dir": "/tmp/ztfpsf-test-cache"}


def test_fits_are_right_where_the_host_left_x64_off():
    """A host that configured JAX first (x64 off, its backend started): float64 fits are
    float64 and right, photometry works, and the host's setting is unchanged after."""
    out = _python("""
        import json, warnings
        import jax, jax.numpy as jnp
        jax.config.update("jax_enable_x64", False)
        jnp.zeros(3).block_until_ready()  # the host's JAX is running
        import numpy as np
        import ztfpsf
        from ztfpsf.simulate import simulate_stamps
        warnings.simplefilter("error")  # e.g. JAX's 'float64 ... truncated to float32'
        data, var, truth = simulate_stamps(300, seed=4)
        t = ztfpsf.fit_stamps(data, var, dtype="float64")
        ok = np.asarray(t["flags"]) == 0
        pull = np.std(((t["x"] - truth["x"]) / t["x_err"])[ok])
        psf = ztfpsf.PSFModel("moffat", [[np.log(2.0)], [np.log(2.0)]], (-0.5, 99.5, -0.5, 99.5))  # fwhm 2, alpha 3
        image = np.full((100, 100), 100.0)
        image[40:57, 40:57] += data[0] - truth["background"][0]
        ph = ztfpsf.photometry(image, psf, np.array([[48.0, 48.0]]), gain=6.2, read_noise=8.0)
        print(json.dumps([float(ok.mean()), float(pull), float(ph["flux"][0]), jax.config.jax_enable_x64]))
    """)
    ok, pull, flux, x64 = json.loads(out)
    assert ok > 0.99 and 0.85 < pull < 1.15 and np.isfinite(flux) and x64 is False


def test_joint_fit_where_the_host_left_x64_off():
    _python("""
        import warnings
        import jax, jax.numpy as jnp
        jax.config.update("jax_enable_x64", False)
        jnp.zeros(3).block_until_ready()
        import numpy as np
        import ztfpsf
        from ztfpsf.simulate import simulate_stamps
        warnings.simplefilter("error")
        data, var, truth = simulate_stamps(200, seed=2)
        psf, table, stats = ztfpsf.fit_psf(data, variance=var, origin=np.zeros((200, 2)), image_shape=(17, 17), mode="shared")
        assert abs(psf.fwhm(8.0, 8.0) / np.median(truth["fwhm"]) - 1) < 0.1
    """)


def test_atomic_writes_honour_the_umask(tmp_path):
    """Before: Parquet and JSON results kept mkstemp's private 0600 through the rename."""
    from astropy.table import Table

    old = os.umask(0o027)
    try:
        written = [
            write_json({"a": 1}, tmp_path / "a.json"),
            write_parquet(Table({"x": [1.0]}), tmp_path / "a.parquet", {}),
            save_npy(np.zeros(3), tmp_path / "a.npy"),
            atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("hi")),
        ]
    finally:
        os.umask(old)
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    assert np.load(tmp_path / "a.npy").shape == (3,) and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.json", "a.npy", "a.parquet", "a.txt"]  # no temporary file left, no '.npy' added twice
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "b.txt", lambda tmp: 1 / 0)
    assert not (tmp_path / "b.txt").exists() and len(list(tmp_path.iterdir())) == 4


# --------------------------------------------------------------------------------------
# killed runs
# --------------------------------------------------------------------------------------
def _consistent(out, images):
    """Every file under a final name is whole; every 'ok' summary and every 'ok' entry of
    run_summary.json belongs to the table beside it. Returns the images done."""
    done = []
    for image in images:
        paths = output_paths(image, out)
        if paths["stars"].exists():
            read_parquet(paths["stars"])  # readable: not half a file
        if paths["summary"].exists():
            summary = read_json(paths["summary"])
            if summary["status"] == "ok":
                assert is_done(image, out), image
                assert read_parquet(paths["stars"]).meta["run"] == summary["run"]
                done.append(image)
    if (out / "run_summary.json").exists():
        for image, entry in read_json(out / "run_summary.json")["images"].items():
            if entry["status"] in ("ok", "skipped"):
                assert is_done(image, out), image
    return done


def test_killed_runs_lose_nothing(tmp_path):
    """A 20-image `ztfpsf fit` killed (with its whole process group) at random moments of
    its work, five times; the rerun finishes the rest and the files agree."""
    images = []
    for i in range(20):
        paths = simulate_quadrant(tmp_path / "in", seed=100 + i, size=(300, 300), nstars=150, ccd=1 + i // 4, qid=1 + i % 4)
        images.append(str(paths["sciimg"]))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ztfpsf", "-q", "fit", *images, "--catalog", "auto", "--out", str(out), "--workers", "1"]
    rng = np.random.default_rng(11)
    killed_after = []
    for _ in range(5):
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.summary.json")} if out.exists() else {}
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:  # until it writes its first result
            now = {p.name: p.stat().st_mtime_ns for p in out.glob("*.summary.json")} if out.exists() else {}
            if now != before:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.25))  # then a random moment of the work (an image takes ~0.1-0.5 s warm)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        killed_after.append(len(_consistent(out, images)))
    assert killed_after[-1] < 20, "the runs finished before they were killed: nothing was tested"
    assert 0 < killed_after[-1]
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    record = read_json(out / "run_summary.json")
    assert record["n_failed"] == 0 and record["n_skipped"] == killed_after[-1] and record["n_ok"] == 20 - killed_after[-1]
    assert sorted(_consistent(out, images)) == sorted(images) == sorted(record["images"])
    assert not [p.name for p in out.iterdir() if p.name.endswith((".part", ".tmp"))]
    stems = {Path(i).name[: -len(".fits")] for i in images}
    assert {p.name.split(".")[0] for p in out.iterdir() if p.name != "run_summary.json"} == stems


def test_rerun_after_a_kill_in_the_middle_of_writing(tmp_path):
    """What a kill during a write leaves: temporary files, a new table without its summary
    (old summary removed first), or an old summary beside a new table. The rerun redoes
    such an image and cleans up."""
    from ztfpsf.cli import main

    images = [str(simulate_quadrant(tmp_path / "in", seed=s, size=(300, 300), nstars=300, ccd=3, qid=s)["sciimg"]) for s in (1, 2)]
    out = tmp_path / "out"
    args = ["-q", "fit", *images, "--catalog", "auto", "--out", str(out), "--workers", "1", "--mag-range", "12", "19"]
    assert main(args) == 0
    a, b = (output_paths(i, out) for i in images)
    (out / f".{a['stars'].name}.x1y2z3.part").write_bytes(b"PAR1 half a table")
    (out / ".run_summary.json.k9.part").write_text('{"images": {')
    a["summary"].unlink()  # killed after the new table, before its summary
    summary = read_json(b["summary"])
    summary["run"] = "f" * 32  # an old summary beside a new table
    b["summary"].write_text(json.dumps(summary))
    assert not is_done(images[0], out) and not is_done(images[1], out)
    assert main(args) == 0
    record = read_json(out / "run_summary.json")
    assert record["n_ok"] == 2 and record["n_skipped"] == 0
    assert sorted(_consistent(out, images)) == sorted(images)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------
# hostile stamps
# --------------------------------------------------------------------------------------
def _hostile(n, seed):
    """Stamps of real stars spoiled in every way: NaN, inf, zeros, huge values, constant,
    negative, all-masked; a variance with zeros/negatives only on masked pixels."""
    rng = np.random.default_rng(seed)
    data, var, _ = simulate_stamps(n, seed=seed)
    data, var = data.astype(np.float64), var.astype(np.float64)
    mask = np.zeros(data.shape, bool)
    kinds = rng.integers(0, 10, n)
    for i, kind in enumerate(kinds):
        pick = rng.random(data.shape[1:]) < rng.uniform(0.01, 0.5)
        if kind == 0:
            data[i][pick] = np.nan
        elif kind == 1:
            data[i][pick] = rng.choice([np.inf, -np.inf])
        elif kind == 2:
            data[i] = 0.0
        elif kind == 3:
            data[i][pick] = 1e30
        elif kind == 4:
            data[i] = 123.0
        elif kind == 5:
            data[i] = -np.abs(data[i])
        elif kind == 6:
            mask[i] = True
        elif kind == 7:
            var[i][pick] = rng.choice([0.0, -1.0])
            mask[i] |= pick
        elif kind == 8:
            data[i] = rng.normal(0, 1e6, data.shape[1:])
    return data, var, mask, kinds


def _rows_valued_or_flagged(t):
    flags = np.asarray(t["flags"], np.int64)
    bad = (flags & int(BAD)) != 0
    for name in ("flux", "x", "y"):
        assert np.all(np.isnan(t[name][bad])), name
        assert np.all(np.isfinite(t[name][~bad])), (name, flags[~bad & ~np.isfinite(t[name])])
    assert np.all(np.isfinite(t["flux_err"][~bad]))


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_stamps_never_crash(seed):
    data, var, mask, kinds = _hostile(96, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in (dict(variance=var), dict(gain=6.2, read_noise=8.0), dict()):
            t = ztfpsf.fit_stamps(data, mask=mask, **kw)
            assert len(t) == 96
            _rows_valued_or_flagged(t)
            assert np.all(np.asarray(t["flags"])[kinds == 6] & Flag.NO_DATA)
        t = ztfpsf.fit_stamps(data, var, mask=mask, fixed={"fwhm": 2.0, "alpha": 3.0}, dtype="float64")
        _rows_valued_or_flagged(t)
        # a variance <= 0 on a used pixel is the caller's mistake: one clear error
        with pytest.raises(ValueError, match="variance must be > 0"):
            ztfpsf.fit_stamps(data, var)


def test_fuzzed_joint_fit_never_crashes():
    data, var, mask, kinds = _hostile(160, 3)
    origin = np.column_stack([np.arange(160) * 20.0 % 2000, np.arange(160) // 100 * 20.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            psf, t, stats = ztfpsf.fit_psf(data, variance=var, mask=mask, origin=origin, image_shape=(2048, 2048), mode="shared")
        except ValueError as err:  # a caller mistake may be refused, clearly
            assert str(err)
            return
    assert len(t) == 160
    _rows_valued_or_flagged(t)


def test_fuzzed_photometry_never_crashes():
    rng = np.random.default_rng(5)
    image = rng.normal(150.0, 3.0, (200, 200))
    image[20:40, :] = np.nan
    image[100:104, 100:104] = np.inf
    image[150:170, 150:170] = 0.0
    image[60:63, 60:63] = 1e30
    mask = np.zeros(image.shape, bool)
    mask[:, 180:] = True
    psf = ztfpsf.PSFModel.constant("moffat", {"fwhm": 2.0, "alpha": 3.0}, (-0.5, 149.5, -0.5, 199.5))
    pos = np.column_stack([rng.uniform(-20, 220, 200), rng.uniform(-20, 220, 200)])
    pos[:5] = np.nan
    pos[5] = (101.0, 101.0)
    pos[6] = (61.0, 61.0)
    for kw in (dict(gain=6.2, read_noise=8.0), dict(), dict(variance=np.full(image.shape, 9.0))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = ztfpsf.photometry(image, psf, pos, mask=mask, **kw)
        flags = np.asarray(t["flags"], np.int64)
        nothing = (flags & int(BAD | Flag.OFF_IMAGE)) != 0
        assert np.all(np.isnan(t["flux"][nothing])) and np.all(np.isfinite(t["flux"][~nothing]))
        assert np.all(flags[:5] == Flag.OFF_IMAGE)
        outside = np.isfinite(pos[:, 0]) & (pos[:, 0] > 149.5) & (pos[:, 0] < 190) & (pos[:, 1] > 8) & (pos[:, 1] < 191)
        assert np.all(flags[outside] & Flag.OUTSIDE_PSF)
