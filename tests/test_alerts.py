"""ZTF alert packets: reading (Avro, Parquet), the candidate measurement against the
pipeline's magpsf, bad inputs, and the ``ztfpsf alert`` command.

Data: 15 real public alerts in tests/data/alerts (5 nights, schemas 3.0-3.3, Avro and
Parquet; provenance in PROVENANCE.md).
"""

import gzip
import io
import shutil
import warnings
from pathlib import Path

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table

from ztfpsf.alerts import (
    AlertPSFConfig,
    blank_sky_pulls,
    candidate_center,
    compare_with_pipeline,
    measure_alerts,
    robust_std,
)
from ztfpsf.cli import main
from ztfpsf.flags import BAD, Flag
from ztfpsf.io.alerts import AlertFileError, decode_cutout, find_alert_files, read_alerts

DATA = Path(__file__).parent / "data" / "alerts"
PARQUET = DATA / "fink_datatest_nid1786_first8.parquet"
AVRO = DATA / "697252845015015006.avro"
REQUIRED = ("objectId", "candid", "flux", "flux_err", "mag", "mag_err", "fwhm", "chi2", "flags", "magpsf", "sigmapsf", "magap", "rb")


@pytest.fixture(scope="module")
def files():
    return find_alert_files([DATA])


@pytest.fixture(scope="module")
def alerts(files):
    return [a for f in files for a in read_alerts(f)]


@pytest.fixture(scope="module")
def result(alerts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return measure_alerts(alerts)


# ---- reading ---------------------------------------------------------------------------
def test_find_and_read_every_file(files, alerts):
    assert len(files) == 8
    assert len(alerts) == 15
    assert {a.candidate["nid"] for a in alerts} == {595, 697, 1048, 1628, 1786}
    assert {a.schemavsn for a in alerts} == {"3.0", "3.2", "3.3"}
    for a in alerts:
        assert a.problems == []
        assert a.candid == a.candidate["candid"]
        assert a.objectId.startswith("ZTF")
        for name in ("science", "template", "difference"):
            img = a.cutout(name)
            assert img.dtype == np.float32 and img.shape == (63, 63)
        # the difference is positive at the candidate for both signs of isdiffpos
        x, y = candidate_center(a.candidate, a.difference.shape)
        assert a.difference[int(round(y)), int(round(x))] > 0


def test_avro_fields(alerts):
    a = next(a for a in alerts if a.source.endswith("697252845015015006.avro#0"))
    assert a.objectId == "ZTF18acsbuxd" and a.candid == 697252845015015006
    assert a.candidate["isdiffpos"] == "t" and a.candidate["fid"] == 1
    assert a.candidate["magpsf"] == pytest.approx(17.466, abs=1e-3)
    assert a.file_names["difference"].endswith("scimref.fits.gz")
    # stampData is the gzipped FITS unchanged: decoding it again gives the same pixels
    with open(AVRO, "rb") as fh:
        record = next(fastavro.reader(fh))
    raw = gzip.decompress(record["cutoutScience"]["stampData"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ZTF's SIMPLE card is not quite standard
        with fits.open(io.BytesIO(raw)) as hdul:
            np.testing.assert_array_equal(hdul[0].data, a.science)


def test_parquet_rows(alerts):
    rows = [a for a in alerts if ".parquet#" in a.source]
    assert [a.objectId for a in rows][:3] == ["ZTF18abadigg", "ZTF18abjtlqo", "ZTF18aapgymv"]
    assert len(rows) == 8 and len({a.candid for a in rows}) == 8


def _avro_as_parquet(src, dst):
    """The packets of an Avro file written as a Parquet file of alerts (one row each)."""
    with open(src, "rb") as fh:
        records = list(fastavro.reader(fh))
    keep = ("objectId", "candid", "schemavsn", "candidate", "cutoutScience", "cutoutTemplate", "cutoutDifference")
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in keep} for r in records]), dst)


def test_same_alert_from_avro_and_parquet(tmp_path):
    dst = tmp_path / "same.parquet"
    _avro_as_parquet(AVRO, dst)
    (a,), (b,) = read_alerts(AVRO), read_alerts(dst)
    assert (a.objectId, a.candid, a.schemavsn) == (b.objectId, b.candid, b.schemavsn)
    assert a.candidate == b.candidate
    assert a.file_names == b.file_names
    for name in ("science", "template", "difference"):
        np.testing.assert_array_equal(a.cutout(name), b.cutout(name))


