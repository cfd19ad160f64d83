"""ZTF alert packets: read Avro and Parquet files of alerts into columnar batches.

A ZTF alert (schema ``ztf.alert``, versions 3.0-3.3 here) carries ``objectId``,
``candid``, ``candidate`` (the IPAC pipeline's measurements of the detection) and three
cutouts ``cutoutScience``, ``cutoutTemplate``, ``cutoutDifference``, each
``{fileName, stampData}`` where ``stampData`` is a gzipped FITS file holding a 63x63
float32 image centred on the candidate (smaller near a readout-channel edge).

* Avro (``.avro``): one or more packets per file, read with ``fastavro``.
* Parquet (``.parquet``, e.g. the Fink/ALeRCE archives): one row per alert, the same fields
  (``candidate`` and the cutouts as structs), read with ``pyarrow`` column by column.

The measurement works on an :class:`AlertBatch`: the candidate fields as a pandas
DataFrame and each kind of cutout as one ``(N, 63, 63)`` float32 array. A cutout cut short
at the channel's edge is placed in its 63x63 frame where the full cutout would have had
it (NaN elsewhere), so the candidate is always at ``31 + xpos - round(xpos)``;
``AlertBatch.offset`` gives each cutout's place in its frame. :func:`iter_batches` streams
files as batches of at most ``chunk_size`` alerts (each file read once, memory bounded by
the chunk); :func:`batch_from_table` takes alerts a caller already holds (a pyarrow or
pandas table, e.g. in a Spark pandas UDF or a Kafka consumer). :func:`read_alerts` gives
single :class:`Alert` objects for looking at a few packets.

A packet that cannot be used (no candidate, a cutout missing, truncated or not FITS) is
kept: its cutout is NaN and the reason is in ``AlertBatch.problems``. A file that cannot be
read at all (missing, not Avro/Parquet, truncated, corrupt) raises :class:`AlertFileError`
naming the file, after the alerts read before the damage.

Cutout axes follow the readout channel's pixel axes (no flip): ``array[row, column]``.
For ``isdiffpos = 'f'`` the difference cutout is reference minus science, so the candidate
is positive in it for both signs.
"""

import io
import logging
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

try:  # ISA-L inflate: 2x zlib's speed on the cutouts (decompression dominates reading)
    from isal.isal_zlib import decompress as _inflate
except ImportError:  # pragma: no cover - a platform without isal wheels
    from zlib import decompress as _inflate

log = logging.getLogger(__name__)

__all__ = [
    "Alert",
    "AlertBatch",
    "AlertFileError",
    "CUTOUTS",
    "CUTOUT_SIZE",
    "ALERT_SUFFIXES",
    "read_alerts",
    "iter_alerts",
    "iter_batches",
    "batch_from_table",
    "batch_from_records",
    "batch_from_alerts",
    "decode_cutout",
    "find_alert_files",
]

#: Packet field of each cutout, by the short name used on :class:`Alert` and :class:`AlertBatch`.
CUTOUTS = {"science": "cutoutScience", "template": "cutoutTemplate", "difference": "cutoutDifference"}
#: File name endings read as alert files.
ALERT_SUFFIXES = (".avro", ".parquet", ".parq")
#: Side of a full ZTF cutout [px].
CUTOUT_SIZE = 63
#: Alerts per batch of :func:`iter_batches`: 0.1 GB of decoded cutouts, and each (N, 63, 63)
#: stack under glibc's 32 MiB limit for memory it reuses instead of mapping it afresh
#: (fresh pages cost more than the arithmetic on them).
DEFAULT_CHUNK = 2048


class AlertFileError(ValueError):
    """An alert file that cannot be read (missing, wrong format, truncated or corrupt)."""


@dataclass
class Alert:
    """One ZTF alert: identifiers, the pipeline's candidate fields and the three cutouts.

    ``science``, ``template``, ``difference`` are 2-D float arrays ``[row, column]`` (DN)
    in their own shape, or ``None`` when the packet has no such cutout or it could not be
    decoded; the reasons are in ``problems``. ``source`` is ``"<file>#<record>"``.
    """

    objectId: str
    candid: int
    candidate: dict
    science: np.ndarray | None = None
    template: np.ndarray | None = None
    difference: np.ndarray | None = None
    schemavsn: str | None = None
    source: str = ""
    file_names: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    def cutout(self, name):
        """A cutout by its short name (``science``, ``template``, ``difference``)."""
        return getattr(self, name)


