"""`rosepo model import-gguf`: a GGUF the test writes itself (a tiny llama) becomes a HF folder.

The file is what llama.cpp writes for a llama: hyperparameters under ``llama.*``, a SentencePiece
vocabulary under ``tokenizer.ggml.*`` (transformers rebuilds the merges from the scores), and
tensors under llama.cpp's names in float32. A few seconds on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rosepo.cli import main
from rosepo.errors import ConfigError, DataError
from rosepo.model.gguf import gguf_to_hf

np = pytest.importorskip("numpy")
gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # a few seconds idle; minutes on a loaded 2-core box

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 16, 32, 2, 1, 2
WORDS = ["▁Toy", "▁Story", "▁Heat", "▁Answer", ":"]


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, then single characters and every prefix of the words (SentencePiece BPE
    pieces: a word is reachable by merges only through its prefixes), with scores."""
    chars = sorted({c for w in WORDS for c in w})
    prefixes = sorted({w[:n] for w in WORDS for n in range(2, len(w) + 1)}, key=lambda p: (len(p), p))
    pieces = ["<unk>", "<s>", "</s>"] + chars + prefixes
    # Longer pieces score higher, so the merges rebuilt from the scores assemble whole words.
    scores = [0.0, 0.0, 0.0] + [-100.0 + len(p) for p in pieces[3:]]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
        [gguf.TokenType.NORMAL] * (len(pieces) - 3)
    return pieces, scores, types


def write_tiny_llama_gguf(path: Path) -> dict[str, np.ndarray]:
    """Write a 2-layer llama GGUF with random float32 tensors; returns the tensors by GGUF name."""
    pieces, scores, types = _vocab()
    head_dim = HIDDEN // HEADS
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(pieces))
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(pieces), HIDDEN), "output_norm.weight": (HIDDEN,),
              "output.weight": (len(pieces), HIDDEN)}
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                   f"blk.{i}.attn_q.weight": (HEADS * head_dim, HIDDEN),
                   f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
                   f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
                   f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * head_dim),
                   f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
                   f"blk.{i}.ffn_down.weight": (HIDDEN, FFN)}
    tensors = {name: rng.standard_normal(shape).astype(np.float32) * 0.1 for name, shape in shapes.items()}
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf"
    return path, write_tiny_llama_gguf(path)


def test_import_gguf_writes_a_float32_hf_folder_with_the_files_weights_and_vocabulary(tiny_gguf, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rosepo.model.factory import load_tokenizer

    path, tensors = tiny_gguf
    out = gguf_to_hf(path, tmp_path / "hf")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["architecture"] == "LlamaForCausalLM" and manifest["dtype"] == "float32"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    # Tensors llama.cpp does not permute come back bit for bit (q/k are un-permuted for RoPE).
    for gguf_name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj.weight"),
                               ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                               ("output.weight", "lm_head.weight")]:
        assert torch.equal(weights[hf_name], torch.from_numpy(tensors[gguf_name])), hf_name
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tok = load_tokenizer(out)
    ids = tok(" Toy Story", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["▁Toy", "▁Story"] and tok.decode(ids).strip() == "Toy Story"
    assert model(input_ids=torch.tensor([ids])).logits.shape == (1, 2, len(_vocab()[0]))


def test_import_is_idempotent_and_refuses_other_folders_and_files(tiny_gguf, tmp_path, capsys):
    path, _ = tiny_gguf
    out = tmp_path / "hf"
    assert main(["model", "import-gguf", str(path), str(out)]) == 0
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["model", "import-gguf", str(path), str(out)]) == 0  # same file: nothing redone
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists and is not a conversion"):
        gguf_to_hf(path, tmp_path / "taken")
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(DataError, match="not a GGUF file"):
        gguf_to_hf(not_gguf, tmp_path / "y")
    capsys.readouterr()
    assert main(["model", "import-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "z")]) == 2
    assert capsys.readouterr().err.startswith("rosepo: error: GGUF file")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
