"""The quadrant pipeline and ``ztfpsf fit``: truth recovered on a simulated ZTF quadrant,
bad inputs answered in one line, many images on a 2-worker Dask cluster."""

import json
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


def test_rerun_skips_and_overwrite_redoes(quadrant, fitted):
    out, paths = fitted
    before = paths["stars"].stat().st_mtime_ns
    record = run([quadrant["sciimg"]], FitConfig(catalog=str(quadrant["catalog"])), out)
    assert record["n_skipped"] == 1 and paths["stars"].stat().st_mtime_ns == before


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
def test_four_images_on_two_workers_one_corrupt(tmp_path):
    images = []
    for qid in (1, 2, 3):
        paths = simulate_quadrant(tmp_path / "in", seed=qid, size=(700, 700), nstars=800, qid=qid, ccd=2)
        images.append(paths["sciimg"])
    corrupt = tmp_path / "in" / "ztf_20200924431759_000655_zr_c02_o_q4_sciimg.fits"
    corrupt.write_bytes(b"SIMPLE  =                    T" + b"\0" * 500)
    images.insert(2, corrupt)
    out = tmp_path / "out"
    code = main(["fit", *map(str, images), "--catalog", "auto", "--out", str(out), "--workers", "2"])
    assert code == 1  # one image failed; the others were written
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
