"""ZTF alert packets: read Avro files and Parquet files of alerts.

A ZTF alert (schema ``ztf.alert``, versions 3.0-3.3 here) carries ``objectId``,
``candid``, ``candidate`` (the IPAC pipeline's measurements of the detection) and three
cutouts ``cutoutScience``, ``cutoutTemplate``, ``cutoutDifference``, each
``{fileName, stampData}`` where ``stampData`` is a gzipped FITS file holding a 63x63
float32 image centred on the candidate (smaller near a readout-channel edge).

* Avro (``.avro``): one or more packets per file, read with ``fastavro``.
* Parquet (``.parquet``, e.g. the Fink/ALeRCE archives): one row per alert, the same fields
  (``candidate`` and the cutouts as structs), read with ``pyarrow``.

:func:`read_alerts` returns :class:`Alert` objects with the cutouts as numpy arrays
(``None`` for a missing or undecodable cutout, with the reason in ``Alert.problems``).
A file that cannot be read at all (missing, not Avro/Parquet, truncated, corrupt) raises
:class:`AlertFileError` naming the file; with ``strict=False`` the alerts read before a
corruption are returned and the problem is logged.

Cutout axes follow the readout channel's pixel axes (no flip): ``array[row, column]``.
For ``isdiffpos = 'f'`` the difference cutout is reference minus science, so the candidate
is positive in it for both signs.
"""

import gzip
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "Alert",
    "AlertFileError",
    "CUTOUTS",
    "ALERT_SUFFIXES",
    "read_alerts",
    "iter_alerts",
    "decode_cutout",
    "find_alert_files",
]

#: Packet field of each cutout, by the short name used on :class:`Alert`.
CUTOUTS = {"science": "cutoutScience", "template": "cutoutTemplate", "difference": "cutoutDifference"}
#: File name endings read as alert files.
ALERT_SUFFIXES = (".avro", ".parquet", ".parq")


class AlertFileError(ValueError):
    """An alert file that cannot be read (missing, wrong format, truncated or corrupt)."""


@dataclass
class Alert:
    """One ZTF alert: identifiers, the pipeline's candidate fields and the three cutouts.

    ``science``, ``template``, ``difference`` are 2-D float arrays ``[row, column]`` (DN),
    or ``None`` when the packet has no such cutout or it could not be decoded; the reasons
    are in ``problems``. ``source`` is ``"<file>#<record>"``.
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


# --------------------------------------------------------------------------------------
# cutouts
# --------------------------------------------------------------------------------------
def decode_cutout(stamp_data):
    """``stampData`` bytes (gzipped FITS, or plain FITS) -> 2-D float32 array [row, column].

    Raises ``ValueError`` with the reason when the bytes are not a FITS image.
    """
    from astropy.io import fits

    if stamp_data is None or len(stamp_data) == 0:
        raise ValueError("empty stampData")
    raw = bytes(stamp_data)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"stampData is not valid gzip: {err}") from None
    if not raw.startswith(b"SIMPLE"):
        raise ValueError("stampData is not a FITS file")
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


def _iter_parquet(path, batch_size=64):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:
        raise AlertFileError(f"{path}: not a readable Parquet file: {err}") from None
    names = set(pf.schema_arrow.names)
    if "candidate" not in names:
        raise AlertFileError(f"{path}: Parquet file has no 'candidate' column: not a file of alerts")
    columns = [c for c in _PARQUET_COLUMNS if c in names]
    i = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            for record in batch.to_pylist():
                yield record, i
                i += 1
    except AlertFileError:
        raise
    except Exception as err:
        raise AlertFileError(f"{path}: corrupt Parquet file after {i} alert(s): {type(err).__name__}: {err}") from None


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


def find_alert_files(paths):
    """Expand files and directories (searched recursively) into sorted alert files."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.name.lower().endswith(ALERT_SUFFIXES)))
        else:
            out.append(p)
    return out
