"""ZTF alert packets: reading (Avro, Parquet, tables a broker holds), the batched stages,
the candidate measurement against the pipeline's magpsf, bad inputs, and ``ztfpsf alert``.

Data: 15 real public alerts in tests/data/alerts (5 nights, schemas 3.0-3.3, Avro and
Parquet; provenance in PROVENANCE.md).
"""

import gzip
import importlib.util
import io
import shutil
import warnings
from pathlib import Path

import fastavro
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy import ndimage

from ztfpsf.alerts import AlertPSFConfig, PSFGroups, candidate_center, measure_batch, measure_files
from ztfpsf.alerts import rounds
from ztfpsf.alerts.pixels import detect, prepare, robust_sky, star_stamps
from ztfpsf.alerts.psf import grouped_weighted_median
from ztfpsf.cli import main
from ztfpsf.flags import BAD, Flag
from ztfpsf.io.alerts import AlertBatch, AlertFileError, batch_from_table, decode_cutout, find_alert_files, iter_batches, read_alerts

DATA = Path(__file__).parent / "data" / "alerts"
PARQUET = DATA / "fink_datatest_nid1786_first8.parquet"
AVRO = DATA / "697252845015015006.avro"
REQUIRED = ("objectId", "candid", "flux", "flux_err", "mag", "mag_err", "fwhm", "chi2", "flags", "magpsf", "sigmapsf", "magap", "rb", "problem")
PACKET_FIELDS = ("objectId", "candid", "schemavsn", "candidate", "cutoutScience", "cutoutTemplate", "cutoutDifference")


