"""The samples stage on Ray Data: sharded input (folders, globs, `pyarrow.fs` URIs), errors
raised from the read tasks exactly as the single-file readers raise them, and a content hash
independent of file layout and of the number of shuffle partitions."""

from __future__ import annotations

import dataclasses
import random

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from rosepo.config import DataConfig
from rosepo.data import readers
from rosepo.data.samples import build_samples, list_files, load_source, read_split
from rosepo.errors import DataError

from tests.data.test_readers import MAPPING

ITEMS = 40


def events(users: int = 24, seed: int = 0) -> list[tuple[str, str, int]]:
    """``(user, item, timestamp)`` of ``users`` users with 6-20 events each; ids such as "1"
    and "10" that sort differently with and without the ":" of their sample ids."""
    rng = random.Random(seed)
    return [(str(u), str(rng.randrange(ITEMS)), t) for u in range(users) for t in range(rng.randrange(6, 20))]


def write_catalog(folder, fmt: str = "csv") -> str:
    path = folder / f"items.{fmt}"
    if fmt == "csv":
        path.write_text("item_id,title\n" + "".join(f"{i},Movie {i}\n" for i in range(ITEMS)))
    else:
        pq.write_table(pa.table({"item_id": [str(i) for i in range(ITEMS)],
                                 "title": [f"Movie {i}" for i in range(ITEMS)]}), path)
    return str(path)


