"""Reading images: ZTF names and mask bits, header values, WCS, and every kind of bad file."""

import gzip
import logging

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from ztfpsf.io import ztf
from ztfpsf.io.fits import ExposureError, find_ztf_mask, read_exposure

SCI = "ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits"
MSK = "ztf_20200924431759_000655_zr_c13_o_q3_mskimg.fits"


# --------------------------------------------------------------------------------------
# ZTF names and mask bits
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected",
    [
        (SCI, dict(date="2020-09-24T10:21:43", field=655, filter="zr", ccd=13, qid=3, rcid=50, suffix="sciimg")),
        ("/data/ztf_20180529153021_000561_zg_c01_o_q1_mskimg.fits.gz", dict(field=561, filter="zg", ccd=1, qid=1, rcid=0, suffix="mskimg")),
        (
            "ztf_20211231999999_001801_zi_c16_o_q4_sciimg.fits.fz",
            dict(field=1801, filter="zi", ccd=16, qid=4, rcid=63, date="2021-12-31T23:59:59"),
        ),
        ("ztf_20190101000000_000245_zg_c05_o_q2_psfcat.fits", dict(date="2019-01-01T00:00:00", ccd=5, qid=2, rcid=17, suffix="psfcat")),
    ],
)
def test_parse_filename(name, expected):
    info = ztf.parse_filename(name)
    assert info is not None
    for key, value in expected.items():
        assert info[key] == value, key
    assert info["rcid"] == 4 * (info["ccd"] - 1) + info["qid"] - 1


@pytest.mark.parametrize(
    "name",
    [
        "image.fits",
        "ztf_2020092443175_000655_zr_c13_o_q3_sciimg.fits",  # 13-digit filefracday
        "ztf_20200924431759_000655_zr_c17_o_q3_sciimg.fits",  # no CCD 17
        "ztf_20200924431759_000655_zr_c00_o_q3_sciimg.fits",  # no CCD 0
        "ztf_20200924431759_000655_zr_c13_o_q5_sciimg.fits",  # no quadrant 5
        "ztf_20200924431759_000655_zx_c13_o_q3_sciimg.fits",  # no filter zx
        "ztf_20201324431759_000655_zr_c13_o_q3_sciimg.fits",  # month 13
        "ztf_20200924431759_000655_zr_c13_o_q3_sciimg.txt",
    ],
)
def test_parse_filename_rejects(name):
    assert ztf.parse_filename(name) is None
    assert not ztf.is_ztf_name(name)


def test_mskimg_name():
    assert ztf.mskimg_name(SCI) == MSK
    assert ztf.mskimg_name("dir/" + SCI + ".gz") is None or ztf.mskimg_name("dir/" + SCI[:-5] + ".fits.gz") == MSK[:-5] + ".fits.gz"
    assert ztf.mskimg_name(MSK) is None
    assert ztf.mskimg_name("image.fits") is None


def test_mask_bits_to_boolean():
    bit = ztf.MASK_BITS
    values = np.array(
        [
            [0, 1 << bit["sexsources"], 1 << bit["psfsources"], (1 << bit["sexsources"]) | (1 << bit["psfsources"])],
            [1 << bit["dead"], 1 << bit["saturated"], (1 << bit["sexsources"]) | (1 << bit["ghosts"]), 1 << bit["nan"]],
        ],
        dtype=np.int16,
    )
    default = ztf.mask_from_bits(values)
    np.testing.assert_array_equal(default, [[False, False, False, False], [True, True, True, True]])
    # only some bits bad: names, a comma-separated string or the integer value
    only = ztf.mask_from_bits(values, ("saturated", "nan"))
    np.testing.assert_array_equal(only, [[False] * 4, [False, True, False, True]])
    np.testing.assert_array_equal(ztf.mask_from_bits(values, "saturated, nan"), only)
    np.testing.assert_array_equal(ztf.mask_from_bits(values, ztf.bad_bits_value(("saturated", "nan"))), only)
    assert ztf.bad_bits_value(()) == 0
    assert ztf.bad_bits_value(ztf.DEFAULT_BAD_BITS) == 0x17FD  # all 13 bits but 1 and 11
    with pytest.raises(ValueError, match="unknown ZTF mask bit 'cosmic'"):
        ztf.bad_bits_value(("cosmic",))
    # a float mask (written as float by some tools) with NaN reads as integers, NaN as 0
    np.testing.assert_array_equal(ztf.mask_from_bits(np.array([np.nan, 512.0, 2.0])), [False, True, False])


