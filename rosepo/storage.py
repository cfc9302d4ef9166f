"""Atomic outputs, manifests and content hashes.

Every stage writes into a hidden temporary sibling of its output folder and renames it into
place at the end, so a reader sees either the whole output or nothing. A killed writer leaves
only a ``.tmp-*`` folder, which the next run of the stage removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from rosepo.errors import ConfigError

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``final`` when the block exits without error.

    On error the temporary folder is removed and ``final`` is untouched, and so are the folders
    above it that this call created (a refused first stage leaves no empty run folder). Stale
    temporaries of earlier killed writers of the same ``final`` are removed first.
    """
    final = Path(final).resolve()
    created = [p for p in [final.parent, *final.parent.parents] if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} appeared while it was being written")
            old = final.parent / f".tmp-{final.name}-old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # innermost first; one that something else wrote into stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``path`` when the block exits without error
    (for writers that want a path, e.g. ``savefig``); on error nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")  # keeps the suffix for savefig
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_manifest(folder: str | Path, manifest: dict) -> None:
    """Write ``manifest.json`` (sorted keys, indented) into ``folder``."""
    atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str))


def read_manifest(folder: str | Path) -> dict:
    """Read a stage folder's ``manifest.json``."""
    return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))


def is_complete(folder: str | Path) -> bool:
    """A stage output is complete when its folder holds a manifest (written last, atomically)."""
    return (Path(folder) / MANIFEST).is_file()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rows_hash(rows: list[dict], key: str) -> str:
    """Order-independent content hash of rows: sha256 over the JSON of rows sorted by ``key``."""
    h = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r[key]):
        h.update(json.dumps(row, sort_keys=True, default=_jsonable).encode())
        h.update(b"\n")
    return h.hexdigest()


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x)}")


def confined(root: str | Path, path: str | Path) -> Path:
    """``path`` (relative paths taken from ``root``) resolved, refused if it lies outside ``root``.

    Symlinks and ``..`` are resolved first, so a link inside ``root`` that points elsewhere
    escapes as surely as ``../x`` or an absolute path does. Raises `ConfigError` naming both.
    """
    try:
        base = Path(root).resolve()
        target = (base / path).resolve()
    except (RuntimeError, OSError, ValueError) as e:  # a symlink loop, a NUL byte
        raise ConfigError(f"path {str(path)!r} under {root}: cannot resolve it: {e}") from None
    if not target.is_relative_to(base):
        raise ConfigError(f"path {str(path)!r} resolves to {target}, outside {base}; keep it under {base}")
    return target