# ---- geometry ----------------------------------------------------------------------------
def test_candidate_center_full_and_cut_cutouts():
    assert candidate_center({"xpos": 688.85, "ypos": 1206.18}, (63, 63)) == pytest.approx((30.85, 31.18))
    # near pixel 1 of the channel the low side is cut: 51 rows, the candidate 12 rows lower
    assert candidate_center({"xpos": 2875.64, "ypos": 19.78}, (51, 63)) == pytest.approx((30.64, 18.78))
    # near the far edge the high side is cut: the position does not move
    assert candidate_center({"xpos": 3042.27, "ypos": 735.74}, (63, 62)) == pytest.approx((31.27, 30.74))


def test_fitted_position_matches_packet_position(result):
    # the README's centre is good to ~0.1 px; the fitted centre of bright candidates agrees
    snr = np.asarray(result["flux"] / result["flux_err"])
    ok = (np.asarray(result["flags"]) == 0) & (snr > 30)
    assert ok.sum() >= 5
    dx = np.asarray(result["x"])[ok] - [candidate_center({"xpos": r["xpos"], "ypos": r["ypos"]}, (63, 63))[0] for r in result[ok]]
    dy = np.asarray(result["y"])[ok] - [candidate_center({"xpos": r["xpos"], "ypos": r["ypos"]}, (63, 63))[1] for r in result[ok]]
    r = np.hypot(dx, dy)
    # one poor-seeing 'f' alert (ZTF17aabuxmy) has a dipole-like residual and moves 0.65 px
    assert np.median(r) < 0.1 and np.mean(r < 0.2) >= 0.8 and np.max(r) < 1.0


# ---- measurement ----------------------------------------------------------------------------
def test_result_columns_and_rows(result, alerts):
    assert len(result) == len(alerts)
    for c in REQUIRED:
        assert c in result.colnames
    assert list(result["candid"]) == [a.candid for a in alerts]
    ok = np.asarray(result["flags"]) == 0
    zp = np.asarray(result["magzpsci"])
    np.testing.assert_allclose(result["mag"][ok], zp[ok] - 2.5 * np.log10(result["flux"][ok]))


def test_agrees_with_pipeline_magpsf(result):
    # Over the 207 real (rb >= 0.5) shared alerts mag - magpsf has median -0.002 and a
    # robust scatter of 0.065 mag (the pipeline's own magap - magpsf: 0.08-0.13). On this
    # subset: every real, unflagged alert within 0.2 mag (3 x 0.065) and within 3 sigma
    # plus a 0.05 mag PSF-model floor (bright stars have sigma of 0.01 mag); the median
    # within 0.05 mag.
    real = (np.asarray(result["rb"]) >= 0.5) & (np.asarray(result["flags"]) == 0)
    assert real.sum() >= 12
    d = np.asarray(result["mag"] - result["magpsf"])[real]
    sigma = np.hypot(np.asarray(result["mag_err"]), np.asarray(result["sigmapsf"]))[real]
    assert np.all(np.abs(d) < 0.2), d
    assert np.all(np.abs(d) < 3 * sigma + 0.05), d / sigma
    assert abs(np.median(d)) < 0.05
    # the PSF comes from stars: every real alert here has its own (local) stars
    assert set(np.asarray(result["psf_source"])[real]) <= {"local", "local_fwhm"}
    assert np.all((result["fwhm"][real] > 1.0) & (result["fwhm"][real] < 5.0))


def test_psf_borrowed_from_the_same_image(result):
    # ZTF18acsbuxi's science cutout has no usable star: it takes the PSF of the two other
    # alerts of its readout-channel image (pid 697252845015), unflagged, and still agrees
    row = result[result["objectId"] == "ZTF18acsbuxi"][0]
    assert row["psf_source"] == "quadrant" and row["flags"] == 0
    same = result[(result["pid"] == row["pid"]) & (result["psf_source"] == "local")]
    assert len(same) == 2
    assert row["fwhm"] == pytest.approx(np.median(same["fwhm"]), rel=0.05)
    assert abs(row["mag"] - row["magpsf"]) < 2 * np.hypot(row["mag_err"], row["sigmapsf"])