@dataclass
class AlertBatch:
    """N alerts, column by column.

    objectId, source : (N,) object arrays of str (``source`` is ``"<file>#<record>"``)
    candid : (N,) int64 (-1 when the packet has none)
    candidate : pandas DataFrame, the candidate fields (one row per alert, index 0..N-1;
        fields a schema version lacks are NaN/None)
    science, template, difference : (N, 63, 63) float32, each cutout in its frame, NaN
        where the cutout is missing, undecodable or cut short
    shape : (N, 3, 2) int16, (rows, columns) of each decoded cutout (science, template,
        difference), 0 when there is none
    offset : (N, 2) int16, (column, row) of a cutout's pixel [0, 0] in its frame (non-zero
        when the channel's edge cut its low side)
    problems : (N,) object array of str, what is wrong with each packet ('' if nothing)
    """

    objectId: np.ndarray
    candid: np.ndarray
    candidate: pd.DataFrame
    science: np.ndarray
    template: np.ndarray
    difference: np.ndarray
    shape: np.ndarray
    offset: np.ndarray
    problems: np.ndarray
    source: np.ndarray

    def __len__(self):
        return len(self.candid)

    def cutout(self, name):
        """A cutout stack by its short name (``science``, ``template``, ``difference``)."""
        return getattr(self, name)

    def field(self, key, dtype=np.float64):
        """One candidate field as an array (NaN, or -1 for integers, where missing)."""
        if key not in self.candidate.columns:
            return np.full(len(self), -1 if np.dtype(dtype).kind == "i" else np.nan, dtype)
        col = pd.to_numeric(self.candidate[key], errors="coerce")
        if np.dtype(dtype).kind == "i":
            return col.fillna(-1).to_numpy(dtype)
        return col.to_numpy(dtype, na_value=np.nan)

    def take(self, index):
        """The alerts at ``index`` (positions) as a new batch."""
        index = np.asarray(index)
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in out.items():
            out[name] = value.iloc[index].reset_index(drop=True) if isinstance(value, pd.DataFrame) else value[index]
        return AlertBatch(**out)

    @staticmethod
    def concat(batches):
        """One batch of several, in order."""
        batches = list(batches)
        out = {}
        for f in fields(AlertBatch):
            parts = [getattr(b, f.name) for b in batches]
            out[f.name] = pd.concat(parts, ignore_index=True) if f.name == "candidate" else np.concatenate(parts)
        return AlertBatch(**out)


# --------------------------------------------------------------------------------------
# cutouts
# --------------------------------------------------------------------------------------
_FITS_DTYPES = {-32: ">f4", -64: ">f8", 8: "u1", 16: ">i2", 32: ">i4", 64: ">i8"}


