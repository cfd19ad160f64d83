"""The quadrant pipeline and ``ztfpsf fit``: truth recovered on a simulated ZTF quadrant,
bad inputs answered in one line, many images on a 2-worker Dask cluster."""

import json
import logging
import os
import socket
import stat
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table, join

from ztfpsf.cli import main
from ztfpsf.config import FitConfig
from ztfpsf.io.catalog import FootprintWarning
from ztfpsf.io.results import read_json, read_parquet
from ztfpsf import pipeline
from ztfpsf.pipeline import output_paths, process_image, run
from ztfpsf.selection import EmptySelectionWarning
from ztfpsf.simulate import simulate_quadrant


@pytest.fixture(scope="module")
def quadrant(tmp_path_factory):
    """A full-size simulated ZTF quadrant (3080 x 3072, 15000 stars) with its catalogue."""
    return simulate_quadrant(tmp_path_factory.mktemp("quadrant"), seed=4)


@pytest.fixture(scope="module")
def fitted(quadrant, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    assert main(["fit", str(quadrant["sciimg"]), "--catalog", str(quadrant["catalog"]), "--out", str(out)]) == 0
    return out, output_paths(quadrant["sciimg"], out)


def test_fit_recovers_truth_on_a_simulated_quadrant(quadrant, fitted):
    _, paths = fitted
    table = read_parquet(paths["stars"])
    truth = Table.read(quadrant["truth"])
    truth.meta.clear()
    j = join(table, truth, keys="id", table_names=["fit", "true"])
    ok = j["flags"] == 0
    assert len(j) > 400 and ok.mean() > 0.9  # only MASKED_PIXELS (a masked pixel in the stamp) otherwise
    assert set(np.unique(j["flags"][~ok])) <= {16}
    for name in ("x", "y", "flux"):
        pull = ((j[f"{name}_fit"] - j[f"{name}_true"]) / j[f"{name}_err"])[ok]
        assert 0.9 < np.std(pull) < 1.1, name
    assert abs(np.median(j["flux_fit"][ok] / j["flux_true"][ok]) - 1) < 0.002
    assert abs(np.median(j["fwhm_fit"][ok] / j["fwhm_true"][ok]) - 1) < 0.005


def test_outputs_schema_metadata_and_summary(quadrant, fitted):
    _, paths = fitted
    schema = pq.read_schema(paths["stars"])
    for name in ("id", "ra", "dec", "mag", "x_init", "y_init", "x", "x_err", "flux", "flux_err", "fwhm", "alpha", "chi2", "dof", "flags"):
        assert name in schema.names
    meta = json.loads(schema.metadata[b"ztfpsf"])
    assert meta["gain"] == pytest.approx(6.2) and meta["zeropoint"] == pytest.approx(26.2)
    assert meta["image_shape"] == [3080, 3072] and meta["model"] == "moffat"
    assert meta["units"]["x"] == "pix"
    summary = read_json(paths["summary"])
    counts = summary["counts"]
    assert counts["catalog"] == 15000 and counts["clean"] == summary["n_fitted"]
    assert list(counts) == ["catalog", "on_image", "edge", "isolated", "magnitude", "stellar", "clean"]
    assert summary["fwhm_median_arcsec"] == pytest.approx(summary["fwhm_median_px"] * 1.012)
    assert 1.9 < summary["fwhm_median_px"] < 2.4
    assert set(summary["timings"]) >= {"read", "select", "fit", "write"}
    assert summary["exposure"]["ztf"]["rcid"] == 50


def test_rerun_skips_and_overwrite_redoes(quadrant, fitted, tmp_path):
    out, paths = fitted
    first = read_parquet(paths["stars"])
    before = paths["stars"].stat().st_mtime_ns
    record = run([quadrant["sciimg"]], FitConfig(catalog=str(quadrant["catalog"])), out)
    assert record["n_skipped"] == 1 and record["n_ok"] == 0 and paths["stars"].stat().st_mtime_ns == before
    # --overwrite redoes it: new files (a new run token in both), the same measurements
    redo = tmp_path / "redo"
    redo.mkdir()
    for p in (paths["stars"], paths["summary"]):
        (redo / p.name).write_bytes(p.read_bytes())
    stale = output_paths(quadrant["sciimg"], redo)["psf"]
    stale.write_bytes(b"a PSF of an earlier run")  # not made by this run: must not survive it
    assert main(["fit", str(quadrant["sciimg"]), "--catalog", str(quadrant["catalog"]), "--out", str(redo), "--overwrite"]) == 0
    again, summary = read_parquet(redo / paths["stars"].name), read_json(redo / paths["summary"].name)
    assert summary["run"] != read_json(paths["summary"])["run"] and again.meta["run"] == summary["run"]
    assert not stale.exists() and "psf" not in summary["outputs"]
    assert len(again) == len(first) > 400
    np.testing.assert_allclose(again["flux"], first["flux"], rtol=1e-6)
    assert read_json(redo / "run_summary.json")["n_ok"] == 1
    # a summary that does not belong to its table (an interrupted overwrite) is not "done"
    summary["run"] = "0" * 32
    (redo / paths["summary"].name).write_text(json.dumps(summary))
    assert run([quadrant["sciimg"]], FitConfig(catalog=str(quadrant["catalog"])), redo)["n_ok"] == 1
    assert read_json(redo / paths["summary"].name)["run"] == read_parquet(redo / paths["stars"].name).meta["run"]


def test_outputs_honour_the_umask(fitted):
    out, paths = fitted
    mask = os.umask(0)
    os.umask(mask)
    for p in (paths["stars"], paths["summary"], out / "run_summary.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p


def test_two_inputs_with_one_name_are_refused(tmp_path, capsys):
    """Before: a/image.fits and b/image.fits both wrote o/image.stars.parquet (the second
    replaced the first) and the run summary said 2 done."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "image.fits").write_bytes(d.encode() * 2880)  # never read: refused before
    a, b = tmp_path / "a" / "image.fits", tmp_path / "b" / "image.fits"
    out = tmp_path / "o"
    assert main(["fit", str(a), str(tmp_path / "trunc.fits"), str(b), "--out", str(out)]) == 2
    line = _one_line_error(capsys)
    assert str(a) in line and str(b) in line and "same name 'image'" in line
    assert not out.exists()  # refused before anything ran
    with pytest.raises(ValueError, match="same name"):
        run([a, b], FitConfig(), out)
    # one file given twice is one image
    assert pipeline._check_stems([str(a), str(a), str(tmp_path / "a" / ".." / "a" / "image.fits")]) == [str(a)]


# --------------------------------------------------------------------------------------
# bad input: one line, exit code 2 for one image, nothing written half
# --------------------------------------------------------------------------------------
def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_truncated_fits_is_one_line_exit_2(quadrant, tmp_path, capsys):
    bad = tmp_path / "ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits"
    bad.write_bytes(Path(quadrant["sciimg"]).read_bytes()[:2_000_000])
    assert main(["fit", str(bad), "--catalog", str(quadrant["catalog"]), "--out", str(tmp_path / "o"), "--no-mask"]) == 2
    line = _one_line_error(capsys)
    assert str(bad) in line and "truncated" in line


def test_catalog_without_columns_lists_what_it_found(quadrant, tmp_path, capsys):
    cat = tmp_path / "cat.csv"
    Table({"name": ["a", "b"], "flux": [1.0, 2.0]}).write(cat)
    assert main(["fit", str(quadrant["sciimg"]), "--catalog", str(cat), "--out", str(tmp_path / "o")]) == 2
    line = _one_line_error(capsys)
    assert "cat.csv" in line and "name" in line and "flux" in line


def test_radec_catalog_on_image_without_wcs(tmp_path, capsys):
    image = tmp_path / "plain.fits"
    fits.writeto(image, np.random.default_rng(0).normal(100, 5, (64, 64)).astype(np.float32))
    cat = tmp_path / "cat.csv"
    Table({"ra": [10.0], "dec": [20.0], "mag": [15.0]}).write(cat)
    assert main(["fit", str(image), "--catalog", str(cat), "--out", str(tmp_path / "o")]) == 2
    assert "WCS" in _one_line_error(capsys)


def test_empty_selection_gives_empty_table_with_full_schema(quadrant, tmp_path):
    with pytest.warns(EmptySelectionWarning):
        summary = process_image(quadrant["sciimg"], FitConfig(catalog=str(quadrant["catalog"]), mag_range=(5.0, 6.0)), tmp_path)
    table = read_parquet(output_paths(quadrant["sciimg"], tmp_path)["stars"])
    assert len(table) == 0 and summary["n_fitted"] == 0
    for name in ("id", "ra", "x", "x_err", "flux", "fwhm", "alpha_err", "chi2", "flags"):
        assert name in table.colnames


@pytest.mark.filterwarnings("ignore::ztfpsf.selection.EmptySelectionWarning")
def test_catalog_outside_the_footprint_warns(quadrant, tmp_path):
    cat = Table.read(quadrant["catalog"])
    cat["dec"] = cat["dec"] + 5.0  # the same stars, five degrees away
    far = tmp_path / "far.csv"
    cat.write(far)
    with pytest.warns(FootprintWarning, match="none of the 15000 sources falls on the 3072x3080 image"):
        summary = process_image(quadrant["sciimg"], FitConfig(catalog=str(far)), tmp_path)
    assert summary["n_fitted"] == 0 and summary["counts"]["on_image"] == 0


def test_interrupted_write_leaves_no_partial_file(quadrant, tmp_path, monkeypatch):
    import ztfpsf.io.results as results

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(results.pq, "write_table", boom)
    with pytest.raises(KeyboardInterrupt):
        process_image(quadrant["sciimg"], FitConfig(catalog=str(quadrant["catalog"])), tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# many images on Dask
# --------------------------------------------------------------------------------------
def _occupy(port):
    """Hold a TCP port (as another cluster's dashboard would); None if it is taken already."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


def test_four_images_on_two_workers_one_corrupt(tmp_path, caplog, recwarn):
    images = []
    for qid in (1, 2, 3):
        paths = simulate_quadrant(tmp_path / "in", seed=qid, size=(700, 700), nstars=800, qid=qid, ccd=2)
        images.append(paths["sciimg"])
    corrupt = tmp_path / "in" / "ztf_20200924431759_000655_zr_c02_o_q4_sciimg.fits"
    corrupt.write_bytes(b"SIMPLE  =                    T" + b"\0" * 500)
    images.insert(2, corrupt)
    out = tmp_path / "out"
    dashboard = _occupy(8787)  # Dask's default port busy: the run must not notice
    try:
        with caplog.at_level(logging.WARNING):
            code = main(["fit", *map(str, images), "--catalog", "auto", "--out", str(out), "--workers", "2"])
    finally:
        if dashboard is not None:
            dashboard.close()
    assert code == 1  # one image failed; the others were written
    # a clean start and shutdown: no port clash, no worker killed after Dask's 4 s
    said = caplog.text + "".join(str(w.message) for w in recwarn)
    assert "Perhaps you already have a cluster running" not in said and "still alive" not in said, said
    record = read_json(out / "run_summary.json")
    assert record["n_ok"] == 3 and record["n_failed"] == 1
    failed = record["images"][str(corrupt)]
    assert failed["status"] == "failed" and str(corrupt) in failed["error"]
    for image in images:
        if image != corrupt:
            table = read_parquet(output_paths(image, out)["stars"])
            assert len(table) > 5 and np.mean(table["flags"] == 0) > 0.8
    assert read_json(output_paths(corrupt, out)["summary"])["status"] == "failed"


def test_varying_psf_model_is_written_and_matches_truth(quadrant, tmp_path):
    from ztfpsf import PSFModel
    from ztfpsf.simulate import VaryingPSF

    summary = process_image(quadrant["sciimg"], FitConfig(catalog=str(quadrant["catalog"]), psf="varying", degree=2, model="elliptical_moffat"), tmp_path)
    paths = output_paths(quadrant["sciimg"], tmp_path)
    psf = PSFModel.read(paths["psf"])
    truth = Table.read(quadrant["truth"])
    true_psf = VaryingPSF.from_dict(truth.meta["psf"])
    table = read_parquet(paths["stars"])
    x, y = np.asarray(table["x"]), np.asarray(table["y"])
    assert np.sqrt(np.mean((psf.fwhm(x, y) / true_psf.fwhm(x, y) - 1) ** 2)) < 0.01
    stats = summary["psf_stats"]
    assert stats["n_reserve"] == int(np.sum((table["flags"] & 512) != 0)) > 0
    assert abs(stats["chi2_dof_reserve"] / stats["chi2_dof_train"] - 1) < 0.05
    # each star's own free-shape fit is kept beside the PSF's shape at the star
    assert {"star_fwhm", "star_fwhm_err", "star_e1", "star_flags"} <= set(table.colnames)
    ok = table["star_flags"] == 0
    assert abs(np.median(table["star_fwhm"][ok] / table["fwhm"][ok]) - 1) < 0.01


def test_external_scheduler_with_relative_paths(tmp_path, monkeypatch):
    """A scheduler and a worker started in other directories (loopback only): the client
    sends absolute paths of the images, the catalogue and the output folder (before, both
    images failed with 'no such file')."""
    import subprocess
    import sys
    import time

    from distributed import Client

    data = tmp_path / "data"
    cats = []
    for qid in (1, 2):
        paths = simulate_quadrant(data, seed=20 + qid, size=(300, 300), nstars=200, qid=qid, ccd=5)
        cats.append(Table.read(paths["catalog"]))
    from astropy.table import vstack

    vstack(cats).write(data / "cat.csv")
    names = sorted(p.name for p in data.glob("*_sciimg.fits"))
    dask = Path(sys.executable).with_name("dask")
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("scheduler", "worker")}
    for name in logs:
        (tmp_path / name).mkdir()
    sfile = tmp_path / "scheduler" / "scheduler.json"
    procs = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                               "--scheduler-file", str(sfile)], cwd=tmp_path / "scheduler", stdout=logs["scheduler"], stderr=subprocess.STDOUT)]
    try:
        for _ in range(600):
            if sfile.exists() and sfile.stat().st_size:
                break
            time.sleep(0.1)
        address = json.loads(sfile.read_text())["address"]
        procs.append(subprocess.Popen([str(dask), "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard"],
                                      cwd=tmp_path / "worker", stdout=logs["worker"], stderr=subprocess.STDOUT,
                                      env=dict(os.environ, ZTFPSF_CPU_DEVICES="1")))
        with Client(address) as client:
            client.wait_for_workers(1, timeout=120)
        monkeypatch.chdir(data)
        code = main(["fit", *names, "--catalog", "cat.csv", "--out", "out3", "--scheduler", address])
        record = read_json(data / "out3" / "run_summary.json")
        assert code == 0 and record["n_ok"] == 2, record
        for name in names:
            table = read_parquet(output_paths(name, data / "out3")["stars"])
            assert len(table) >= 1 and table.meta["catalog"] == str(data / "cat.csv")
        assert not any((tmp_path / "worker").glob("out3*"))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for f in logs.values():
            f.close()