def test_uncertainties_pass_the_blank_sky_test(alerts, result):
    # forced fits on empty sky with each alert's PSF and noise: flux / flux_err ~ N(0, 1)
    pulls, _ = blank_sky_pulls(alerts, result, n_per_alert=8)
    assert pulls.size >= 80
    assert 0.8 < robust_std(pulls) < 1.25
    # over all 240 shared alerts: robust std 1.07, median -0.2 (faint sources in the stamp
    # raise the fitted background a little)
    assert abs(np.median(pulls)) < 0.5


def test_gain_is_overridable(alerts, result):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        hi = measure_alerts(alerts, gain=1000.0)
    assert hi.meta["gain"] == 1000.0 and result.meta["gain"] == 6.2
    # almost no source Poisson noise: smaller errors on the bright candidates (S/N > 100),
    # about the same magnitudes (the star and candidate weights change a little)
    bright = (np.asarray(result["flags"]) == 0) & (np.asarray(result["flux"] / result["flux_err"]) > 100)
    assert bright.sum() >= 4
    ratio = np.asarray(hi["mag_err"] / result["mag_err"])[bright]
    assert np.all(ratio < 0.9) and np.median(ratio) < 0.7
    assert np.median(np.abs(hi["mag"] - result["mag"])[bright]) < 0.02
    with pytest.raises(ValueError, match="gain"):
        measure_alerts(alerts[:1], gain=0.0)


def test_compare_with_pipeline_table(result):
    cmp = compare_with_pipeline(result)
    row = cmp[(cmp["sample"] == "rb >= 0.5") & (cmp["bin"] == "all")][0]
    real = np.asarray(result["rb"]) >= 0.5
    assert row["n"] == real.sum()
    assert row["n_measured"] == (real & (np.asarray(result["flags"]) == 0)).sum()
    assert row["median_dmag"] == pytest.approx(np.median(np.asarray(result["mag"] - result["magpsf"])[real & (np.asarray(result["flags"]) == 0)]))


# ---- bad input --------------------------------------------------------------------------------
def test_truncated_avro_raises_naming_the_file(tmp_path):
    bad = tmp_path / "truncated.avro"
    bad.write_bytes(AVRO.read_bytes()[:30000])
    with pytest.raises(AlertFileError, match=r"truncated\.avro: truncated or corrupt Avro"):
        read_alerts(bad)
    junk = tmp_path / "junk.avro"
    junk.write_bytes(b"not an avro file at all")
    with pytest.raises(AlertFileError, match="junk.avro"):
        read_alerts(junk)
    table = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), table)
    with pytest.raises(AlertFileError, match="no 'candidate' column"):
        read_alerts(table)