def _validation_module():
    """benchmarks/validate_alerts.py: the validation statistics live there, not in the library."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "validate_alerts.py"
    spec = importlib.util.spec_from_file_location("validate_alerts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def files():
    return find_alert_files([DATA])


@pytest.fixture(scope="module")
def alerts(files):
    return [a for f in files for a in read_alerts(f)]


@pytest.fixture(scope="module")
def batch(files):
    return AlertBatch.concat(iter_batches(files))


@pytest.fixture(scope="module")
def result(batch):
    return measure_batch(batch)


def _packets(path):
    """The packets of an Avro file as dicts of the fields a Parquet file of alerts holds."""
    with open(path, "rb") as fh:
        return [{k: r[k] for k in PACKET_FIELDS} for r in fastavro.reader(fh)]


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


def test_batch_matches_single_alerts(alerts, batch):
    assert len(batch) == 15 and list(batch.candid) == [a.candid for a in alerts]
    assert (batch.problems == "").all() and (batch.shape == 63).all() and (batch.offset == 0).all()
    for i, a in enumerate(alerts):
        for name in ("science", "template", "difference"):
            np.testing.assert_array_equal(batch.cutout(name)[i], a.cutout(name))
    np.testing.assert_array_equal(batch.field("magpsf"), [a.candidate["magpsf"] for a in alerts])


def test_avro_fields(alerts):
    a = next(a for a in alerts if a.source.endswith("697252845015015006.avro#0"))
    assert a.objectId == "ZTF18acsbuxd" and a.candid == 697252845015015006
    assert a.candidate["isdiffpos"] == "t" and a.candidate["fid"] == 1
    assert a.candidate["magpsf"] == pytest.approx(17.466, abs=1e-3)
    assert a.file_names["difference"].endswith("scimref.fits.gz")
    # stampData is the gzipped FITS unchanged: astropy decodes the same pixels as our reader
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


def test_same_alert_from_avro_and_parquet(tmp_path):
    dst = tmp_path / "same.parquet"
    pq.write_table(pa.Table.from_pylist(_packets(AVRO)), dst)
    (a,), (b,) = read_alerts(AVRO), read_alerts(dst)
    assert (a.objectId, a.candid, a.schemavsn) == (b.objectId, b.candid, b.schemavsn)
    assert a.candidate == b.candidate
    assert a.file_names == b.file_names
    for name in ("science", "template", "difference"):
        np.testing.assert_array_equal(a.cutout(name), b.cutout(name))


def test_cut_short_cutout_sits_in_its_frame():
    # near pixel 1 of the channel the low side is cut: a 51-row cutout fills rows 12-62 of
    # its frame; near the far edge the high side is cut and it starts at 0
    rng = np.random.default_rng(1)
    images = {"low": rng.normal(size=(51, 63)).astype(np.float32), "high": rng.normal(size=(63, 62)).astype(np.float32)}

    def stamp(img):
        buf = io.BytesIO()
        fits.PrimaryHDU(img).writeto(buf)
        return gzip.compress(buf.getvalue())

    records = [
        {"objectId": "low", "candid": 1, "candidate": {"xpos": 2875.64, "ypos": 19.78}, "cutoutDifference": {"stampData": stamp(images["low"])}},
        {"objectId": "high", "candid": 2, "candidate": {"xpos": 3042.27, "ypos": 735.74}, "cutoutDifference": {"stampData": stamp(images["high"])}},
    ]
    b = batch_from_table(pa.Table.from_pylist(records))
    assert b.offset.tolist() == [[0, 12], [0, 0]]
    assert b.shape[:, 2].tolist() == [[51, 63], [63, 62]]
    np.testing.assert_array_equal(b.difference[0, 12:], images["low"])
    assert np.isnan(b.difference[0, :12]).all()
    np.testing.assert_array_equal(b.difference[1, :, :62], images["high"])
    assert "no science cutout" in b.problems[0]


# ---- geometry and the stages, against direct computations -----------------------------------
def test_candidate_center_full_and_cut_cutouts():
    assert candidate_center({"xpos": 688.85, "ypos": 1206.18}, (63, 63)) == pytest.approx((30.85, 31.18))
    # near pixel 1 of the channel the low side is cut: 51 rows, the candidate 12 rows lower
    assert candidate_center({"xpos": 2875.64, "ypos": 19.78}, (51, 63)) == pytest.approx((30.64, 18.78))
    # near the far edge the high side is cut: the position does not move
    assert candidate_center({"xpos": 3042.27, "ypos": 735.74}, (63, 62)) == pytest.approx((31.27, 30.74))


def test_robust_sky_equals_nanmedian_and_mad(batch):
    stack = batch.difference.copy()
    stack[0, :10] = np.nan  # masked pixels
    stack[1] = np.nan  # nothing finite
    stack[2, :, :62] = np.nan  # too few pixels (63 finite, >= 10: still measured)
    med, sig = robust_sky(stack)
    for i in (0, 2, 3, 4):
        v = stack[i][np.isfinite(stack[i])].astype(np.float64)
        assert med[i] == pytest.approx(np.median(v), rel=1e-6)
        assert sig[i] == pytest.approx(1.4826 * np.median(np.abs(v - np.median(v))), rel=1e-5)
    assert np.isnan(med[1]) and np.isnan(sig[1])


def test_detection_equals_scipy_filters(batch):
    # the matrix-product smoothing and the shifted 5x5 maximum are scipy.ndimage's
    # gaussian_filter(sigma=1) and maximum_filter(5) with mode='constant'
    cfg = AlertPSFConfig()
    prep = prepare(batch, cfg)
    peaks = detect(batch.science, prep.sky[:, 0], np.ones(len(batch), bool), batch.shape[:, 0], batch.offset, cfg.detect_snr)
    assert len(peaks) > 40
    for i in range(len(batch)):
        med, sig = prep.sky[i, 0]
        z = np.where(np.isfinite(batch.science[i]), batch.science[i] - med, 0.0)
        sm = ndimage.gaussian_filter(z, 1.0, mode="constant")
        noise = sig / (2.0 * np.sqrt(np.pi))
        ref = (sm == ndimage.maximum_filter(sm, 5, mode="constant")) & (sm > cfg.detect_snr * noise)
        rows, cols = np.nonzero(ref)
        mine = peaks.alert == i
        assert sorted(zip(peaks.y[mine], peaks.x[mine])) == sorted(zip(rows, cols))
        np.testing.assert_allclose(np.sort(peaks.snr[mine]), np.sort(sm[rows, cols] / noise), rtol=1e-4)


def test_deblending_mask_masks_pixels_nearer_to_another_source(batch):
    cfg = AlertPSFConfig()
    prep = prepare(batch, cfg)
    peaks = detect(batch.science, prep.sky[:, 0], np.ones(len(batch), bool), batch.shape[:, 0], batch.offset, cfg.detect_snr)
    stars = np.arange(len(peaks))
    data, var, mask, origin = star_stamps(batch.science, prep.sky[:, 0], peaks, stars, 17, cfg.gain)
    assert mask.any() and not mask.all()
    for s in stars:
        yy, xx = np.mgrid[origin[s, 1] : origin[s, 1] + 17, origin[s, 0] : origin[s, 0] + 17]
        own = np.hypot(xx - peaks.x[s], yy - peaks.y[s])
        ref = np.zeros((17, 17), bool)
        for j in np.nonzero((peaks.alert == peaks.alert[s]) & (stars != s))[0]:
            ref |= np.hypot(xx - peaks.x[j], yy - peaks.y[j]) < own
        np.testing.assert_array_equal(mask[s], ref)
    assert np.all(var[np.isfinite(data)] >= prep.sky[peaks.alert, 0, 1].min() ** 2 * 0.999)


def test_grouped_weighted_median_equals_its_definition():
    rng = np.random.default_rng(3)
    group = rng.integers(0, 40, 500)
    values, weights = rng.normal(size=500), rng.uniform(0.1, 5.0, 500)
    groups, med, count = grouped_weighted_median(group, values, weights)
    for g, m, c in zip(groups, med, count):
        v, w = values[group == g], weights[group == g]
        order = np.argsort(v)
        cw = np.cumsum(w[order])
        assert m == v[order][np.searchsorted(cw, 0.5 * cw[-1])] and c == v.size


def test_fits_in_rounds_equal_one_fit(batch, monkeypatch):
    # rounds of growing caps give each star the result of one fit with the final cap
    from ztfpsf import fit_stamps

    cfg = AlertPSFConfig()
    prep = prepare(batch, cfg)
    kw = dict(model="moffat", origin=prep.diff_origin.astype(float), x_init=prep.center[:, 0], y_init=prep.center[:, 1],
              fixed={"fwhm": np.full(15, 2.5), "alpha": np.full(15, 3.0)}, dtype="float64", max_shift=1.0)
    monkeypatch.setattr(rounds, "CAPS", (2, 3))
    monkeypatch.setattr(rounds, "MIN_STARS", 1)
    staged = rounds.fit_in_rounds(prep.diff, prep.diff_var, max_iter=150, **kw)
    once = fit_stamps(prep.diff, prep.diff_var, max_iter=150, **kw)
    assert (np.asarray(once["n_iter"]) > 3).sum() >= 3  # some stars needed the last round
    np.testing.assert_array_equal(staged["n_iter"], once["n_iter"])
    np.testing.assert_allclose(staged["flux"], once["flux"], rtol=1e-9)
    np.testing.assert_array_equal(staged["flags"], once["flags"])


# ---- measurement ----------------------------------------------------------------------------
def test_fitted_position_matches_packet_position(result):
    # the README's centre is good to ~0.1 px; the fitted centre of bright candidates agrees
    snr = np.asarray(result["flux"] / result["flux_err"])
    ok = (np.asarray(result["flags"]) == 0) & (snr > 30)
    assert ok.sum() >= 5
    cx, cy = candidate_center({"xpos": result["xpos"][ok], "ypos": result["ypos"][ok]}, (63, 63))
    r = np.hypot(result["x"][ok] - cx, result["y"][ok] - cy)
    # one poor-seeing 'f' alert (ZTF17aabuxmy) has a dipole-like residual and moves 0.65 px
    assert np.median(r) < 0.1 and np.mean(r < 0.2) >= 0.8 and np.max(r) < 1.0


def test_result_columns_and_rows(result, batch):
    assert len(result) == len(batch)
    for c in REQUIRED:
        assert c in result.columns
    assert list(result["candid"]) == list(batch.candid)  # input order
    ok = result["flags"].to_numpy() == 0
    np.testing.assert_allclose(result["mag"][ok], result["magzpsci"][ok] - 2.5 * np.log10(result["flux"][ok]))
    assert result.attrs["gain"] == 6.2 and result.attrs["units"]["mag"] == "mag"


def test_agrees_with_pipeline_magpsf(result):
    # Over the 207 real (rb >= 0.5) shared alerts mag - magpsf has median -0.002 and a
    # robust scatter of 0.065 mag (the pipeline's own magap - magpsf: 0.08-0.13). On this
    # subset: every real, unflagged alert within 0.2 mag (3 x 0.065) and within 3 sigma
    # plus a 0.05 mag PSF-model floor (bright stars have sigma of 0.01 mag); the median
    # within 0.05 mag.
    real = (result["rb"].to_numpy() >= 0.5) & (result["flags"].to_numpy() == 0)
    assert real.sum() >= 12
    d = (result["mag"] - result["magpsf"]).to_numpy()[real]
    sigma = np.hypot(result["mag_err"], result["sigmapsf"]).to_numpy()[real]
    assert np.all(np.abs(d) < 0.2), d
    assert np.all(np.abs(d) < 3 * sigma + 0.05), d / sigma
    assert abs(np.median(d)) < 0.05
    # the PSF comes from stars: every real alert here has its own (local) stars
    assert set(result["psf_source"][real]) <= {"local", "local_fwhm"}
    assert np.all((result["fwhm"][real] > 1.0) & (result["fwhm"][real] < 5.0))


def test_psf_borrowed_from_the_same_image(result):
    # ZTF18acsbuxi's science cutout has no usable star: it takes the PSF of the two other
    # alerts of its readout-channel image (pid 697252845015), unflagged, and still agrees
    row = result[result["objectId"] == "ZTF18acsbuxi"].iloc[0]
    assert row["psf_source"] == "quadrant" and row["flags"] == 0
    same = result[(result["pid"] == row["pid"]) & (result["psf_source"] == "local")]
    assert len(same) == 2
    assert row["fwhm"] == pytest.approx(np.median(same["fwhm"]), rel=0.05)
    assert abs(row["mag"] - row["magpsf"]) < 2 * np.hypot(row["mag_err"], row["sigmapsf"])


def test_groups_carried_across_calls(batch, result):
    # ZTF18acsbuxi alone has nothing to borrow: its own fwhm, untrusted. Measured after its
    # image mates with the same PSFGroups, it borrows their PSF as in one call.
    i = int(np.nonzero(batch.objectId == "ZTF18acsbuxi")[0][0])
    alone = measure_batch(batch.take([i])).iloc[0]
    assert alone["psf_source"] == "difference" and alone["flags"] & Flag.SHAPE_UNTRUSTED
    groups = PSFGroups()
    mates = np.nonzero((batch.field("pid", np.int64) == batch.field("pid", np.int64)[i]) & (np.arange(len(batch)) != i))[0]
    measure_batch(batch.take(mates), groups=groups)
    assert len(groups) >= 2
    later = measure_batch(batch.take([i]), groups=groups).iloc[0]
    ref = result.iloc[i]
    assert later["psf_source"] == "quadrant" and later["flags"] == 0
    # the same fits in batches of other sizes: equal to the rounding of the fits (1e-5 mag, 1e-5 in fwhm)
    assert later["mag"] == pytest.approx(ref["mag"], abs=1e-4) and later["fwhm"] == pytest.approx(ref["fwhm"], rel=1e-4)


def test_result_independent_of_chunk_size(files, result):
    # alerts that borrow from others wait for the whole stream: batches of 4 give the
    # result of one batch (rows come out in another order)
    small = pd.concat(measure_files(files, chunk_size=4), ignore_index=True)
    assert sorted(small["candid"]) == sorted(result["candid"])
    merged = result.merge(small, on="candid", suffixes=("", "_4"))
    assert (merged["psf_source"] == merged["psf_source_4"]).all() and (merged["flags"] == merged["flags_4"]).all()
    np.testing.assert_allclose(merged["mag_4"], merged["mag"], atol=1e-4)
    np.testing.assert_allclose(merged["fwhm_4"], merged["fwhm"], rtol=1e-4)


def test_broker_tables_pandas_and_arrow(files, result):
    # the rows of the Parquet file as a broker holds them: a pandas DataFrame (index kept)
    # and a pyarrow table; flattened candidate columns too
    table = pq.read_table(PARQUET)
    ref = result.set_index("candid").loc[table.column("candid").to_pylist()]
    frame = table.to_pandas()
    frame.index = np.arange(100, 100 + len(frame))
    out = measure_batch(frame)
    assert list(out.index) == list(frame.index) and list(out["candid"]) == list(frame["candid"])
    flat = table.drop_columns(["candidate"]).append_column("candidate.xpos", table.column("candidate").combine_chunks().field("xpos"))
    for k in ("ypos", "magzpsci", "nframesref", "pid", "jd", "nid", "magpsf"):
        flat = flat.append_column(f"candidate.{k}", table.column("candidate").combine_chunks().field(k))
    for got in (out, measure_batch(table), measure_batch(flat)):
        local = got["psf_source"].to_numpy() == "local"  # the others borrow from the 15 in `result`
        assert local.sum() >= 4
        np.testing.assert_allclose(got["mag"].to_numpy()[local], ref["mag"].to_numpy()[local], atol=1e-4)


def test_uncertainties_pass_the_blank_sky_test(batch, result):
    # forced fits on empty sky with each alert's PSF and noise: flux / flux_err ~ N(0, 1)
    pulls, _ = _validation_module().blank_sky_pulls(batch, result, n_per_alert=8)
    assert pulls.size >= 80
    rstd = 1.4826 * np.median(np.abs(pulls - np.median(pulls)))
    assert 0.8 < rstd < 1.25
    # over all 240 shared alerts: robust std 1.07, median -0.2 (faint sources in the stamp
    # raise the fitted background a little)
    assert abs(np.median(pulls)) < 0.5


def test_gain_is_overridable(batch, result):
    hi = measure_batch(batch, gain=1000.0)
    assert hi.attrs["gain"] == 1000.0
    # almost no source Poisson noise: smaller errors on the bright candidates (S/N > 100),
    # about the same magnitudes (the star and candidate weights change a little)
    bright = (result["flags"].to_numpy() == 0) & ((result["flux"] / result["flux_err"]).to_numpy() > 100)
    assert bright.sum() >= 4
    ratio = (hi["mag_err"] / result["mag_err"]).to_numpy()[bright]
    assert np.all(ratio < 0.9) and np.median(ratio) < 0.7
    assert np.median(np.abs(hi["mag"] - result["mag"])[bright]) < 0.02
    with pytest.raises(ValueError, match="gain"):
        measure_batch(batch.take([0]), gain=0.0)


def test_compare_with_pipeline_table(result):
    """The validation table on this subset meets the acceptance figures of the README
    (measured on all 240 alerts: median -0.002, pull robust std 0.69, 97.6 % measured,
    scatter below the pipeline's own magap - magpsf)."""
    cmp = _validation_module().compare_with_pipeline(result)
    row = cmp[(cmp["sample"] == "rb >= 0.5") & (cmp["bin"] == "all")][0]
    assert row["n"] == (result["rb"].to_numpy() >= 0.5).sum() >= 12
    assert row["frac_measured"] >= 0.9
    assert abs(row["median_dmag"]) < 0.05
    assert 0.3 < row["rstd_pull"] < 1.3
    assert row["rstd_dmag"] < row["rstd_magap"]


def test_non_positive_flux_keeps_its_values(batch, result):
    """A forced flux <= 0 on the difference image is a measurement (a fading source), not a
    failure: flagged NOT_POSITIVE (not a BAD bit), flux and error kept, no magnitude. The
    real alerts' difference cutouts negated are such sources: the same flux, negative."""
    from dataclasses import replace

    assert not Flag.NOT_POSITIVE & BAD
    real = np.flatnonzero((result["rb"].to_numpy() >= 0.5) & (result["flags"].to_numpy() == 0))
    sub = batch.take(real)
    faded = measure_batch(replace(sub, difference=-sub.difference))
    flags = faded["flags"].to_numpy()
    assert np.all((flags & Flag.NOT_POSITIVE) != 0) and np.all((flags & BAD) == 0)
    assert np.all(np.isnan(faded["mag"])) and np.all(np.isfinite(faded["flux_err"]))
    before = result.iloc[real]
    pull = (faded["flux"].to_numpy() + before["flux"].to_numpy()) / before["flux_err"].to_numpy()
    assert np.all(np.abs(pull) < 0.5)  # the same fit, mirrored (measured within 0.1 sigma)
    assert np.all((result["flags"].to_numpy()[result["flux"].to_numpy() > 0] & Flag.NOT_POSITIVE) == 0)


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
        list(iter_batches([table]))


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
    paths = {"nocut": d / "nocut.avro", "nan": d / "nan.avro", "corrupt": d / "corrupt.avro"}

    def no_cutouts(r):
        r["cutoutScience"] = r["cutoutTemplate"] = r["cutoutDifference"] = None

    def nan_difference(r):
        r["cutoutDifference"]["stampData"] = _nan_fits_gz()

    def corrupt_science(r):
        r["cutoutScience"]["stampData"] = b"\x1f\x8b" + b"garbage" * 10

    _rewrite_avro(AVRO, paths["nocut"], no_cutouts)
    _rewrite_avro(AVRO, paths["nan"], nan_difference)
    _rewrite_avro(AVRO, paths["corrupt"], corrupt_science)
    batch = AlertBatch.concat(iter_batches([paths[k] for k in ("nocut", "nan", "corrupt")] + [DATA / "697252845015010003.avro", AVRO]))
    return paths, batch, measure_batch(batch)


def test_packet_without_cutouts_is_a_flagged_row(bad_packets):
    _, batch, table = bad_packets
    assert "no difference cutout" in batch.problems[0] and np.isnan(batch.difference[0]).all()
    row = table.iloc[0]
    assert row["flags"] == Flag.NO_DATA and np.isnan(row["flux"]) and np.isnan(row["mag"])
    assert row["problem"].count("no difference cutout") == 1
    assert row["magpsf"] == pytest.approx(17.466, abs=1e-3)  # the pipeline's values are kept


def test_all_nan_cutout_is_a_flagged_row(bad_packets):
    _, _, table = bad_packets
    row = table.iloc[1]
    assert row["flags"] & Flag.NO_DATA and np.isnan(row["flux"])
    assert "no finite pixel" in row["problem"]


def test_corrupt_science_stamp_still_measured(bad_packets):
    _, batch, table = bad_packets
    assert "science cutout: stampData is not valid gzip" in batch.problems[2]
    # no science stars: the PSF of the same readout-channel image is borrowed
    row, twin = table.iloc[2], table.iloc[4]
    assert row["psf_source"] == "quadrant" and not row["flags"] & BAD
    assert row["mag"] == pytest.approx(twin["mag"], abs=0.1)
    assert "science cutout" in row["problem"]


def test_other_alerts_measured_beside_bad_ones(bad_packets, result):
    _, _, table = bad_packets
    assert np.all(table["flags"][3:] == 0)
    ref = result[np.isin(result["candid"], table["candid"][3:])]
    np.testing.assert_allclose(np.sort(table["mag"][3:]), np.sort(ref["mag"]), atol=0.03)


def test_broken_packets_in_a_parquet_night(tmp_path, result):
    # a Parquet file of alerts with a truncated stamp, a missing cutout, an empty stamp and
    # a packet without candidate among good ones: those rows flagged with their reason,
    # every other alert measured as alone
    good = pq.read_table(PARQUET).select(list(PACKET_FIELDS)).to_pylist()
    broken = [dict(good[0]) for _ in range(4)]
    broken[0]["cutoutDifference"] = dict(broken[0]["cutoutDifference"], stampData=good[0]["cutoutDifference"]["stampData"][:2000])
    broken[1]["cutoutDifference"] = None
    broken[2]["cutoutDifference"] = dict(broken[2]["cutoutDifference"], stampData=b"")
    broken[3]["candidate"] = None
    for k, p in enumerate(broken):
        p["candid"] = 10 + k
    night = tmp_path / "night.parquet"
    pq.write_table(pa.Table.from_pylist(good[:3] + broken[:2] + good[3:] + broken[2:]), night)
    out = pd.concat(measure_files([night], chunk_size=5), ignore_index=True).set_index("candid")
    assert len(out) == 12
    reasons = {10: "not valid gzip", 11: "no difference cutout", 12: "empty stampData", 13: "packet has no candidate"}
    for candid, why in reasons.items():
        assert out.loc[candid, "flags"] == Flag.NO_DATA and why in out.loc[candid, "problem"] and np.isnan(out.loc[candid, "mag"])
    rest = out.drop(index=list(reasons))
    assert (rest["problem"] == "").all() and ((rest["flags"].to_numpy() & BAD) == 0).all()
    local = rest["psf_source"] == "local"
    np.testing.assert_allclose(rest["mag"][local], result.set_index("candid").loc[rest.index[local], "mag"], atol=1e-4)


# ---- command line ------------------------------------------------------------------------------
def test_cli_writes_parquet(tmp_path, capsys):
    out = tmp_path / "alerts.parquet"
    rc = main(["-q", "alert", str(DATA), "--out", str(out)])
    assert rc == 0
    t = pd.read_parquet(out)
    assert len(t) == 15
    for c in REQUIRED:
        assert c in t.columns
    assert b"ztfpsf" in pq.read_schema(out).metadata
    assert "15 alerts, 15 measured" in capsys.readouterr().out


def test_cli_bad_file_reported_others_measured(tmp_path, capsys, bad_packets):
    paths, _, _ = bad_packets
    trunc = tmp_path / "truncated.avro"
    trunc.write_bytes(AVRO.read_bytes()[:30000])
    good = tmp_path / "good.avro"
    shutil.copy(DATA / "697252845015010003.avro", good)
    out = tmp_path / "out.ecsv"
    rc = main(["-q", "alert", str(trunc), str(good), str(paths["nocut"]), "--out", str(out)])
    assert rc == 1  # some file failed; the rest written
    err = capsys.readouterr().err
    assert "truncated.avro" in err and "truncated or corrupt" in err
    t = Table.read(out, format="ascii.ecsv").to_pandas()
    assert len(t) == 2 and set(t["source"].str.rsplit("/", n=1).str[-1]) == {"good.avro#0", "nocut.avro#0"}
    by_source = t.set_index(t["source"].str.rsplit("/", n=1).str[-1])
    assert by_source.loc["good.avro#0", "flags"] == 0 and by_source.loc["nocut.avro#0", "flags"] & Flag.NO_DATA


def test_cli_user_errors(tmp_path, capsys):
    assert main(["alert", str(tmp_path / "missing.avro")]) == 2
    assert "missing.avro: no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["alert", str(tmp_path / "empty")]) == 2
    assert "no alert files" in capsys.readouterr().err
    trunc = tmp_path / "t.avro"
    trunc.write_bytes(AVRO.read_bytes()[:30000])
    assert main(["alert", str(trunc), "--out", str(tmp_path / "r.parquet")]) == 2
    assert "t.avro: truncated or corrupt Avro" in capsys.readouterr().err
    assert not (tmp_path / "r.parquet").exists()
    assert main(["alert", str(AVRO), "--gain", "-1"]) == 2


def test_decode_cutout_errors():
    with pytest.raises(ValueError, match="empty"):
        decode_cutout(b"")
    with pytest.raises(ValueError, match="not a FITS"):
        decode_cutout(gzip.compress(b"hello"))
    buf = io.BytesIO()
    fits.PrimaryHDU(np.zeros((63, 63), np.float32)).writeto(buf)
    with pytest.raises(ValueError, match="truncated"):
        decode_cutout(gzip.compress(buf.getvalue()[:5000]))


def test_config_defaults_documented():
    """Every option is described in the class docstring, and the defaults are usable."""
    from dataclasses import fields

    from ztfpsf.alerts.config import ZTF_GAIN

    doc = AlertPSFConfig.__doc__
    missing = [f.name for f in fields(AlertPSFConfig) if f.name not in doc]
    assert not missing, f"undocumented options: {missing}"
    cfg = AlertPSFConfig()
    assert cfg.gain == ZTF_GAIN == 6.2 and cfg.stamp_size % 2 == 1 and cfg.star_size % 2 == 1
    assert cfg.alpha_range[0] < cfg.default_alpha < cfg.alpha_range[1]
