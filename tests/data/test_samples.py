"""The sample builder on the real MovieLens-100K (fetched from the recbole wheel)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import subprocess
import sys

import pyarrow as pa
import pytest

from rosepo.config import DataConfig
from rosepo.data.readers import read_llara_json
from rosepo.data.samples import SPLITS, assign_splits, build_samples, load_source, read_split
from rosepo.data.titles import title_key
from rosepo.errors import DataError
from rosepo.schema import HISTORY_SEP
from rosepo.storage import read_manifest


#: The content hash of the default ML-100K samples. Once (b34bbb2) the single-process build's, the
#: same rows the Ray Data build made; since title identity, with ML-100K's 18 films listed twice merged and
#: 5 pairs of namesakes dated ("Cape Fear (1962)"): 221 train samples fewer, valid and test as many.
ML100K_HASH = "5e555f0e84e003501b4cd86da0c59110e8e1429a87538b2ee20557b1de6ec1db"


def test_manifest_counts(ml100k_samples):
    m = read_manifest(ml100k_samples)
    assert m["content_hash"] == ML100K_HASH
    assert m["samples"] == {"train": 75408, "valid": 470, "test": 475}
    assert (m["users"], m["items"], m["interactions"], m["items_interacted"]) == (943, 1664, 99693, 1664)
    assert m["samples"]["train"] > 50_000 and m["samples"]["valid"] > 400 and m["samples"]["test"] > 400
    assert m["policies"] == {"duplicates_dropped": 0, "unknown_items_dropped": 0, "merged_events_dropped": 307,
                             "items_merged": 18, "titles_dated": 10}
    assert m["users_dropped"] == {"too_short": 0, "no_new_target": 0}


def test_sample_invariants(ml100k_samples):
    users = {}
    for split in SPLITS:
        rows = read_split(ml100k_samples, split).to_pylist()
        users[split] = {r["user_id"] for r in rows}
        for r in rows:
            assert r["target_item_id"] not in r["history_item_ids"]
            assert 3 <= len(r["history_item_ids"]) <= 10
            cands = r["candidate_item_ids"]
            assert len(cands) == 20 and len(set(cands)) == 20 and r["target_item_id"] in cands
            assert not set(cands) & set(r["history_item_ids"])
            assert len(set(r["candidate_titles"])) == 20
            assert r["answer"] == r["target_title"]
            assert r["prompt"].endswith("Answer:") and all(f'"{t}"' in r["prompt"] for t in r["candidate_titles"])
            assert r["split"] == split
    assert not users["train"] & users["valid"] and not users["train"] & users["test"]
    assert not users["valid"] & users["test"]
    n = sum(len(u) for u in users.values())
    assert abs(len(users["train"]) / n - 0.8) < 0.01


def test_history_never_holds_the_target_title(ml100k_samples):
    """ML-100K lists 18 films twice and names 5 pairs of films alike once the year is stripped
    ("Cape Fear" of 1962 and 1991): once 82 train / 3 valid / 1 test samples held their target's
    title in the history. Now no history holds it, and candidates are distinct, under the one
    title identity (`title_key`); the merge is counted in the manifest."""
    for split in SPLITS:
        for r in read_split(ml100k_samples, split).to_pylist():
            history = {title_key(t) for t in r["history_titles"]}
            assert title_key(r["target_title"]) not in history, r["sample_id"]
            assert len({title_key(t) for t in r["candidate_titles"]}) == len(r["candidate_titles"])
    policies = read_manifest(ml100k_samples)["policies"]
    assert (policies["items_merged"], policies["titles_dated"], policies["merged_events_dropped"]) == (18, 10, 307)


def test_same_hash_across_runs_and_parallelism(ml100k_samples, tmp_path, ray_session):
    """A second build with other Ray Data parallelism gives the same content hash."""
    m1 = read_manifest(ml100k_samples)
    cfg = dataclasses.replace(DataConfig(), data_dir=str(Path(__file__).resolve().parents[2] / "data"), num_partitions=1)
    m2 = build_samples(cfg, tmp_path / "again")
    assert m2["content_hash"] == m1["content_hash"]


def test_assign_splits_exact_and_seeded():
    users = [str(i) for i in range(100)]
    a = assign_splits(users, (0.8, 0.1, 0.1), seed=0)
    assert sorted(a.values()).count("train") == 80 and list(a.values()).count("test") == 10
    assert a == assign_splits(list(reversed(users)), (0.8, 0.1, 0.1), seed=0)
    assert a != assign_splits(users, (0.8, 0.1, 0.1), seed=1)


def write_llara_json(rows: list[dict], path) -> None:
    """Write samples in the LLaRA / S-DPO JSON format (the inverse of `read_llara_json`)."""
    data = [{"historyList": HISTORY_SEP.join(r["history_titles"]), "itemList": list(r["candidate_titles"]),
             "trueSelection": r["target_title"]} for r in rows]
    Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def test_llara_round_trip(ml100k_samples, tmp_path, ray_session):
    """Export valid samples to LLaRA JSON, import them: history, candidates, target kept exactly."""
    rows = read_split(ml100k_samples, "valid").to_pylist()[:50]
    write_llara_json(rows, tmp_path / "valid.json")
    cfg = DataConfig(format="llara-json", llara={"valid": str(tmp_path / "valid.json")})
    build_samples(cfg, tmp_path / "imported")
    back = read_split(tmp_path / "imported", "valid").to_pylist()
    assert len(back) == 50
    for a, b in zip(rows, back):
        assert (a["history_titles"], a["candidate_titles"], a["target_title"]) == \
               (b["history_titles"], b["candidate_titles"], b["target_title"])
    assert read_llara_json(tmp_path / "valid.json", "valid")[0]["candidate_titles"] == rows[0]["candidate_titles"]


def test_llara_import_applies_the_window_rules(tmp_path):
    """LLaRA samples meet the logs' window rule (`window_drop`): a history holding the target, or
    shorter than data.min_history, gives no sample (counted); a history longer than
    data.max_history keeps its last titles. Once such samples were imported as they were."""
    cands = [f"C{k}" for k in range(20)]
    good = {"historyList": "A::B::C", "itemList": cands, "trueSelection": "C1"}
    data = [good, {**good, "historyList": "A::C1::B"}, {**good, "historyList": "A::B"},
            {**good, "historyList": HISTORY_SEP.join(f"H{k}" for k in range(12))}]
    (tmp_path / "train.json").write_text(json.dumps(data))
    m = build_samples(DataConfig(format="llara-json", llara={"train": str(tmp_path / "train.json")}), tmp_path / "s")
    assert m["samples"]["train"] == 2 and m["samples_dropped"] == {"too_short": 1, "target_in_history": 1}
    rows = read_split(tmp_path / "s", "train").to_pylist()
    assert [r["history_titles"] for r in rows] == [["A", "B", "C"], [f"H{k}" for k in range(2, 12)]]
    assert [r["sample_id"] for r in rows] == ["train:0000000", "train:0000003"]


def test_llara_two_spellings_across_files_refused(tmp_path):
    """One title spelled two ways in two files (train "Movie 1", valid "MOVIE 1") is refused,
    naming both files, before anything is written."""
    cands = [f"C{k}" for k in range(19)]
    (tmp_path / "train.json").write_text(json.dumps(
        [{"historyList": "A::B::C", "itemList": cands + ["Movie 1"], "trueSelection": "C1"}]))
    (tmp_path / "valid.json").write_text(json.dumps(
        [{"historyList": "A::B::C", "itemList": cands + ["MOVIE 1"], "trueSelection": "MOVIE 1"}]))
    cfg = DataConfig(format="llara-json", llara={"train": str(tmp_path / "train.json"),
                                                 "valid": str(tmp_path / "valid.json")})
    with pytest.raises(DataError, match=r"valid\.json, row 1: 'MOVIE 1' and 'Movie 1' \(file .*train\.json, row 1\)"):
        build_samples(cfg, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_timestamp_unit_reaches_every_file_read(tmp_path):
    """data.timestamp_unit reaches the reads of the samples stage (`load_source`, the same per-file
    reads as on Ray): under auto a file in ms whose first event is before 1973 (in the seconds band
    by its magnitude) is refused naming both rows; declared as ms it is read, in seconds."""
    ms = [99_000_000_000 + k for k in range(3)] + [1_600_000_000_000 + 1000 * k for k in range(12)]
    (tmp_path / "i.csv").write_text("user_id,item_id,timestamp\n" + "".join(f"u,{k},{t}\n" for k, t in enumerate(ms)))
    (tmp_path / "c.csv").write_text("item_id,title\n" + "".join(f"{k},T{k}\n" for k in range(40)))
    cfg = DataConfig(format="csv", interactions=str(tmp_path / "i.csv"), catalog=str(tmp_path / "c.csv"))
    with pytest.raises(DataError, match=r"i\.csv, row 4, column 'timestamp': timestamp 1600000000000 reads as ms .* "
                                        r"row 1's 99000000000 as s"):
        load_source(cfg)
    events, _, _ = load_source(dataclasses.replace(cfg, timestamp_unit="ms"))
    assert events.column("timestamp").to_pylist() == [t // 1000 for t in ms]


def test_files_of_one_input_in_two_units_are_refused_under_auto(tmp_path, ray_session):
    """Shards of one input, one in seconds and one in milliseconds, each consistent on its own:
    under auto they would be merged in two units and ordered wrongly. Refused naming both files'
    first rows, on Ray (`build_samples`) and in one process (`load_source`), nothing written;
    the milliseconds file alone is read, as given."""
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "a.csv").write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},{k},{1_600_000_000 + 60 * k}\n" for u in range(4) for k in range(12)))
    (tmp_path / "events" / "b.csv").write_text("user_id,item_id,timestamp\n" + "".join(
        f"v{u},{k},{1_600_000_000_000 + 60_000 * k}\n" for u in range(4) for k in range(12)))
    (tmp_path / "c.csv").write_text("item_id,title\n" + "".join(f"{k},T{k}\n" for k in range(40)))
    cfg = DataConfig(format="csv", interactions=str(tmp_path / "events"), catalog=str(tmp_path / "c.csv"),
                     min_history=3, split=(0.5, 0.25, 0.25))
    message = (r"b\.csv, row 1, column 'timestamp': timestamp 1600000000000 reads as ms by its magnitude, but "
               r".*a\.csv row 1's 1600000000 as s")
    with pytest.raises(DataError, match=message):
        load_source(cfg)
    with pytest.raises(DataError, match=message):
        build_samples(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))
    (tmp_path / "events" / "a.csv").unlink()
    events, _, _ = load_source(cfg)  # one unit: read
    assert events.column("timestamp").to_pylist()[:2] == [1_600_000_000_000, 1_600_000_060_000]


def test_too_few_items_leaves_nothing(tmp_path, ray_session):
    (tmp_path / "i.csv").write_text("user_id,item_id,timestamp\n" + "".join(f"u,{k},{k}\n" for k in range(8)))
    (tmp_path / "c.csv").write_text("item_id,title\n" + "".join(f"{k},T{k}\n" for k in range(8)))
    cfg = DataConfig(format="csv", interactions=str(tmp_path / "i.csv"), catalog=str(tmp_path / "c.csv"))
    with pytest.raises(DataError, match="8 distinct titles but samples need at least 30"):
        build_samples(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_cli_bad_input_exit_code_and_no_output(tmp_path):
    """`rosepo data build` on a broken file: one line naming file/row/column, exit 2, no output."""
    (tmp_path / "i.csv").write_text("user_id,item_id,timestamp\nu,1,5\nu,2,soon\n")
    (tmp_path / "c.csv").write_text("item_id,title\n1,A\n2,B\n")
    proc = subprocess.run([sys.executable, "-m", "rosepo.cli", "data", "build", "data.format=csv",
                           f"data.interactions={tmp_path / 'i.csv'}", f"data.catalog={tmp_path / 'c.csv'}",
                           f"storage={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    # The rows are checked on Ray Data, so Ray starts and logs; the refusal is the last line.
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rosepo: error: file ") and "i.csv, row 2, column 'timestamp'" in last, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.rglob("*.parquet")) and not list(tmp_path.rglob("manifest.json"))
    assert not (tmp_path / "runs").exists()  # a refused first stage leaves no run folder


def _csv(tmp_path, events: list[tuple], n_items: int = 12) -> DataConfig:
    (tmp_path / "i.csv").write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in events))
    (tmp_path / "c.csv").write_text("item_id,title\n" + "".join(f"{k},T{k}\n" for k in range(n_items)))
    return DataConfig(format="csv", interactions=str(tmp_path / "i.csv"), catalog=str(tmp_path / "c.csv"),
                      max_history=3, num_candidates=4)


def test_no_user_long_enough_refused_with_counts(tmp_path, ray_session):
    """Every user has fewer than min_history + 1 events: once an empty build that exited 0.
    Refused once the events are counted, naming the counts; nothing is written."""
    cfg = _csv(tmp_path, [(u, k, k) for u in "abc" for k in range(3)])
    out = tmp_path / "runs" / "run" / "samples"
    with pytest.raises(DataError, match=r"i\.csv: no samples to build: 3 user\(s\) with 9 events, the longest "
                                        r"with 3, but a sample needs data.min_history \+ 1 = 4"):
        build_samples(cfg, out)
    assert not (tmp_path / "runs").exists()


def test_no_window_with_a_new_target_refused(tmp_path, ray_session):
    """Long enough, but every target is already in its history (one item watched again and again):
    still 0 samples, refused with the counts, nothing written."""
    cfg = _csv(tmp_path, [("a", 1, t) for t in range(6)] + [("b", 2, t) for t in range(2)])
    with pytest.raises(DataError, match=r"no samples: all 2 users were dropped \(1 with fewer than "
                                        r"data.min_history \+ 1 = 4 events, 1 whose every target"):
        build_samples(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_dropped_users_counted_in_the_manifest(tmp_path, ray_session):
    events = [(u, k, k) for u in ("u1", "u2", "u3") for k in range(8)] + [("short", 1, 1), ("short", 2, 2)]
    events += [("again", 5, t) for t in range(6)]
    m = build_samples(_csv(tmp_path, events), tmp_path / "out")
    assert m["users"] == 5 and m["users_dropped"] == {"too_short": 1, "no_new_target": 1}
    assert sum(m["samples"].values()) == 3 * 5


def test_llara_with_one_candidate_refused_and_no_run_folder_left(tmp_path):
    """A sample with one candidate (no wrong title to reject) is refused with the file and the
    sample's index, before anything is written: no run folder is left behind."""
    from rosepo.config import RunConfig
    from rosepo.pipeline import run_stage

    good = {"historyList": "A::B", "itemList": [f"C{k}" for k in range(20)], "trueSelection": "C1"}
    (tmp_path / "train.json").write_text(json.dumps([good, {**good, "itemList": ["C1"]}]))
    (tmp_path / "valid.json").write_text(json.dumps([good]))
    cfg = RunConfig(storage=str(tmp_path / "runs"), data=DataConfig(
        format="llara-json", llara={"valid": str(tmp_path / "valid.json"), "train": str(tmp_path / "train.json")}))
    with pytest.raises(DataError, match=r"train\.json, row 2, column 'itemList': the sample has 1 candidate"):
        run_stage(cfg, "samples")
    assert not (tmp_path / "runs").exists()