# --------------------------------------------------------------------------------------
# a small ZTF-like pair
# --------------------------------------------------------------------------------------
def _tan_header(shape, scale_arcsec=1.01, ra=150.0, dec=30.0):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    w.wcs.cd = np.array([[-scale_arcsec, 0.0], [0.0, scale_arcsec]]) / 3600.0
    return w.to_header()


@pytest.fixture
def ztf_pair(tmp_path):
    shape = (60, 80)
    rng = np.random.default_rng(1)
    data = rng.normal(150.0, 5.0, shape).astype(np.float32)
    data[10, 20] = 60000.0  # saturated
    data[30:33, 40:42] = np.nan
    header = _tan_header(shape)
    header.update(GAIN=6.2, READNOI=8.0, SATURATE=50000.0, MAGZP=26.2, SEEING=2.1, EXPTIME=30.0, BUNIT="DN")
    fits.PrimaryHDU(data, header).writeto(tmp_path / SCI)
    bits = np.zeros(shape, np.int16)
    bits[5, 5] = 1 << ztf.MASK_BITS["dead"]
    bits[6, 6] = 1 << ztf.MASK_BITS["sexsources"]  # a source, not a defect
    bits[7, 7] = 1 << ztf.MASK_BITS["ghosts"]
    fits.PrimaryHDU(bits).writeto(tmp_path / MSK)
    return tmp_path / SCI, data


def test_read_ztf_pair(ztf_pair):
    path, data = ztf_pair
    exp = read_exposure(path)
    assert exp.mask_path == path.with_name(MSK)
    assert find_ztf_mask(path) == path.with_name(MSK)
    assert exp.data.dtype == np.float32 and exp.data.dtype.isnative
    np.testing.assert_array_equal(np.isnan(exp.data), np.isnan(data))
    expected = np.isnan(data)
    expected[5, 5] = expected[7, 7] = True
    np.testing.assert_array_equal(exp.mask, expected)
    assert exp.saturated.sum() == 1 and exp.saturated[10, 20]
    assert (exp.gain, exp.read_noise, exp.saturation, exp.zeropoint, exp.seeing, exp.exptime) == (6.2, 8.0, 50000.0, 26.2, 2.1, 30.0)
    assert exp.sources["gain"] == "header GAIN" and exp.sources["read_noise"] == "header READNOI"
    assert exp.ztf["rcid"] == 50 and exp.filter == "zr"
    assert exp.wcs is not None and exp.pixel_scale == pytest.approx(1.01, rel=1e-6)
    summary = exp.summary()
    assert summary["masked_pixels"] == int(expected.sum()) and summary["ztf"]["field"] == 655


def test_options_override_header_and_mask_choices(ztf_pair, tmp_path):
    path, data = ztf_pair
    exp = read_exposure(path, gain=2.0, read_noise=5.0, saturation=100.0, zeropoint=25.0, mask=None)
    assert (exp.gain, exp.read_noise, exp.saturation, exp.zeropoint) == (2.0, 5.0, 100.0, 25.0)
    assert exp.sources["gain"] == "option"
    assert exp.mask_path is None and not exp.mask[5, 5]  # no mask file: only NaN masked
    assert exp.saturated.sum() == int((np.nan_to_num(data) >= 100.0).sum())
    # only the 'dead' bit: the ghost pixel is usable
    exp = read_exposure(path, bad_bits=("dead",))
    assert exp.mask[5, 5] and not exp.mask[7, 7] and not exp.mask[6, 6]
    # a generic mask file: non-zero = bad
    user = np.zeros(data.shape, np.uint8)
    user[0, :] = 1
    fits.PrimaryHDU(user).writeto(tmp_path / "my_mask.fits")
    exp = read_exposure(path, mask=tmp_path / "my_mask.fits")
    assert exp.mask[0].all() and not exp.mask[5, 5] and exp.mask_path.name == "my_mask.fits"
    fits.PrimaryHDU(np.zeros((3, 3), np.uint8)).writeto(tmp_path / "small_mask.fits")
    with pytest.raises(ExposureError, match=r"small_mask.fits: mask shape \(3, 3\) differs"):
        read_exposure(path, mask=tmp_path / "small_mask.fits")


def test_sciimg_without_mskimg_is_noted(tmp_path):
    fits.PrimaryHDU(np.ones((20, 20), np.float32)).writeto(tmp_path / SCI)
    exp = read_exposure(tmp_path / SCI)
    assert exp.mask_path is None and not exp.mask.any()
    assert any("no ZTF mskimg" in n for n in exp.notes)


# --------------------------------------------------------------------------------------
# bad input: one line naming the file and the problem
# --------------------------------------------------------------------------------------
@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.fits"
    fits.PrimaryHDU(np.arange(200 * 300, dtype=np.float32).reshape(200, 300)).writeto(path, checksum=True)
    return path


