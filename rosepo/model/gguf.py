"""GGUF (llama.cpp's format) to an ordinary Hugging Face folder: safetensors, float32, tokenizer.

transformers reads a GGUF file itself (``from_pretrained(folder, gguf_file=name)``, with the
``gguf`` package installed) and dequantises every tensor to float32. The model it returns keeps
the GGUF quantizer attached and ``save_pretrained`` refuses ("quantized with gguf and is not
serializable"); the weights are plain float32 by then, so the quantizer is detached and the
config's ``quantization_config`` dropped before saving. The folder then loads like any other.

Which architectures convert is transformers' list (llama, mistral, qwen2, gemma3, ...); an
architecture or quantisation type it cannot read is refused with its message.
"""

from __future__ import annotations

import time
from pathlib import Path

from rosepo.errors import ConfigError, DataError
from rosepo.storage import atomic_dir, is_complete, read_manifest, sha256_file, write_manifest

GGUF_MAGIC = b"GGUF"


def gguf_to_hf(gguf_file: str | Path, out_dir: str | Path, *, sha256: str | None = None,
               extra_files: dict[str, bytes] | None = None, manifest: dict | None = None) -> Path:
    """Convert ``gguf_file`` to a HF folder ``out_dir`` (model + tokenizer + ``manifest.json``).

    Idempotent: an ``out_dir`` already converted from a file of the same sha256 is returned as
    is; any other existing ``out_dir`` is refused, never overwritten. Written atomically.
    ``sha256`` is the file's digest when the caller has it; ``extra_files`` (name -> bytes) are
    written next to the weights (licence terms); ``manifest`` entries are added to the manifest.
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise ConfigError(f"GGUF file {gguf_file} does not exist")
    with open(gguf_file, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise DataError("not a GGUF file (it does not start with the GGUF magic)", file=str(gguf_file))
    digest = sha256 or sha256_file(gguf_file)
    if is_complete(out_dir) and read_manifest(out_dir).get("gguf_sha256") == digest:
        return out_dir
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists and is not a conversion of {gguf_file.name}; "
                          "remove it or choose another output folder")
    t0 = time.perf_counter()
    tokenizer, model = load_gguf(gguf_file)
    load_s = time.perf_counter() - t0
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        write_manifest(tmp, {
            "source": gguf_file.name, "gguf_sha256": digest, "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32",
            "load_seconds": round(load_s, 1), "convert_seconds": round(time.perf_counter() - t0, 1),
            **(manifest or {})})
    return out_dir


def load_gguf(gguf_file: str | Path):
    """(tokenizer, model) read from a GGUF file by transformers, float32, quantizer detached."""
    try:
        import gguf  # noqa: F401  (transformers needs it; a clear message beats its ImportError)
    except ImportError:
        raise ConfigError("reading GGUF needs the 'gguf' package: pip install -r requirements.txt") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file).resolve()
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                     local_files_only=True)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"transformers cannot convert it: {first}", file=str(gguf_file)) from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return tokenizer, model