def _rewrite_avro(src, dst, change):
    with open(src, "rb") as fh:
        reader = fastavro.reader(fh)
        schema, records = reader.writer_schema, list(reader)
    for r in records:
        change(r)
    with open(dst, "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(schema), records)


def _nan_fits_gz():
    buf = io.BytesIO()
    fits.PrimaryHDU(np.full((63, 63), np.nan, np.float32)).writeto(buf)
    return gzip.compress(buf.getvalue())


@pytest.fixture(scope="module")
def bad_packets(tmp_path_factory):
    """Three broken copies of a real packet: no cutouts, an all-NaN difference, a corrupt
    science stamp; and the measurement of them beside two good alerts."""
    d = tmp_path_factory.mktemp("bad")
    paths = {
        "nocut": d / "nocut.avro",
        "nan": d / "nan.avro",
        "corrupt": d / "corrupt.avro",
    }

    def no_cutouts(r):
        r["cutoutScience"] = r["cutoutTemplate"] = r["cutoutDifference"] = None

    def nan_difference(r):
        r["cutoutDifference"]["stampData"] = _nan_fits_gz()

    def corrupt_science(r):
        r["cutoutScience"]["stampData"] = b"\x1f\x8b" + b"garbage" * 10

    _rewrite_avro(AVRO, paths["nocut"], no_cutouts)
    _rewrite_avro(AVRO, paths["nan"], nan_difference)
    _rewrite_avro(AVRO, paths["corrupt"], corrupt_science)
    good = read_alerts(DATA / "697252845015010003.avro") + read_alerts(AVRO)
    bad = [read_alerts(paths[k])[0] for k in ("nocut", "nan", "corrupt")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = measure_alerts(bad + good)
    return paths, bad, table


def test_packet_without_cutouts_is_a_flagged_row(bad_packets):
    _, bad, table = bad_packets
    assert bad[0].difference is None and "no difference cutout" in bad[0].problems
    row = table[0]
    assert row["flags"] & Flag.NO_DATA and np.isnan(row["flux"]) and np.isnan(row["mag"])
    assert "no difference cutout" in row["problem"]
    assert row["magpsf"] == pytest.approx(17.466, abs=1e-3)  # the pipeline's values are kept


def test_all_nan_cutout_is_a_flagged_row(bad_packets):
    _, bad, table = bad_packets
    assert np.isnan(bad[1].difference).all()
    row = table[1]
    assert row["flags"] & Flag.NO_DATA and np.isnan(row["flux"])
    assert "no finite pixel" in row["problem"]


def test_corrupt_science_stamp_still_measured(bad_packets):
    _, bad, table = bad_packets
    assert bad[2].science is None and any("science cutout" in p for p in bad[2].problems)
    # no science stars: the PSF of the same readout-channel image is borrowed
    row, twin = table[2], table[4]
    assert row["psf_source"] == "quadrant" and not row["flags"] & BAD
    assert row["mag"] == pytest.approx(twin["mag"], abs=0.1)


def test_other_alerts_measured_beside_bad_ones(bad_packets, result):
    _, _, table = bad_packets
    assert np.all(table["flags"][3:] == 0)
    ref = result[np.isin(result["candid"], table["candid"][3:])]
    np.testing.assert_allclose(np.sort(table["mag"][3:]), np.sort(ref["mag"]), atol=0.03)


# ---- command line ------------------------------------------------------------------------------
def test_cli_writes_parquet(tmp_path, capsys):
    out = tmp_path / "alerts.parquet"
    rc = main(["-q", "alert", str(DATA), "--out", str(out), "--workers", "1"])
    assert rc == 0
    t = Table.read(out)
    assert len(t) == 15
    for c in REQUIRED:
        assert c in t.colnames
    assert "15 alerts" in capsys.readouterr().out


def test_cli_bad_file_reported_others_measured(tmp_path, capsys, bad_packets):
    paths, _, _ = bad_packets
    trunc = tmp_path / "truncated.avro"
    trunc.write_bytes(AVRO.read_bytes()[:30000])
    good = tmp_path / "good.avro"
    shutil.copy(DATA / "697252845015010003.avro", good)
    out = tmp_path / "out.parquet"
    rc = main(["-q", "alert", str(trunc), str(good), str(paths["nocut"]), "--out", str(out), "--workers", "1"])
    assert rc == 1  # some file failed; the rest written
    err = capsys.readouterr().err
    assert "truncated.avro" in err and "truncated or corrupt" in err
    t = Table.read(out)
    assert len(t) == 2
    assert t["flags"][0] == 0 and t["flags"][1] & Flag.NO_DATA


def test_cli_user_errors(tmp_path, capsys):
    assert main(["alert", str(tmp_path / "missing.avro")]) == 2
    assert "missing.avro: no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["alert", str(tmp_path / "empty")]) == 2
    assert "no alert files" in capsys.readouterr().err
    trunc = tmp_path / "t.avro"
    trunc.write_bytes(AVRO.read_bytes()[:30000])
    assert main(["alert", str(trunc)]) == 2
    assert "t.avro: truncated or corrupt Avro" in capsys.readouterr().err
    assert main(["alert", str(AVRO), "--gain", "-1"]) == 2


def test_decode_cutout_errors():
    with pytest.raises(ValueError, match="empty"):
        decode_cutout(b"")
    with pytest.raises(ValueError, match="not a FITS"):
        decode_cutout(gzip.compress(b"hello"))


def test_config_defaults_documented():
    cfg = AlertPSFConfig()
    assert cfg.gain == 6.2 and cfg.stamp_size % 2 == 1 and cfg.star_size % 2 == 1