def test_block_digests_equal_the_folder_hash_for_any_block_size(tmp_path):
    """The content hash made from the per-user digests of the Ray tasks (`write_user_windows`)
    equals `samples_hash` of the written folder, streamed or (rows shuffled into one file) read
    whole, whatever the block size; no Ray needed. 12 users with ids that sort differently
    with and without the ":" of their sample ids ("1" < "10" but "10:" < "1:")."""
    import random

    import pyarrow.parquet as pq

    from rosepo.data.samples import samples_hash, user_blocks, users_digest, write_user_windows

    titles = {f"i{k}": f"Title {k}" for k in range(40)}
    rng = random.Random(0)
    rows = [(u, f"i{rng.randrange(40)}", t) for u in ["1", "10", "2", "11", "3", "12", "4", "5", "6", "7", "8", "9"]
            for t in range(rng.randrange(4, 18))]
    inter = pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                      "timestamp": pa.array([r[2] for r in rows], pa.int64())})
    cfg = DataConfig(eval_windows_per_user=2)
    split_of = assign_splits(sorted({r[0] for r in rows}), cfg.split, cfg.seed)
    hashes = set()
    for max_rows in (10, 1000):
        out = tmp_path / f"blocks-{max_rows}"
        for split in SPLITS:
            (out / split).mkdir(parents=True)
        per_user = pa.concat_tables([
            write_user_windows(b, out_dir=str(out), titles=titles, item_ids=sorted(titles), split_of=split_of, cfg=cfg)
            for b in user_blocks(inter, 1, max_rows=max_rows)])
        digest = users_digest(zip(per_user.column("split").to_pylist(), per_user.column("user_id").to_pylist(),
                                  per_user.column("digest").to_pylist()))
        assert samples_hash(out) == digest
        hashes.add(digest)
    shuffled = tmp_path / "shuffled"
    for split in SPLITS:
        table = read_split(out, split)
        (shuffled / split).mkdir(parents=True)
        pq.write_table(table.take(random.Random(1).sample(range(len(table)), len(table))),
                       shuffled / split / "part-0.parquet")
    assert samples_hash(shuffled) == digest and len(hashes) == 1
    assert sum(per_user.column("samples").to_pylist()) == sum(len(read_split(out, s)) for s in SPLITS) > 40