def _fits_header(raw):
    """Cards of the primary header of plain FITS bytes and the offset of its data."""
    cards = {}
    for start in range(0, len(raw) - 79, 80):
        card = raw[start : start + 80]
        key = card[:8].rstrip()
        if key == b"END":
            return cards, -(-(start + 80) // 2880) * 2880
        if card[8:10] == b"= ":
            cards[key.decode("ascii", "replace")] = card[10:].split(b"/", 1)[0].strip()
    raise ValueError("stampData FITS cannot be read: header has no END card")


def _fast_image(raw):
    """The primary image of plain FITS bytes, or None when the file needs astropy
    (an image in an extension, scaling of integer data...)."""
    cards, start = _fits_header(raw)
    try:
        bitpix, naxis = int(cards["BITPIX"]), int(cards["NAXIS"])
        nx, ny = int(cards["NAXIS1"]), int(cards["NAXIS2"])
    except (KeyError, ValueError):
        return None
    if naxis != 2 or bitpix not in _FITS_DTYPES or any(k in cards for k in ("BZERO", "BSCALE", "BLANK")):
        return None
    dtype = np.dtype(_FITS_DTYPES[bitpix])
    if len(raw) < start + nx * ny * dtype.itemsize:
        raise ValueError(f"stampData FITS cannot be read: truncated ({len(raw)} bytes for a {ny}x{nx} image)")
    return np.frombuffer(raw, dtype, nx * ny, start).reshape(ny, nx)


def decode_cutout(stamp_data):
    """``stampData`` bytes (gzipped FITS, or plain FITS) -> 2-D float32 array [row, column].

    Raises ``ValueError`` with the reason when the bytes are not a FITS image.
    """
    return np.asarray(_decode(stamp_data), dtype=np.float32)


def _decode(stamp_data):
    """The image of ``stampData`` in its FITS dtype (a read-only view where possible)."""
    if stamp_data is None or len(stamp_data) == 0:
        raise ValueError("empty stampData")
    raw = stamp_data
    if bytes(raw[:2]) == b"\x1f\x8b":
        try:
            raw = _inflate(raw, 47)  # 32 + 15: the gzip wrapper, 32 KiB window
        except Exception as err:  # zlib.error / isal's IsalError: a truncated or damaged stream
            raise ValueError(f"stampData is not valid gzip: {err}") from None
    raw = bytes(raw)
    if not raw.startswith(b"SIMPLE"):
        raise ValueError("stampData is not a FITS file")
    image = _fast_image(raw)
    return image if image is not None else _astropy_image(raw)


def _astropy_image(raw):
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncated-file warnings: checked below
            with fits.open(io.BytesIO(raw), memmap=False) as hdul:
                for hdu in hdul:
                    if hdu.data is not None and getattr(hdu.data, "ndim", 0) == 2:
                        return np.asarray(hdu.data, dtype=np.float32)
    except Exception as err:  # astropy raises several types for broken FITS
        raise ValueError(f"stampData FITS cannot be read: {err}") from None
    raise ValueError("stampData FITS holds no 2-D image")


def frame_offset(pos, n, full=CUTOUT_SIZE):
    """Offset of a cutout of ``n`` px along an axis in its full frame: a cutout cut short
    by the channel's edge lost its pixels on the side of that edge; one whose candidate
    (1-based ``pos``) lies within 31 px of pixel 1 lost the low side."""
    pos = np.asarray(pos, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        low_cut = (n < full) & (np.round(pos) - (full - 1) // 2 < 1)
    return np.where(low_cut, full - n, 0).astype(np.int16)


def _decode_into(stamps, xpos, ypos, frames, shape, offset, problems, name):
    """Decode one kind of cutout of every alert (``stampData`` bytes, or an image already
    decoded) into ``frames`` (N, 63, 63), NaN-filled."""
    for i, stamp in enumerate(stamps):
        if stamp is None:
            if problems is not None:
                problems[i].append(f"no {name} cutout")
            continue
        try:
            img = stamp if isinstance(stamp, np.ndarray) else _decode(stamp)
        except ValueError as err:
            problems[i].append(f"{name} cutout: {err}")
            continue
        ny, nx = img.shape
        if ny > CUTOUT_SIZE or nx > CUTOUT_SIZE:
            problems[i].append(f"{name} cutout: {ny}x{nx} is larger than {CUTOUT_SIZE}x{CUTOUT_SIZE}")
            continue
        ox = 0 if nx == CUTOUT_SIZE else int(frame_offset(xpos[i], nx))
        oy = 0 if ny == CUTOUT_SIZE else int(frame_offset(ypos[i], ny))
        frames[i, oy : oy + ny, ox : ox + nx] = img
        shape[i] = (ny, nx)
        if name == "difference":
            offset[i] = (ox, oy)


def _build(objectId, candid, candidate, cutouts, sources, problems, reported=None):
    """An :class:`AlertBatch` from per-alert identifiers, the candidate DataFrame and the
    ``stampData`` of each cutout kind (lists of bytes, decoded images or None);
    ``reported``: the problems already known (decoded cutouts), instead of ``problems``."""
    n = len(candid)
    candidate = candidate.reset_index(drop=True)
    xpos = pd.to_numeric(candidate["xpos"], errors="coerce").to_numpy(float) if "xpos" in candidate else np.full(n, np.nan)
    ypos = pd.to_numeric(candidate["ypos"], errors="coerce").to_numpy(float) if "ypos" in candidate else np.full(n, np.nan)
    shape = np.zeros((n, 3, 2), np.int16)
    offset = np.zeros((n, 2), np.int16)
    stacks = {}
    for k, name in enumerate(CUTOUTS):
        frames = np.full((n, CUTOUT_SIZE, CUTOUT_SIZE), np.nan, np.float32)
        _decode_into(cutouts[name], xpos, ypos, frames, shape[:, k], offset, None if reported else problems, name)
        stacks[name] = frames
    if reported:
        problems = reported
    return AlertBatch(
        objectId=np.asarray(objectId, dtype=object),
        candid=np.asarray(candid, dtype=np.int64),
        candidate=candidate,
        shape=shape,
        offset=offset,
        problems=np.array(["; ".join(p) for p in problems], dtype=object),
        source=np.asarray(sources, dtype=object),
        **stacks,
    )


def _stamp_data(cut):
    """``stampData`` of one cutout value: a ``{fileName, stampData}`` dict or plain bytes."""
    if isinstance(cut, dict):
        return cut.get("stampData")
    return cut if isinstance(cut, (bytes, bytearray, memoryview)) else None


def batch_from_alerts(alerts):
    """An :class:`AlertBatch` of :class:`Alert` objects (cutouts already decoded)."""
    alerts = list(alerts)
    n = len(alerts)
    candidate = pd.DataFrame.from_records([a.candidate for a in alerts], index=range(n)) if n else pd.DataFrame()
    cutouts = {name: [a.cutout(name) for a in alerts] for name in CUTOUTS}
    return _build(
        [a.objectId for a in alerts], [a.candid for a in alerts], candidate, cutouts, [a.source for a in alerts],
        [[] for _ in alerts], reported=[list(a.problems) for a in alerts],
    )


def batch_from_records(records, sources=None):
    """An :class:`AlertBatch` from packets as dicts (as ``fastavro`` gives them)."""
    records = list(records)
    n = len(records)
    sources = sources if sources is not None else [f"#{i}" for i in range(n)]
    problems = [[] for _ in range(n)]
    cands = []
    for i, r in enumerate(records):
        cand = r.get("candidate")
        if not isinstance(cand, dict) or not cand:
            problems[i].append("packet has no candidate record")
            cand = {}
        cands.append(cand)
    candidate = pd.DataFrame.from_records(cands, index=range(n)) if n else pd.DataFrame()
    candid = [r.get("candid", c.get("candid")) for r, c in zip(records, cands)]
    candid = [-1 if c is None else int(c) for c in candid]
    cutouts = {name: [_stamp_data(r.get(key)) for r in records] for name, key in CUTOUTS.items()}
    objectId = [str(r.get("objectId") or "") for r in records]
    return _build(objectId, candid, candidate, cutouts, sources, problems)


def _column(table, name):
    """A top-level column of a pyarrow table or batch, or None."""
    return table.column(name) if name in table.schema.names else None


def _arrow_stamps(col):
    """``stampData`` of a cutout column (struct with ``stampData``, or binary) as a list."""
    import pyarrow as pa

    if col is None:
        return None
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_struct(col.type):
        k = col.type.get_field_index("stampData")
        return None if k < 0 else _binary_views(col.flatten()[k])  # flatten: a null struct gives nulls
    return _binary_views(col)


def _binary_views(arr):
    """The values of a pyarrow binary array as memoryviews of its data buffer (no copy;
    None for a null), or None for another type."""
    import pyarrow as pa

    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        _, offsets, data = arr.buffers()
        bounds = np.frombuffer(offsets, np.int64 if pa.types.is_large_binary(arr.type) else np.int32)
        bounds = bounds[arr.offset : arr.offset + len(arr) + 1].tolist()
        view = memoryview(data) if data is not None else memoryview(b"")
        valid = arr.is_valid().to_numpy(zero_copy_only=False).tolist()
        return [view[a:b] if ok else None for a, b, ok in zip(bounds[:-1], bounds[1:], valid)]
    if pa.types.is_null(arr.type):
        return [None] * len(arr)
    return None


def _arrow_candidate(table, n):
    """The candidate fields as a DataFrame: a ``candidate`` struct column, or
    ``candidate.<field>`` / plain top-level columns (a flattened table)."""
    import pyarrow as pa

    col = _column(table, "candidate")
    if col is not None:
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if pa.types.is_struct(col.type):
            names = [col.type.field(i).name for i in range(col.type.num_fields)]
            valid = col.is_valid().to_numpy(zero_copy_only=False)
            frame = pd.DataFrame(dict(zip(names, (a.to_pandas() for a in col.flatten())))) if names else pd.DataFrame(index=range(n))
            return frame, valid
    flat = {k.split(".", 1)[1]: table.column(k).to_pandas() for k in table.schema.names if k.startswith("candidate.")}
    if not flat:
        flat = {k: table.column(k).to_pandas() for k in table.schema.names if k not in ("objectId", "candid", *CUTOUTS.values())}
    frame = pd.DataFrame(flat, index=range(n)) if flat else pd.DataFrame(index=range(n))
    return frame, np.full(n, bool(flat))


def batch_from_table(table, sources=None):
    """An :class:`AlertBatch` from alerts a caller holds, one row per alert.

    ``table``: a ``pyarrow.Table`` / ``RecordBatch`` or a ``pandas.DataFrame`` with
    ``objectId``, ``candid`` (or ``candidate.candid``), ``candidate`` (a struct, or its
    fields as ``candidate.<name>`` or plain columns) and the cutout columns
    ``cutoutScience``, ``cutoutTemplate``, ``cutoutDifference`` (structs with
    ``stampData``, or the bytes themselves). Missing columns leave the affected alerts
    unmeasurable with the reason in ``problems``; nothing is raised for a bad row.
    """
    import pyarrow as pa

    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    n = table.num_rows
    candidate, has_candidate = _arrow_candidate(table, n)
    problems = [[] if ok else ["packet has no candidate record"] for ok in has_candidate]
    candid = _column(table, "candid")
    candid = candid.to_pandas() if candid is not None else candidate.get("candid", pd.Series([None] * n))
    candid = pd.to_numeric(candid, errors="coerce").fillna(-1).to_numpy(np.int64)
    oid = _column(table, "objectId")
    objectId = ["" if v is None else str(v) for v in oid.to_pylist()] if oid is not None else [""] * n
    cutouts = {}
    for name, key in CUTOUTS.items():
        stamps = _arrow_stamps(_column(table, key))
        cutouts[name] = stamps if stamps is not None else [None] * n
    sources = sources if sources is not None else [f"#{i}" for i in range(n)]
    return _build(objectId, candid, candidate, cutouts, sources, problems)


def _make_alert(record, source):
    """An :class:`Alert` from one packet (a dict as fastavro / pyarrow give it)."""
    cand = record.get("candidate") or {}
    if not isinstance(cand, dict):
        cand = {}
    candid = record.get("candid", cand.get("candid"))
    alert = Alert(
        objectId=str(record.get("objectId") or ""),
        candid=int(candid) if candid is not None else -1,
        candidate=dict(cand),
        schemavsn=record.get("schemavsn"),
        source=source,
    )
    if not cand:
        alert.problems.append("packet has no candidate record")
    for short, key in CUTOUTS.items():
        cut = record.get(key)
        if not cut or cut.get("stampData") is None:
            alert.problems.append(f"no {short} cutout")
            continue
        alert.file_names[short] = cut.get("fileName")
        try:
            setattr(alert, short, decode_cutout(cut["stampData"]))
        except ValueError as err:
            alert.problems.append(f"{short} cutout: {err}")
    return alert


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------
def _file_format(path):
    name = path.name.lower()
    if name.endswith(".avro"):
        return "avro"
    if name.endswith((".parquet", ".parq")):
        return "parquet"
    # by content: Avro object container files start with b'Obj\x01', Parquet with b'PAR1'
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"Obj\x01":
        return "avro"
    if magic == b"PAR1":
        return "parquet"
    raise AlertFileError(f"{path}: not an alert file (expected Avro .avro or Parquet .parquet)")


def _iter_avro(path):
    import fastavro

    with open(path, "rb") as fh:
        try:
            reader = fastavro.reader(fh)
        except Exception as err:
            raise AlertFileError(f"{path}: not a readable Avro file: {err}") from None
        i = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except Exception as err:  # EOFError, ValueError, zlib errors... for truncation
                raise AlertFileError(
                    f"{path}: truncated or corrupt Avro file after {i} alert(s): {type(err).__name__}: {err}"
                ) from None
            yield record, i
            i += 1


_PARQUET_COLUMNS = ("objectId", "candid", "schemavsn", "candidate", *CUTOUTS.values())


def _parquet_file(path):
    import pyarrow.parquet as pq

    try:
        # pages read through a 4 MiB buffer as they are needed: pyarrow's default
        # (pre_buffer) caches every row group read until the file is closed, 0.33 GB per
        # 8,192 alerts, and costs 4x the CPU
        pf = pq.ParquetFile(path, buffer_size=1 << 22, pre_buffer=False)
    except Exception as err:
        raise AlertFileError(f"{path}: not a readable Parquet file: {err}") from None
    names = set(pf.schema_arrow.names)
    if "candidate" not in names:
        raise AlertFileError(f"{path}: Parquet file has no 'candidate' column: not a file of alerts")
    return pf, [c for c in _PARQUET_COLUMNS if c in names]


def _iter_parquet_tables(path, batch_size):
    """pyarrow record batches of a Parquet file of alerts and the row number of each start."""
    pf, columns = _parquet_file(path)
    i = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns, use_threads=False):
            yield batch, i
            i += batch.num_rows
    except Exception as err:
        raise AlertFileError(f"{path}: corrupt Parquet file after {i} alert(s): {type(err).__name__}: {err}") from None


def _iter_parquet(path, batch_size=64):
    for batch, start in _iter_parquet_tables(path, batch_size):
        for k, record in enumerate(batch.to_pylist()):
            yield record, start + k


def iter_alerts(path):
    """Yield the :class:`Alert` of every packet in an Avro or Parquet file, in file order.

    Raises :class:`AlertFileError` (naming the file) when the file is missing, is not an
    alert file, or is truncated/corrupt (after yielding the alerts read before that point).
    """
    path = Path(path)
    if not path.is_file():
        raise AlertFileError(f"{path}: no such file")
    fmt = _file_format(path)
    records = _iter_avro(path) if fmt == "avro" else _iter_parquet(path)
    for record, i in records:
        yield _make_alert(record, f"{path}#{i}")


def read_alerts(path, *, strict=True):
    """All alerts of one Avro or Parquet file as a list of :class:`Alert`.

    strict : bool
        True: a truncated/corrupt file raises :class:`AlertFileError`. False: the alerts
        read before the problem are returned and the problem is logged as a warning.
    """
    out = []
    try:
        for alert in iter_alerts(path):
            out.append(alert)
    except AlertFileError as err:
        if strict or not out:
            raise
        log.warning("%s (keeping the %d alert(s) read before it)", err, len(out))
    return out


def iter_batches(paths, *, chunk_size=DEFAULT_CHUNK, on_error=None):
    """Stream the alerts of Avro and Parquet files as :class:`AlertBatch` of at most
    ``chunk_size`` alerts, in file order; each file is read once. Packets of consecutive
    Avro files share batches.

    A file that cannot be read (or the rest of a truncated one) is passed to
    ``on_error(path, AlertFileError)`` and skipped; without ``on_error`` the error is
    raised (after the batches read before it).
    """
    records, sources = [], []

    def flush():
        batch = batch_from_records(records, sources)
        records.clear()
        sources.clear()
        return batch

    for path in map(Path, paths):
        try:
            if not path.is_file():
                raise AlertFileError(f"{path}: no such file")
            if _file_format(path) == "parquet":
                if records:  # file order: the Avro packets read before go first
                    yield flush()
                for table, start in _iter_parquet_tables(path, chunk_size):
                    n = table.num_rows
                    yield batch_from_table(table, [f"{path}#{start + k}" for k in range(n)])
                continue
            for record, i in _iter_avro(path):
                records.append(record)
                sources.append(f"{path}#{i}")
                if len(records) >= chunk_size:
                    yield flush()
        except AlertFileError as err:
            if on_error is None:
                raise
            on_error(path, err)
    if records:
        yield flush()


def find_alert_files(paths):
    """Expand files and directories (searched recursively) into sorted alert files."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.name.lower().endswith(ALERT_SUFFIXES)))
        else:
            out.append(p)
    return out
