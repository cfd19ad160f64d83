"""Result files: star tables as Parquet with metadata, JSON summaries; atomic writes.

Every file is written to a temporary name in the same directory and renamed into place
(:func:`atomic_write`), so an interrupted run never leaves a half-written file under the
final name; the file gets the permissions of any other new file (``0666`` less the umask).
"""

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.table import Table

__all__ = ["atomic_write", "atomic_path", "result_paths", "save_npy", "write_parquet", "read_parquet", "write_json", "read_json", "METADATA_KEY"]

METADATA_KEY = b"ztfpsf"


def result_paths(out_dir, stem):
    """Paths of one image's outputs in ``out_dir`` (they need not exist)."""
    out = Path(out_dir)
    return {
        "stars": out / f"{stem}.stars.parquet",
        "summary": out / f"{stem}.summary.json",
        "psf": out / f"{stem}.psf.fits",
        "history": out / f"{stem}.history.npy",
        "report": out / f"{stem}.report.html",
        "residual": out / f"{stem}.residual.fits",  # ztfpsf catalog --residual-image: data - fitted sources
    }


def _umask():
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:  # pragma: no cover - not Linux
        pass
    mask = os.umask(0o022)  # pragma: no cover
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds.

    The temporary file of ``mkstemp`` is private (0600); it is given the mode a plain
    ``open()`` would have (``0666 & ~umask``) before the rename, so results are as
    readable as every other file the user writes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # a unique free name: writers that refuse to overwrite work too
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path, write):
    """Write ``path`` atomically: ``write(tmp)`` writes a temporary file beside it, which is
    renamed to ``path`` only if ``write`` returns. Returns ``path`` (a Path).

    ``write`` gets the temporary path (a free name), e.g.
    ``atomic_write(p, lambda tmp: hdul.writeto(tmp))``.
    """
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def save_npy(array, path):
    """``np.save`` atomically (to a file object: np.save would add '.npy' to the temporary name)."""

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    return atomic_write(path, write)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json(obj, path):
    """Write ``obj`` as indented JSON (NaN/inf become null), atomically."""
    text = json.dumps(_jsonable(obj), indent=1) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path):
    return json.loads(Path(path).read_text())


def write_parquet(table, path, metadata):
    """Write an astropy Table as Parquet; ``metadata`` (JSON) under the ``ztfpsf`` key,
    column units included."""
    columns = {}
    for name in table.colnames:
        col = np.asarray(table[name])
        if col.dtype.kind in "US":
            col = col.astype(str)
        columns[name] = col
    meta = dict(metadata)
    meta.setdefault("units", {name: str(table[name].unit) for name in table.colnames if table[name].unit is not None})
    arrow = pa.table(columns)
    arrow = arrow.replace_schema_metadata({METADATA_KEY: json.dumps(_jsonable(meta)).encode()})
    return atomic_write(path, lambda tmp: pq.write_table(arrow, tmp))


def read_parquet(path):
    """Read a result table; its ``meta`` holds the ``ztfpsf`` metadata (empty if none).

    Raises FileNotFoundError or ValueError, naming the file, when it is missing, not
    Parquet, or its metadata is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file")
    try:
        arrow = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a Parquet file ({err})") from None
    table = Table({name: arrow.column(name).to_numpy(zero_copy_only=False) for name in arrow.column_names})
    raw = (arrow.schema.metadata or {}).get(METADATA_KEY)
    if raw:
        try:
            table.meta.update(json.loads(raw))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: the 'ztfpsf' metadata is not valid JSON ({err})") from None
    return table