def test_decoys_replace_the_target_in_place_with_a_title_off_the_list(ml100k_samples):
    """A real sample's decoys: the same list with the target swapped, at its place, for an item
    whose title is neither a candidate's nor in the history; the prompt is the sample's template
    rendered over the new list; the target fields stay; decoys are seeded per sample and copy."""
    import pyarrow.parquet as pq

    from rosepo.data.prompts import render_prompt
    from rosepo.data.samples import decoy_sample
    from rosepo.layout import CATALOG_FILE

    catalog = pq.read_table(ml100k_samples / CATALOG_FILE)
    titles = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
    data = read_manifest(ml100k_samples)["config"]
    rows = read_split(ml100k_samples, "train").slice(0, 50).to_pylist()
    for row in rows:
        decoys = [decoy_sample(row, list(titles), titles, data["seed"], k, data["prompt_style"], data["domain"])
                  for k in (1, 2)]
        assert decoys[0] == decoy_sample(row, list(titles), titles, data["seed"], 1, data["prompt_style"],
                                         data["domain"])
        at = row["candidate_item_ids"].index(row["target_item_id"])
        for k, d in enumerate(decoys, 1):
            assert d["sample_id"] == f"{row['sample_id']}~{k}"
            new = d["candidate_item_ids"][at]
            assert d["candidate_item_ids"][:at] + d["candidate_item_ids"][at + 1:] == \
                row["candidate_item_ids"][:at] + row["candidate_item_ids"][at + 1:]
            assert titles[new] not in set(row["candidate_titles"]) | set(row["history_titles"])
            assert d["candidate_titles"] == [titles[i] for i in d["candidate_item_ids"]]
            assert row["target_title"] not in d["candidate_titles"] and row["target_title"] not in d["prompt"]
            assert d["prompt"] == render_prompt(row["template_id"], row["history_titles"], d["candidate_titles"],
                                                data["prompt_style"], data["domain"])
            assert (d["target_item_id"], d["answer"], d["history_item_ids"]) == \
                (row["target_item_id"], row["answer"], row["history_item_ids"])
    # Seeded per sample and copy: the draws differ across copies (50 samples, two copies each).
    assert sum(decoy_sample(r, list(titles), titles, 0, 1, "list", "movies")["candidate_item_ids"]
               != decoy_sample(r, list(titles), titles, 0, 2, "list", "movies")["candidate_item_ids"]
               for r in rows) > 40


def test_a_decoy_needs_an_item_off_the_list():
    """A catalog with no title outside a sample's candidates and history is refused by name."""
    from rosepo.data.samples import decoy_sample

    titles = {"a": "A", "b": "B", "c": "C"}
    row = {"sample_id": "u1:5", "history_item_ids": ["c"], "candidate_item_ids": ["a", "b"],
           "candidate_titles": ["A", "B"], "history_titles": ["C"], "target_item_id": "a", "template_id": 0}
    with pytest.raises(DataError, match=r"sample u1:5: no item outside its candidates and history"):
        decoy_sample(row, list(titles), titles, 0, 1, "list", "movies")
    titles["d"] = "D"
    assert decoy_sample(row, list(titles), titles, 0, 1, "list", "movies")["candidate_item_ids"] == ["d", "b"]