def test_truncated_fits(good_file, tmp_path):
    raw = good_file.read_bytes()
    for name, cut in (("half.fits", len(raw) // 2), ("block.fits", 2880 * 40), ("header.fits", 1000)):
        bad = tmp_path / name
        bad.write_bytes(raw[:cut])
        with pytest.raises(ExposureError) as err:
            read_exposure(bad)
        msg = str(err.value)
        assert msg.startswith(f"{bad}: truncated: {cut} of at least {len(raw)} bytes"), msg
        assert "\n" not in msg


def test_truncated_extension_and_gzip(tmp_path):
    path = tmp_path / "mef.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((100, 100), np.float32))]).writeto(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-3000])
    with pytest.raises(ExposureError, match=r"mef.fits: truncated: .*HDU 1"):
        read_exposure(path)
    gz = tmp_path / "cut.fits.gz"
    gz.write_bytes(gzip.compress(raw)[:-6])  # only the gzip trailer (CRC, size) is missing
    with pytest.raises(ExposureError, match=r"cut.fits.gz: corrupt or truncated gzip file"):
        read_exposure(gz)
    ok = tmp_path / "ok.fits.gz"
    ok.write_bytes(gzip.compress(raw))
    assert read_exposure(ok).shape == (100, 100)


def test_not_fits_empty_missing(tmp_path):
    text = tmp_path / "notes.fits"
    text.write_text("this is not an image\n")
    with pytest.raises(ExposureError, match=r"notes.fits: not a FITS file"):
        read_exposure(text)
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    with pytest.raises(ExposureError, match=r"empty.fits: empty file \(0 bytes\)"):
        read_exposure(empty)
    with pytest.raises(ExposureError, match=r"missing.fits: no such file"):
        read_exposure(tmp_path / "missing.fits")
    with pytest.raises(ExposureError, match="not a file"):
        read_exposure(tmp_path)


def test_empty_hdu_and_table_only(tmp_path):
    path = tmp_path / "nodata.fits"
    fits.PrimaryHDU().writeto(path)
    with pytest.raises(ExposureError, match=r"nodata.fits: no 2-D image in any HDU \(0: PrimaryHDU None\)"):
        read_exposure(path)
    table = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("a", "E", array=np.ones(3))])]).writeto(table)
    with pytest.raises(ExposureError, match="no 2-D image"):
        read_exposure(table)
    cube = tmp_path / "cube.fits"
    fits.PrimaryHDU(np.ones((3, 4, 5), np.float32)).writeto(cube)
    with pytest.raises(ExposureError, match="no 2-D image"):
        read_exposure(cube)


def test_checksum_mismatch(good_file, tmp_path):
    raw = bytearray(good_file.read_bytes())
    raw[-5000] ^= 0xFF  # one flipped byte in the data
    bad = tmp_path / "flipped.fits"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ExposureError, match=r"flipped.fits: corrupt file: .*verification failed"):
        read_exposure(bad)


# --------------------------------------------------------------------------------------
# pixels, HDUs, WCS, units
# --------------------------------------------------------------------------------------
def test_nan_regions_masked(tmp_path, caplog):
    data = np.ones((50, 50), np.float32)
    data[:, :5] = np.nan  # a NaN border
    data[20:25, 20:25] = np.inf
    path = tmp_path / "nan.fits"
    fits.PrimaryHDU(data).writeto(path)
    exp = read_exposure(path)
    np.testing.assert_array_equal(exp.mask, ~np.isfinite(data))
    assert any("275 NaN/inf pixels" in n for n in exp.notes)
    allnan = tmp_path / "allnan.fits"
    fits.PrimaryHDU(np.full((10, 10), np.nan, np.float32)).writeto(allnan)
    with caplog.at_level(logging.WARNING, logger="ztfpsf.io.fits"):
        exp = read_exposure(allnan)
    assert exp.mask.all()
    assert "every pixel is masked" in caplog.text


def test_dtypes(tmp_path):
    for dtype, expected in ((np.int16, np.float32), (np.float32, np.float32), (np.float64, np.float64), (">f8", np.float64)):
        path = tmp_path / f"d_{np.dtype(dtype).str.strip('<>|')}.fits"
        fits.PrimaryHDU(np.arange(12, dtype=dtype).reshape(3, 4)).writeto(path, overwrite=True)
        exp = read_exposure(path)
        assert exp.data.dtype == expected and exp.data.dtype.isnative
        np.testing.assert_array_equal(exp.data, np.arange(12).reshape(3, 4))