def write_shards(rows: list, folder, shards: int, fmt: str, seed: int = 1) -> list:
    """``rows`` shuffled and split into ``shards`` files ``part-00000.<fmt>`` ...; returns the
    rows of each shard."""
    rows = rows[:]
    random.Random(seed).shuffle(rows)
    folder.mkdir(parents=True)
    parts = [rows[k::shards] for k in range(shards)]
    for k, part in enumerate(parts):
        if fmt == "csv":
            (folder / f"part-{k:05d}.csv").write_text(
                "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in part))
        else:
            pq.write_table(pa.table({"user_id": [r[0] for r in part], "item_id": [r[1] for r in part],
                                     "timestamp": pa.array([r[2] for r in part], pa.int64())}),
                           folder / f"part-{k:05d}.parquet")
    return parts


def config(interactions: str, catalog: str, fmt: str = "csv", **kw) -> DataConfig:
    return DataConfig(format=fmt, interactions=interactions, catalog=catalog, max_history=5, num_candidates=5,
                      eval_windows_per_user=2, **kw)


def test_hash_independent_of_file_layout_and_partitions(tmp_path, ray_session):
    """One CSV file, 8 shuffled Parquet shards read as a folder, the same as a glob and as a
    ``file://`` URI, and 8 CSV shards: the same samples (content hash, counts, rows) for 1, 3
    and 7 shuffle partitions; and the same as the single-process reference reads."""
    rows = events()
    catalog = {fmt: write_catalog(tmp_path, fmt) for fmt in ("csv", "parquet")}
    write_shards(rows, tmp_path / "one", 1, "csv", seed=0)
    write_shards(rows, tmp_path / "pq", 8, "parquet")
    write_shards(rows, tmp_path / "csv8", 8, "csv", seed=2)
    (tmp_path / "pq" / "_SUCCESS").write_text("")  # what Spark leaves in a folder of shards: skipped
    inputs = [(str(tmp_path / "one" / "part-00000.csv"), "csv", 4), (str(tmp_path / "pq"), "parquet", 1),
              (str(tmp_path / "pq" / "part-*.parquet"), "parquet", 3), ((tmp_path / "pq").as_uri(), "parquet", 7),
              (str(tmp_path / "csv8"), "csv", 3)]
    manifests = [build_samples(config(spec, catalog[fmt], fmt, num_partitions=n), tmp_path / f"out{k}")
                 for k, (spec, fmt, n) in enumerate(inputs)]
    first = manifests[0]
    assert {m["content_hash"] for m in manifests} == {first["content_hash"]}
    for m in manifests:
        assert (m["samples"], m["users"], m["interactions"]) == (first["samples"], 24, len(rows))
    assert sum(first["samples"].values()) > 100
    for split in ("train", "test"):
        assert read_split(tmp_path / "out1", split).equals(read_split(tmp_path / "out0", split))
    inter, _, _ = load_source(config(str(tmp_path / "pq"), catalog["parquet"], "parquet"))
    assert sorted(inter.to_pylist(), key=lambda r: tuple(r.values())) == sorted(
        ({"user_id": u, "item_id": i, "timestamp": t} for u, i, t in rows), key=lambda r: tuple(r.values()))


def bad_cases():
    """The bad inputs of test_readers (interactions, catalog): each must be refused by
    `build_samples` on Ray exactly as the single-file readers refuse it."""
    items = "iid,name\n" + "".join(f"{k},T{k}\n" for k in range(10, 40))
    good = "uid,iid,ts\n" + "".join(f"{u},{10 + k},{k}\n" for u in (1, 2) for k in range(12))
    return [
        ("uid,item,ts\n1,10,100\n", items),                       # missing column
        (good + "1,11,yesterday\n", items),                       # wrong timestamp type
        (good + ",11,100\n", items),                               # empty id
        (good + "1,10,nan\n", items),                              # NaN timestamp
        (good + "1,11\n", items),                                  # ragged row
        (good + "1,10,0\n", items),                                # duplicate event
        (good + "1,99,101\n", items),                              # unknown item
        ("", items),                                               # empty file
        ((good + "1,1\xff1,100\n").encode("latin-1"), items),     # not UTF-8
        (good, items + "41,A::B\n"),                               # title with the separator
        (good, items + "10,Ran\n"),                                # duplicate catalog id
    ]


@pytest.mark.parametrize("inter,items", bad_cases())
def test_bad_input_refused_from_ray_as_by_the_readers(tmp_path, ray_session, inter, items):
    i, c = tmp_path / "inter.csv", tmp_path / "items.csv"
    i.write_bytes(inter if isinstance(inter, bytes) else inter.encode())
    c.write_text(items)
    with pytest.raises(DataError) as direct:
        a, b = readers.read_csv_files(i, c, columns=MAPPING)
        readers.check_consistency(a, b, str(i), drop_duplicates=False, drop_unknown_items=False)
    cfg = dataclasses.replace(config(str(i), str(c)), columns=MAPPING)
    with pytest.raises(DataError) as distributed:
        build_samples(cfg, tmp_path / "out")
    got, want = distributed.value, direct.value
    assert (got.file, got.row, got.column, got.reason) == (want.file, want.row, want.column, want.reason)
    assert str(got) == str(want)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_error_in_shard_5_names_its_file_and_row(tmp_path, ray_session, fmt):
    """8 shards; shard 5's 4th row has a bad timestamp (Parquet: a string column), or an item
    not in the catalog: the error names shard 5's file and that row, and nothing is written."""
    parts = write_shards(events(), tmp_path / "in", 8, fmt)
    catalog = write_catalog(tmp_path, fmt)
    bad = tmp_path / "in" / f"part-00005.{fmt}"
    rows = [list(map(str, r)) for r in parts[5]]
    rows[3][2] = "soon"
    if fmt == "csv":
        bad.write_text("user_id,item_id,timestamp\n" + "".join(",".join(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.table({name: [r[k] for r in rows] for k, name in enumerate(readers.INTERACTION_COLUMNS)}),
                       bad, row_group_size=2)  # the bad row in the second row group: rows count across them
    with pytest.raises(DataError) as e:
        build_samples(config(str(tmp_path / "in"), catalog, fmt), tmp_path / "out")
    assert (e.value.file, e.value.row, e.value.column) == (str(bad), 4, "timestamp")
    assert "'soon'" in str(e.value)
    rows[3][2], rows[6][1] = "7", "999"
    if fmt == "csv":
        bad.write_text("user_id,item_id,timestamp\n" + "".join(",".join(r) + "\n" for r in rows))
    else:
        table = pa.table({name: [r[k] for r in rows] for k, name in enumerate(readers.INTERACTION_COLUMNS)})
        pq.write_table(table.set_column(2, "timestamp", pa.array([int(r[2]) for r in rows])), bad, row_group_size=2)
    with pytest.raises(DataError, match="'999' is not in the catalog") as e:
        build_samples(config(str(tmp_path / "in"), catalog, fmt), tmp_path / "out")
    assert (e.value.file, e.value.row, e.value.column) == (str(bad), 7, "item_id")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_duplicates_across_shards_name_the_earliest_repeat_or_are_dropped(tmp_path, ray_session):
    """An event of shard 2 repeated in shard 6 (row 3) and in shard 4 (row 5): the repeat first in
    input order (shard 4) is named. With data.drop_duplicates the repeats are counted and the samples
    equal those of the input without them; unknown items likewise with data.drop_unknown_items."""
    rows = events()
    parts = write_shards(rows, tmp_path / "clean", 8, "csv")
    catalog = write_catalog(tmp_path)
    dup = parts[2][0]
    parts[6].insert(2, dup)
    parts[4].insert(4, dup)
    parts[1].insert(0, ("3", "999", 5))
    folder = tmp_path / "dirty"
    folder.mkdir()
    for k, part in enumerate(parts):
        (folder / f"part-{k:05d}.csv").write_text("user_id,item_id,timestamp\n" +
                                                  "".join(f"{u},{i},{t}\n" for u, i, t in part))
    with pytest.raises(DataError, match=f"duplicate event user '{dup[0]}' item '{dup[1]}' at {dup[2]}") as e:
        build_samples(config(str(folder), catalog, drop_unknown_items=True), tmp_path / "out")
    assert (e.value.file, e.value.row) == (str(folder / "part-00004.csv"), 5)
    got = build_samples(config(str(folder), catalog, drop_duplicates=True, drop_unknown_items=True), tmp_path / "a")
    want = build_samples(config(str(tmp_path / "clean"), catalog), tmp_path / "b")
    assert got["policies"] == {"duplicates_dropped": 2, "unknown_items_dropped": 1, "merged_events_dropped": 0,
                               "items_merged": 0, "titles_dated": 0}
    assert got["content_hash"] == want["content_hash"] and got["interactions"] == want["interactions"] == len(rows)


def test_parquet_blocks_number_rows_across_batches(tmp_path):
    """A Parquet file read in blocks of 2 rows: the bad row 5 is named row 5, not row 1 of its block."""
    ts = pa.array(["1", "2", "3", "4", "later", "6"])
    pq.write_table(pa.table({"user_id": ["u"] * 6, "item_id": list("abcdef"), "timestamp": ts}), tmp_path / "i.parquet",
                   row_group_size=2)
    blocks = readers.interaction_blocks("parquet", tmp_path / "i.parquet", block_rows=2)
    assert next(blocks).column("timestamp").to_pylist() == [1, 2]
    next(blocks)
    with pytest.raises(DataError, match=r"i\.parquet, row 5, column 'timestamp': .*'later'"):
        next(blocks)


def test_list_files_on_a_pyarrow_filesystem(tmp_path):
    """A folder of shards on a `SubTreeFileSystem` (as an object store is reached): files in
    path order, hidden and ``_`` files skipped, globs matched; missing inputs refused by name."""
    (tmp_path / "logs" / "day2").mkdir(parents=True)
    (tmp_path / "logs" / "day1").mkdir()
    for name in ("day2/b.parquet", "day1/a.parquet", "day1/.a.parquet.crc", "_SUCCESS", "day2/c.csv"):
        (tmp_path / "logs" / name).write_bytes(b"x" * 3)
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    _, paths, names, size = list_files("logs", fs)
    assert paths == names == ["logs/day1/a.parquet", "logs/day2/b.parquet", "logs/day2/c.csv"] and size == 9
    assert list_files("logs/*/*.parquet", fs)[1] == ["logs/day1/a.parquet", "logs/day2/b.parquet"]
    assert list_files("logs/day1/a.parquet", fs)[1:3] == (["logs/day1/a.parquet"], ["logs/day1/a.parquet"])
    uri = (tmp_path / "logs").as_uri()
    assert list_files(uri + "/day2")[2] == [uri + "/day2/b.parquet", uri + "/day2/c.csv"]
    with pytest.raises(DataError, match="file logs/nothing: file does not exist"):
        list_files("logs/nothing", fs)
    with pytest.raises(DataError, match=r"file logs/\*\.json: no file matches this pattern"):
        list_files("logs/*.json", fs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the folder holds no file"):
        list_files(str(tmp_path / "empty"))
