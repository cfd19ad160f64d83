"""Real data fetched on demand: the ZTF science quadrant of the PSF study.

``ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits`` and its ``mskimg`` are public inside
the ``ztfimg==0.19.0`` source distribution on the Python package index
(``ztfimg/data/``). :func:`ztf_quadrant` downloads that sdist with pip (the package index
is the one network source a locked-down cluster usually reaches), extracts the two files
into a cache folder, checks their sha256 and returns their paths; later calls return the
cached files at once. Cache: ``$ZTFPSF_DATA_DIR`` or ``~/.cache/ztfpsf/data``.

Command line: ``python -m ztfpsf.datasets`` (or ``make data``) prints the two paths.
"""

import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["ztf_quadrant", "cache_dir", "QUADRANT_FILES", "DataError"]

SDIST = "ztfimg==0.19.0"
#: File name -> sha256 of the quadrant files inside the sdist.
QUADRANT_FILES = {
    "ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits": "0884728fcf98cb81c95961987c940069b00fe496552030f7610f6d6390b4dee4",
    "ztf_20200924431759_000655_zr_c13_o_q3_mskimg.fits": "dd636f16779a9aaadfab035243dadbed686ebaae8ffac157a60f5e30916ba8f2",
}


class DataError(RuntimeError):
    """The data could not be fetched or failed its checksum."""


def cache_dir():
    return Path(os.environ.get("ZTFPSF_DATA_DIR") or Path.home() / ".cache" / "ztfpsf" / "data")


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cached(folder):
    paths = [folder / name for name in QUADRANT_FILES]
    return paths if all(p.exists() for p in paths) else None


def _download_sdist(dest):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(dest), SDIST]
    log.info("fetching %s from the package index", SDIST)
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(Path(dest).glob("ztfimg-*.tar.gz"))
    if done.returncode != 0 or not found:
        raise DataError(f"pip download {SDIST} failed: {done.stderr.strip()[-500:]}")
    return found[0]


def _extract(sdist, folder):
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in QUADRANT_FILES and "/data/" in member.name:
                src = tar.extractfile(member)
                tmp = folder / (name + ".part")
                with open(tmp, "wb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
                digest = _sha256(tmp)
                if digest != QUADRANT_FILES[name]:
                    tmp.unlink()
                    raise DataError(f"{name}: sha256 {digest} does not match the expected {QUADRANT_FILES[name]}")
                os.replace(tmp, folder / name)


def ztf_quadrant(folder=None):
    """Paths ``(sciimg, mskimg)`` of the study's ZTF quadrant, fetched and verified once."""
    folder = Path(folder) if folder is not None else cache_dir()
    cached = _cached(folder)
    if cached:
        return tuple(cached)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _extract(_download_sdist(tmp), folder)
    cached = _cached(folder)
    if not cached:
        raise DataError(f"{SDIST} did not contain {sorted(QUADRANT_FILES)}")
    return tuple(cached)


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in ztf_quadrant():
        print(path)


if __name__ == "__main__":
    main()