def test_image_in_extension_and_hdu_choice(tmp_path):
    primary = fits.PrimaryHDU()
    primary.header["GAIN"] = 1.5
    primary.header["RDNOISE"] = 4.0
    sci = fits.ImageHDU(np.full((8, 9), 3.0, np.float32), name="SCI")
    other = fits.ImageHDU(np.full((8, 9), 7.0, np.float32), name="OTHER")
    path = tmp_path / "mef.fits"
    fits.HDUList([primary, sci, other]).writeto(path)
    exp = read_exposure(path)
    assert exp.hdu == 1 and exp.data[0, 0] == 3.0
    assert exp.gain == 1.5 and exp.read_noise == 4.0  # primary keywords complete the extension's
    assert read_exposure(path, hdu="OTHER").data[0, 0] == 7.0
    assert read_exposure(path, hdu=2).data[0, 0] == 7.0
    with pytest.raises(ExposureError, match=r"mef.fits: no HDU 'NOPE'"):
        read_exposure(path, hdu="NOPE")
    with pytest.raises(ExposureError, match="no HDU 7"):
        read_exposure(path, hdu=7)
    with pytest.raises(ExposureError, match="HDU 0 holds no 2-D image"):
        read_exposure(path, hdu=0)


def test_compressed_image(tmp_path):
    data = np.random.default_rng(0).normal(100, 5, (40, 50)).astype(np.float32)
    path = tmp_path / "c.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type="GZIP_2")]).writeto(path)
    exp = read_exposure(path)
    np.testing.assert_allclose(exp.data, data, atol=0.5)  # float tile compression quantises


def test_wcs_kinds(tmp_path):
    data = np.zeros((30, 40), np.float32)
    none = tmp_path / "none.fits"
    fits.PrimaryHDU(data).writeto(none)
    exp = read_exposure(none)
    assert exp.wcs is None and exp.pixel_scale is None and "no WCS" in exp.wcs_note
    assert read_exposure(none, pixel_scale=0.5).pixel_scale == 0.5

    linear = fits.Header({"CTYPE1": "LINEAR", "CTYPE2": "LINEAR", "CRPIX1": 1.0, "CRPIX2": 1.0, "CDELT1": 2.0, "CDELT2": 2.0})
    path = tmp_path / "linear.fits"
    fits.PrimaryHDU(data, linear).writeto(path)
    exp = read_exposure(path)
    assert exp.wcs is None and "not celestial" in exp.wcs_note

    galactic = fits.Header({"CTYPE1": "GLON-CAR", "CTYPE2": "GLAT-CAR", "CRPIX1": 20.0, "CRPIX2": 15.0, "CRVAL1": 18.0, "CRVAL2": 0.0})
    galactic.update({"CD1_1": -1.2 / 3600, "CD2_2": 1.2 / 3600, "CD1_2": 0.0, "CD2_1": 0.0})
    path = tmp_path / "galactic.fits"
    fits.PrimaryHDU(data, galactic).writeto(path)
    exp = read_exposure(path)
    assert exp.wcs is not None and "GLON" in exp.wcs_note
    assert exp.pixel_scale == pytest.approx(1.2, rel=1e-6)

    header = _tan_header(data.shape, scale_arcsec=0.25)
    header["PIXSCALE"] = 9.0  # the WCS wins over a keyword
    path = tmp_path / "tan.fits"
    fits.PrimaryHDU(data, header).writeto(path)
    assert read_exposure(path).pixel_scale == pytest.approx(0.25, rel=1e-6)
    nowcs = tmp_path / "kw.fits"
    fits.PrimaryHDU(data, fits.Header({"PIXSCALE": 0.4})).writeto(nowcs)
    exp = read_exposure(nowcs)
    assert exp.pixel_scale == 0.4 and exp.sources["pixel_scale"] == "header PIXSCALE"


def test_gain_not_applied_to_calibrated_units(tmp_path):
    header = fits.Header({"BUNIT": "MJy/sr", "GAIN": 3.7})
    path = tmp_path / "mjy.fits"
    fits.PrimaryHDU(np.ones((10, 10), np.float32), header).writeto(path)
    exp = read_exposure(path)
    assert exp.gain is None and any("GAIN 3.7 not used" in n for n in exp.notes)
    assert read_exposure(path, gain=2.0).gain == 2.0  # an explicit option is the user's call
    zero = tmp_path / "gain0.fits"
    fits.PrimaryHDU(np.ones((10, 10), np.float32), fits.Header({"GAIN": 0.0, "SATURATE": -1})).writeto(zero)
    exp = read_exposure(zero)
    assert exp.gain is None and exp.saturation is None and len(exp.notes) == 2
