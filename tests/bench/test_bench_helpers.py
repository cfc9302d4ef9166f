"""The benchmarks' pure helpers (bench/ lives beside the package, not in it: put the checkout on
the path as ``rosepo bench`` does). Each test runs in well under a second once torch is imported."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import alternate, attended_keys, llama_forward_flops, markdown, paired_ratio, spread  # noqa: E402


def test_alternate_runs_variants_in_turn_and_times_each_call():
    calls, ticks = [], iter(range(100))
    times = alternate({"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))},
                      reps=2, warmup=1, clock=lambda: next(ticks))
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert times == {"a": [1, 1], "b": [1, 1]}  # one tick between start and end of every timed call


def test_spread_and_paired_ratio():
    assert spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    # medians 4 and 2; per-round ratios 4/1, 4/2, 6/4
    assert paired_ratio([4.0, 4.0, 6.0], [1.0, 2.0, 4.0]) == (2.0, 1.5, 4.0)
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_markdown_table():
    assert markdown(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_attended_keys_by_hand():
    """Prompt of 3, answers of 2 and 1 tokens.

    Shared row: the prompt attends 1 + 2 + 3 = 6 keys; answer 1's tokens see the prompt and
    themselves: (3 + 1) + (3 + 2) = 9; answer 2's token 3 + 1 = 4; total 19.
    Plain rows: a causal row of 5 attends 15, of 4 attends 10; total 25.
    """
    assert attended_keys(3, [2, 1], shared=True) == 19
    assert attended_keys(3, [2, 1], shared=False) == 25


def test_llama_flops_by_hand():
    """hidden 4, intermediate 8, 1 layer, 2 heads, 1 key/value head (kv width 2), vocab 10.

    Weights per token: q 16 + k 8 + v 8 + o 16 + gate 32 + up 32 + down 32 = 144.
    LoRA r=1 on q and down: (4 + 4) + (8 + 4) = 20. Forward of 5 tokens, 7 attended pairs, 2 logit
    rows: 2·(144 + 20)·5 + 4·4·1·7 + 2·4·10·2 = 1640 + 112 + 160 = 1912.
    """
    cfg = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=10)
    assert llama_forward_flops(cfg, 5, 7, 2, lora_r=1, lora_modules=("q_proj", "down_proj")) == (164, 1912)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_llama_flops_match_torch_flop_counter(family):
    """Against torch's own count of a real forward (eager attention, whose matmuls the counter
    sees; every logit kept, attention over the full square as it computes it); the rotary
    embedding's tiny matmul is the only difference. Gemma-3's heads are wider than hidden / heads
    (here 4 × 16 against hidden 32), which the query width of the count has to follow."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        cfg, cls = LlamaConfig(**sizes), LlamaForCausalLM
    else:
        cfg, cls = Gemma3TextConfig(**sizes, head_dim=16, sliding_window=64), Gemma3ForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    t = 12
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.arange(t)[None] + 4, use_cache=False)
    _, ours = llama_forward_flops(cfg, t, t * t, t)
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_greedy_without_cache_equals_greedy_ids():
    """The naive decoder of the eval benchmark gives the KV-cache decoder's tokens."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.eval_throughput import greedy_no_cache
    from rosepo.model.generate import greedy_ids

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    prompts = [[5, 9, 14, 22, 7], [11, 4, 30], [25, 12, 33, 40, 41, 42, 43]]
    assert greedy_no_cache(model, prompts, 6, eos_id=2, pad_id=3) == greedy_ids(model, prompts, 6, eos_id=2, pad_id=3)


def test_trl_benchmark_without_trl_says_so_and_exits_2(monkeypatch, capsys):
    from bench import trl_align

    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError
    assert trl_align.run([]) == 2
    assert "pip install -e '.[bench]'" in capsys.readouterr().err


def test_report_bench_step_gaps_leave_out_the_first_and_last_step(tmp_path):
    """Steps 1..6 written at t = 0, 1, 3, 6, 10, 15 s: the gaps into steps 3, 4, 5 (2, 3, 4 s);
    the first step's (warm-up) and the last one's (the final checkpoint) are not step times."""
    from tensorboardX import SummaryWriter

    from bench.report_step import step_gaps

    writer = SummaryWriter(str(tmp_path))
    for step, t in zip(range(1, 7), (0, 1, 3, 6, 10, 15)):
        writer.add_scalar("loss", 1.0 / step, step, walltime=1000.0 + t)
        writer.add_scalar("grad_norm", 1.0, step, walltime=2000.0 + t)  # another tag: not read
    writer.close()
    assert step_gaps(tmp_path) == [2.0, 3.0, 4.0]


def test_fusion_helpers_by_hand(tmp_path):
    """`bench fusion` on three samples of 3 candidates, target index 0, 1, 2.

    SASRec's scores pick candidates 0, 0, 2 (right on rows 0 and 2); the LLM's pick 1, 1, 2 (right
    on rows 1 and 2). z of the row (1, 2, 3) is (−√1.5, 0, √1.5) (population std √(2/3)), a constant
    row z = 0. At w = 0 the fusion is SASRec (2/3), at w = 1 the LLM (2/3); at w = 0.5 row 0 fuses
    z(0, 3, 1) and z(3, 0, 1), equal for candidates 0 and 1: a tie, counted against the target as
    in `rosepo eval` (a miss), row 1 the same tie (a miss), row 2 both agree: 1/3. Only-LLM right:
    row 1; only SASRec: row 0; the paired difference is 0 on average.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.fusion import analyse, fusion_curve, paired_bootstrap, top1_hits, zscore

    np.testing.assert_allclose(zscore(np.array([[1.0, 2, 3], [5, 5, 5]])),
                               [[-1.5 ** 0.5, 0, 1.5 ** 0.5], [0, 0, 0]])
    target = np.array([0, 1, 2])
    sasrec = np.array([[3.0, 0, 1], [3, 1, 0], [0, 1, 3]])
    llm = np.array([[0.0, 3, 1], [1, 3, 0], [0, 1, 3]])
    assert top1_hits(sasrec, target).tolist() == [True, False, True]
    assert fusion_curve(llm, sasrec, target, [0.0, 0.5, 1.0]) == [2 / 3, 1 / 3, 2 / 3]
    assert top1_hits(np.array([[1.0, 1.0, 0.0]]), np.array([0])).tolist() == [False]  # a tie is a miss
    assert paired_bootstrap(np.array([True, True]), np.array([True, True])) == (0.0, 0.0, 0.0)
    mean, low, high = paired_bootstrap(np.array([1, 1, 0, 0]), np.array([0, 1, 0, 0]), reps=500)
    assert mean == 0.25 and 0.0 <= low <= 0.25 <= high <= 1.0

    for method, scores in (("sasrec", sasrec), ("sft", llm)):
        (tmp_path / method).mkdir()
        pq.write_table(pa.table({"sample_id": ["a", "b", "c"], "target_index": target.astype("int32"),
                                 "scores": scores.tolist()}), tmp_path / method / "answers.parquet")
    m = analyse(tmp_path)["methods"]["sft"]
    assert (m["rank_hr@1"], m["sasrec_rank_hr@1"]) == (2 / 3, 2 / 3)
    assert (m["both_right"], m["only_llm_right"], m["only_sasrec_right"]) == (1 / 3, 1 / 3, 1 / 3)
    assert m["diff_vs_sasrec"] == 0.0 and m["fusion_hr@1"][0] == m["fusion_hr@1"][-1] == 2 / 3


def test_probe_oracle_hit_rate_by_hand():
    """`bench sft-probe`'s SASRec yardstick on three rows of three candidates, targets b, e, g: the
    fake oracle scores by the item's number, so it picks c, f, g (right once); on row 2 the target
    ties the top score and counts as a miss, as in `rosepo eval`: 1/3."""
    import numpy as np

    from bench.sft_probe import oracle_hit_rate

    class Fake:
        def score(self, histories, candidates):
            return np.array([[float(item[1:]) for item in row] for row in candidates])

    rows = [{"history_item_ids": ["x"], "candidate_item_ids": ["a1", "b2", "c3"], "target_item_id": "b2"},
            {"history_item_ids": ["x"], "candidate_item_ids": ["d5", "e5", "f5"], "target_item_id": "e5"},
            {"history_item_ids": ["x"], "candidate_item_ids": ["g9", "h1", "i2"], "target_item_id": "g9"}]
    assert oracle_hit_rate(Fake(), rows) == round(1 / 3, 4)
