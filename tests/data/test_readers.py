"""Readers: every format into the canonical schema, and every bad input refused precisely."""

from __future__ import annotations

import json
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rosepo.data import readers
from rosepo.errors import DataError
from rosepo.schema import CATALOG, INTERACTIONS


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture
def csv_pair(tmp_path):
    inter = write(tmp_path / "inter.csv", "uid,iid,ts\n1,10,100\n1,11,200\n2,10,150\n")
    items = write(tmp_path / "items.csv", "iid,name\n10,Heat\n11,\"Sex, Lies, and Videotape\"\n")
    return inter, items


MAPPING = {"user_id": "uid", "item_id": "iid", "timestamp": "ts", "title": "name"}


def test_csv_with_mapping(csv_pair):
    inter, catalog = readers.read_csv_files(*csv_pair, columns=MAPPING)
    assert inter.schema == INTERACTIONS and catalog.schema == CATALOG
    assert inter.to_pylist()[1] == {"user_id": "1", "item_id": "11", "timestamp": 200}
    assert catalog.column("title").to_pylist() == ["Heat", "Sex, Lies, and Videotape"]


def test_tsv(tmp_path):
    inter = write(tmp_path / "i.tsv", "user_id\titem_id\ttimestamp\nu\tx\t5\n")
    items = write(tmp_path / "c.tsv", "item_id\ttitle\nx\tX\n")
    inter_t, cat = readers.read_csv_files(inter, items, delimiter="\t")
    assert inter_t.to_pylist() == [{"user_id": "u", "item_id": "x", "timestamp": 5}]


def test_parquet_int_ids_and_timestamps(tmp_path):
    pq.write_table(pa.table({"u": [1, 2], "i": [7, 8], "t": pa.array([0, 86400], pa.timestamp("s"))}),
                   tmp_path / "i.parquet")
    pq.write_table(pa.table({"i": [7, 8], "title": ["A", "B"]}), tmp_path / "c.parquet")
    inter, cat = readers.read_parquet_files(tmp_path / "i.parquet", tmp_path / "c.parquet",
                                            columns={"user_id": "u", "item_id": "i", "timestamp": "t"})
    assert inter.to_pylist() == [{"user_id": "1", "item_id": "7", "timestamp": 0},
                                 {"user_id": "2", "item_id": "8", "timestamp": 86400}]


def test_recbole_atomic_files(tmp_path):
    inter = write(tmp_path / "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                        "196\t242\t3\t881250949\n")
    items = write(tmp_path / "x.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\n"
                                       "242\tUsual Suspects, The\t1995\n")
    i, c = readers.read_recbole(inter, items)
    assert i.to_pylist() == [{"user_id": "196", "item_id": "242", "timestamp": 881250949}]
    assert c.to_pylist() == [{"item_id": "242", "title": "The Usual Suspects"}]


def test_ml100k_raw_latin1(tmp_path):
    data = write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    genres = "|".join(["0"] * 19)
    items = write(tmp_path / "u.item", f"242|Kolya (1996)|24-Jan-1997||http://x|{genres}\n"
                                       f"302|Misérables, Les (1995)|01-Jan-1995||http://y|{genres}\n",
                  encoding="latin-1")
    i, c = readers.read_ml100k_raw(data, items)
    assert c.column("title").to_pylist() == ["Kolya", "Misérables, Les"]
    assert len(i) == 2


# --- titles: one identity (`rosepo.data.titles.title_key`), checked when the catalog is read ---

@pytest.mark.parametrize("fmt", ["csv", "parquet", "recbole"])
def test_titles_one_under_case_and_spacing_refused(tmp_path, fmt):
    """Two items of one title (case and spacing aside) in a catalog that is not MovieLens: refused,
    naming the file, both ids, both rows and the remedy (once both became candidates and the
    exactly right answer was scored invalid)."""
    rows = [("1", "Movie 1"), ("2", "Heat"), ("3", "MOVIE  1")]
    inter = write(tmp_path / "i.csv", "user_id,item_id,timestamp\nu,1,5\n")
    if fmt == "csv":
        items = write(tmp_path / "c.csv", "item_id,title\n" + "".join(f"{i},{t}\n" for i, t in rows))
        read = lambda: readers.read_csv_files(inter, items)  # noqa: E731
    elif fmt == "parquet":
        pq.write_table(pa.table({"user_id": ["u"], "item_id": ["1"], "timestamp": [5]}), tmp_path / "i.parquet")
        pq.write_table(pa.table({"item_id": [i for i, _ in rows], "title": [t for _, t in rows]}),
                       items := tmp_path / "c.parquet")
        read = lambda: readers.read_parquet_files(tmp_path / "i.parquet", items)  # noqa: E731
    else:
        inter = write(tmp_path / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\t1\t5\n")
        items = write(tmp_path / "x.item", "item_id:token\tmovie_title:token_seq\n"
                      + "".join(f"{i}\t{t}\n" for i, t in rows))
        read = lambda: readers.read_recbole(inter, items)  # noqa: E731
    with pytest.raises(DataError) as e:
        read()
    assert (e.value.file, e.value.row) == (str(items), 3)
    assert "item '3' titled 'MOVIE 1' and item '1' titled 'Movie 1'" in str(e.value)  # spacing collapsed on read
    assert "row 1" in str(e.value) and "a title of its own" in str(e.value)


def test_ml100k_raw_namesakes_dated_and_double_listings_merged(tmp_path):
    """ML-100K keeps its colliding titles apart: namesakes get their year back ("Cape Fear (1962)",
    "Cape Fear (1991)"), one film listed twice ("Chasing Amy (1997)": 246 and 268) is merged into
    the smallest id, its events remapped; a user who rated both listings keeps the first rating."""
    genres = "|".join(["0"] * 19)
    items = write(tmp_path / "u.item", "".join(f"{i}|{t}|01-Jan-1990||http://x|{genres}\n" for i, t in [
        ("218", "Cape Fear (1991)"), ("246", "Chasing Amy (1997)"), ("268", "Chasing Amy (1997)"),
        ("673", "Cape Fear (1962)"), ("1", "Toy Story (1995)")]), encoding="latin-1")
    data = write(tmp_path / "u.data", "7\t268\t3\t100\n7\t246\t4\t200\n8\t268\t5\t300\n9\t673\t1\t400\n")
    inter, catalog = readers.read_ml100k_raw(data, items)
    assert catalog.to_pylist() == [{"item_id": "218", "title": "Cape Fear (1991)"},
                                   {"item_id": "246", "title": "Chasing Amy"},
                                   {"item_id": "673", "title": "Cape Fear (1962)"},
                                   {"item_id": "1", "title": "Toy Story"}]
    assert inter.to_pylist() == [{"user_id": "7", "item_id": "246", "timestamp": 100},
                                 {"user_id": "8", "item_id": "246", "timestamp": 300},
                                 {"user_id": "9", "item_id": "673", "timestamp": 400}]


def test_llara_two_spellings_of_one_title_refused(tmp_path):
    """LLaRA names items by their titles: "Movie 1" in one itemList and "MOVIE 1" in another would be
    two items that evaluation cannot tell apart. Refused, naming both rows."""
    p = tmp_path / "s.json"
    p.write_text(json.dumps([{"historyList": "A::B::C", "itemList": ["Movie 1", "D"], "trueSelection": "D"},
                             {"historyList": "A::B::C", "itemList": ["E", "MOVIE 1"], "trueSelection": "E"}]))
    with pytest.raises(DataError, match=r"s\.json, row 2: 'MOVIE 1' and 'Movie 1' \(file .*s\.json, row 1\) are "
                                        r"one title"):
        readers.read_llara_json(p)
    p.write_text(json.dumps([{"historyList": "A::B", "itemList": ["Movie 1", "movie 1"], "trueSelection": "D"}]))
    with pytest.raises(DataError, match="repeated titles"):
        readers.read_llara_json(p)


# --- bad input: message names file, row, column; DataError only ---------------------------------

def bad_case(tmp_path, inter_text, items_text="iid,name\n10,Heat\n11,Ran\n", inter_bytes=None):
    inter = tmp_path / "inter.csv"
    if inter_bytes is not None:
        inter.write_bytes(inter_bytes)
    else:
        write(inter, inter_text)
    items = write(tmp_path / "items.csv", items_text)
    with pytest.raises(DataError) as e:
        i, c = readers.read_csv_files(inter, items, columns=MAPPING)
        readers.check_consistency(i, c, str(inter), drop_duplicates=False, drop_unknown_items=False)
    return e.value


def test_missing_column(tmp_path):
    err = bad_case(tmp_path, "uid,item,ts\n1,10,100\n")
    assert "missing column(s) 'iid'" in str(err) and "inter.csv" in str(err) and "data.columns" in str(err)


def test_wrong_timestamp_type(tmp_path):
    err = bad_case(tmp_path, "uid,iid,ts\n1,10,100\n1,11,yesterday\n")
    assert (err.row, err.column) == (2, "timestamp") and "'yesterday'" in str(err)


def test_empty_id(tmp_path):
    err = bad_case(tmp_path, "uid,iid,ts\n1,10,100\n,11,100\n")
    assert (err.row, err.column) == (2, "user_id")


def test_nan_timestamp(tmp_path):
    err = bad_case(tmp_path, "uid,iid,ts\n1,10,nan\n")
    assert (err.row, err.column) == (1, "timestamp")


def test_ragged_row(tmp_path):
    err = bad_case(tmp_path, "uid,iid,ts\n1,10,100\n1,11\n")
    assert err.row == 2 and "expected 3 fields, found 2" in str(err)


def test_duplicate_event(tmp_path):
    err = bad_case(tmp_path, "uid,iid,ts\n1,10,100\n2,10,100\n1,10,100\n")
    assert err.row == 3 and "duplicate event" in str(err) and "data.drop_duplicates" in str(err)


def test_unknown_item(tmp_path):
    err = bad_case(tmp_path, "uid,iid,ts\n1,10,100\n1,99,101\n")
    assert (err.row, err.column) == (2, "item_id") and "'99' is not in the catalog" in str(err)


def test_empty_file(tmp_path):
    err = bad_case(tmp_path, "")
    assert "file is empty" in str(err) and "inter.csv" in str(err)


def test_non_utf8(tmp_path):
    err = bad_case(tmp_path, None, inter_bytes=b"uid,iid,ts\n1,10,100\n1,1\xff1,100\n")
    assert err.row == 2 and "utf-8" in str(err)


def test_title_with_separator(tmp_path):
    err = bad_case(tmp_path, "uid,iid,ts\n1,10,100\n", items_text="iid,name\n10,Heat\n11,A::B\n")
    assert (err.row, err.column) == (2, "title") and "'::'" in str(err)


def test_duplicate_catalog_id(tmp_path):
    err = bad_case(tmp_path, "uid,iid,ts\n1,10,100\n", items_text="iid,name\n10,Heat\n10,Ran\n")
    assert (err.row, err.column) == (2, "item_id")


def test_policies_drop_and_count(tmp_path):
    inter = write(tmp_path / "i.csv", "uid,iid,ts\n1,10,100\n1,10,100\n1,99,5\n")
    items = write(tmp_path / "c.csv", "iid,name\n10,Heat\n")
    i, c = readers.read_csv_files(inter, items, columns=MAPPING)
    out, stats = readers.check_consistency(i, c, "i.csv", drop_duplicates=True, drop_unknown_items=True)
    assert stats == {"duplicates_dropped": 1, "unknown_items_dropped": 1}
    assert out.to_pylist() == [{"user_id": "1", "item_id": "10", "timestamp": 100}]


def test_bad_parquet(tmp_path):
    (tmp_path / "i.parquet").write_bytes(b"not parquet at all")
    pq.write_table(pa.table({"item_id": ["a"], "title": ["A"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        readers.read_parquet_files(tmp_path / "i.parquet", tmp_path / "c.parquet")


def test_llara_json_errors(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps([{"historyList": "A::B", "itemList": ["C", "D"], "trueSelection": "E"}]))
    with pytest.raises(DataError) as e:
        readers.read_llara_json(p)
    assert (e.value.row, e.value.column) == (1, "trueSelection")
    p.write_text("[{\"historyList\": ")
    with pytest.raises(DataError, match="not valid JSON"):
        readers.read_llara_json(p)


# --- issue 19: encodings, integers past 2^53, directories, JSON lines ---------------------------


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_utf8_bom_is_read(tmp_path, delimiter):
    """A CSV/TSV saved by Excel or pandas ``encoding="utf-8-sig"`` starts with a BOM: read as if
    it had none (it once made the first column '\\ufeffuser_id')."""
    d = delimiter
    inter = write(tmp_path / "i.csv", f"user_id{d}item_id{d}timestamp\n1{d}10{d}5\n", encoding="utf-8-sig")
    items = write(tmp_path / "c.csv", f"item_id{d}title\n10{d}Kolya\n", encoding="utf-8-sig")
    i, c = readers.read_csv_files(inter, items, delimiter=d)
    assert i.to_pylist() == [{"user_id": "1", "item_id": "10", "timestamp": 5}]
    assert c.to_pylist() == [{"item_id": "10", "title": "Kolya"}]


def test_utf8_bom_in_every_text_format(tmp_path):
    """RecBole and headerless ML-100K files (whose first field would be '\\ufeff196'), a latin-1
    u.item re-saved as UTF-8 with a BOM, LLaRA JSON, and Parquet column names with a BOM."""
    inter = write(tmp_path / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\n196\t242\t5\n", "utf-8-sig")
    items = write(tmp_path / "x.item", "item_id:token\tmovie_title:token_seq\n242\tKolya\n", "utf-8-sig")
    assert readers.read_recbole(inter, items)[0].column("user_id").to_pylist() == ["196"]
    data = write(tmp_path / "u.data", "196\t242\t3\t881250949\n", "utf-8-sig")
    genres = "|".join(["0"] * 19)
    uitem = write(tmp_path / "u.item", f"242|Misérables, Les (1995)|01-Jan-1995||http://y|{genres}\n", "utf-8-sig")
    i, c = readers.read_ml100k_raw(data, uitem)
    assert i.column("user_id").to_pylist() == ["196"] and c.column("title").to_pylist() == ["Misérables, Les"]
    js = write(tmp_path / "s.json", json.dumps([{"historyList": "A::B", "itemList": ["C", "D"],
                                                  "trueSelection": "C"}]), "utf-8-sig")
    assert readers.read_llara_json(js)[0]["target_title"] == "C"
    pq.write_table(pa.table({"\ufeffuser_id": ["u"], "item_id": ["a"], "timestamp": [1]}), tmp_path / "i.parquet")
    pq.write_table(pa.table({"\ufeffitem_id": ["a"], "title": ["A"]}), tmp_path / "c.parquet")
    assert len(readers.read_parquet_files(tmp_path / "i.parquet", tmp_path / "c.parquet")[0]) == 1


@pytest.mark.parametrize("encoding,match", [
    ("utf-16", "UTF-16 text"), ("utf-16-be", "UTF-16 or UTF-32"), ("utf-16-le", "UTF-16 or UTF-32"),
    ("utf-32", "UTF-32 text"),
])
def test_utf16_and_utf32_refused_with_the_remedy(tmp_path, encoding, match):
    for name in ("i.csv", "s.json"):
        path = write(tmp_path / name, "user_id,item_id,timestamp\n1,10,5\n", encoding)
        with pytest.raises(DataError, match=f"{name}: .*{match}.*re-encode it as UTF-8"):
            if name == "i.csv":
                readers.read_csv_files(path, write(tmp_path / "c.csv", "item_id,title\n10,A\n"))
            else:
                readers.read_llara_json(path)


NS = 1_700_000_000_000_000_000  # nanoseconds: far above 2^53


def test_integer_timestamps_above_2_53_are_exact(tmp_path):
    """Nanosecond timestamps 1 ns apart once went through float() and became equal: events were
    reordered and the same item 99 ns later was refused as a duplicate."""
    inter = write(tmp_path / "i.csv", f"user_id,item_id,timestamp\n1,10,{NS + 100}\n1,11,{NS + 1}\n1,10,{NS + 199}\n")
    items = write(tmp_path / "c.csv", "item_id,title\n10,Heat\n11,Ran\n")
    i, c = readers.read_csv_files(inter, items)
    assert i.column("timestamp").to_pylist() == [NS + 100, NS + 1, NS + 199]
    out, stats = readers.check_consistency(i, c, "i.csv", drop_duplicates=False, drop_unknown_items=False)
    assert len(out) == 3 and stats["duplicates_dropped"] == 0


@pytest.mark.parametrize("column,expected", [
    (pa.array([str(NS + 1), str(NS + 100)]), [NS + 1, NS + 100]),                  # string column
    (pa.array([f" {NS + 1} ", f"+{NS + 2}"]), [NS + 1, NS + 2]),                  # the exact slow path
    (pa.array([NS + 1, NS + 100], pa.uint64()), [NS + 1, NS + 100]),
    (pa.array([Decimal(NS + 1), Decimal(NS + 5)], pa.decimal128(38, 0)), [NS + 1, NS + 5]),  # once through float()
    (pa.array([2.0**53, -(2.0**53)]), [2**53, -(2**53)]),                        # float64: exact up to 2^53
    (pa.array(["2024-01-31T12:00:00+01:00", "2024-01-31"]), [1706698800, 1706659200]),  # ISO-8601, seconds
])
def test_parquet_timestamps_exact(tmp_path, column, expected):
    pq.write_table(pa.table({"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": column}),
                   tmp_path / "i.parquet")
    pq.write_table(pa.table({"item_id": ["a", "b"], "title": ["A", "B"]}), tmp_path / "c.parquet")
    inter, _ = readers.read_parquet_files(tmp_path / "i.parquet", tmp_path / "c.parquet")
    assert inter.column("timestamp").to_pylist() == expected


@pytest.mark.parametrize("column,match", [
    (pa.array([1.0, 2.0**53 + 2]), "expected an integer timestamp.*holds integers exactly only up to 9007199254740992"),
    (pa.array([1.0, 2.0**24 + 2], pa.float32()), "expected an integer timestamp.*exactly only up to 16777216"),
    (pa.array(["5", "5.5"]), "expected an integer timestamp or an ISO-8601 time, found '5.5'"),
    (pa.array(["5", "2024-01-31"]), "expected an integer timestamp like row 1, found '2024-01-31'"),
    (pa.array(["2024-01-31", "5"]), "expected an ISO-8601 time like row 1, found '5'"),
    (pa.array([True, False]), "expected an integer timestamp"),                        # once read as 1 and 0
    (pa.array(["5", str(2**63)]), "expected an integer timestamp.*found .9223372036854775808."),
])
def test_parquet_timestamps_refused_by_row(tmp_path, column, match):
    pq.write_table(pa.table({"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": column}),
                   tmp_path / "i.parquet")
    pq.write_table(pa.table({"item_id": ["a", "b"], "title": ["A", "B"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"i\.parquet, row (1|2), column 'timestamp': " + match):
        readers.read_parquet_files(tmp_path / "i.parquet", tmp_path / "c.parquet")


# --- timestamps in one unit per file (data.timestamp_unit), one integer syntax ------------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_units_mixed_in_one_file_refused_naming_two_rows(tmp_path, fmt):
    """Seconds and milliseconds in one file were accepted and ordered wrongly (the ms event of
    2020 sorting after seconds of any year). Refused under data.timestamp_unit auto, naming both
    rows (across Parquet batches too) and the remedy."""
    ts = [1_600_000_000, 1_600_000_100, 1_600_000_000_500]
    if fmt == "csv":
        path = write(tmp_path / "i.csv", "user_id,item_id,timestamp\n" + "".join(f"u,a,{t}\n" for t in ts))
    else:
        pq.write_table(pa.table({"user_id": ["u"] * 3, "item_id": ["a"] * 3, "timestamp": ts}),
                       path := tmp_path / "i.parquet")
    with pytest.raises(DataError) as e:
        list(readers.interaction_blocks(fmt, path, block_rows=1))
    assert (e.value.file, e.value.row, e.value.column) == (str(path), 3, "timestamp")
    assert "timestamp 1600000000500 reads as ms by its magnitude, but row 1's 1600000000 as s" in str(e.value)
    assert "set data.timestamp_unit (s, ms, us or ns)" in str(e.value)


@pytest.mark.parametrize("unit,expected", [
    ("ms", [1_600_000_000, -1, 0, 1_600_000_001]),   # floored: -1 ms is the second before 1970
    ("s", [1_600_000_000_500, -1, 5, 1_600_000_001_000]),
])
def test_declared_unit_is_converted_to_seconds(tmp_path, unit, expected):
    """With a declared unit every integer is taken in it, whatever its magnitude (5 ms reads as
    seconds under auto), and becomes whole seconds."""
    path = write(tmp_path / "i.csv", "user_id,item_id,timestamp\nu,a,1600000000500\nu,b,-1\nu,c,5\nu,d,1600000001000\n")
    inter = pa.concat_tables(readers.interaction_blocks("csv", path, timestamp_unit=unit))
    assert inter.column("timestamp").to_pylist() == expected


def test_declared_unit_leaves_iso_times_and_arrow_timestamps_in_seconds(tmp_path):
    path = write(tmp_path / "i.csv", "user_id,item_id,timestamp\nu,a,2024-01-31\n")
    assert pa.concat_tables(readers.interaction_blocks("csv", path, timestamp_unit="ms")).column(
        "timestamp").to_pylist() == [1706659200]
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["a"], "timestamp": pa.array([1500], pa.timestamp("ms"))}),
                   tmp_path / "i.parquet")
    assert pa.concat_tables(readers.interaction_blocks("parquet", tmp_path / "i.parquet", timestamp_unit="ns")).column(
        "timestamp").to_pylist() == [1]


@pytest.mark.parametrize("cells,bad", [
    (["5", "0x10"], "0x10"),          # once 16, by Arrow, when every row cast
    (["5", "0x10", "7.5"], "0x10"),   # ... and refused when a neighbour did not
    (["5", "1_000"], "1_000"),        # once 1000, by Python's Decimal, when a neighbour did not cast
    (["5", "1e3"], "1e3"),
    (["5", "3.0"], "3.0"),
    (["5", "\u0663"], "\u0663"),    # an Arabic-Indic digit: a digit to Python, not here
])
def test_one_integer_syntax_whatever_the_neighbours(tmp_path, cells, bad):
    path = write(tmp_path / "i.csv", "user_id,item_id,timestamp\n" + "".join(f"u,a{k},{c}\n" for k, c in enumerate(cells)))
    with pytest.raises(DataError) as e:
        list(readers.interaction_blocks("csv", path))
    assert (e.value.row, e.value.column) == (cells.index(bad) + 1, "timestamp") and repr(bad) in str(e.value)
    write(path, "user_id,item_id,timestamp\nu,a, +5 \nu,b,-7\nu,c,007\n")
    assert pa.concat_tables(readers.interaction_blocks("csv", path)).column("timestamp").to_pylist() == [5, -7, 7]


def test_integer_ids_above_2_53_exact_and_float_ids_past_it_refused(tmp_path):
    pq.write_table(pa.table({"user_id": pa.array([2**53 + 1, 2**63 - 1]), "item_id": ["a", "a"],
                             "timestamp": [1, 2]}), tmp_path / "i.parquet")
    pq.write_table(pa.table({"item_id": ["a"], "title": ["A"]}), tmp_path / "c.parquet")
    inter, _ = readers.read_parquet_files(tmp_path / "i.parquet", tmp_path / "c.parquet")
    assert inter.column("user_id").to_pylist() == [str(2**53 + 1), str(2**63 - 1)]
    pq.write_table(pa.table({"user_id": pa.array([1.0, 2.0**53 + 2]), "item_id": ["a", "a"], "timestamp": [1, 2]}),
                   tmp_path / "i.parquet")
    with pytest.raises(DataError, match=r"row 2, column 'user_id': expected an integer or string id.*store ids"):
        readers.read_parquet_files(tmp_path / "i.parquet", tmp_path / "c.parquet")


def test_directory_given_as_a_file(tmp_path):
    """It once said "file does not exist"."""
    items = write(tmp_path / "c.csv", "item_id,title\n10,A\n")
    with pytest.raises(DataError, match=f"file {tmp_path}: is a directory; expected a file"):
        readers.read_csv_files(tmp_path, items)
    with pytest.raises(DataError, match="is a directory"):
        readers.read_llara_json(tmp_path)


def test_truncated_json_says_line_not_row(tmp_path):
    """The JSON parser's position is a line of the file, not a sample (once "row 40" for a file of 3 samples)."""
    good = [{"historyList": "A::B", "itemList": ["C", "D"], "trueSelection": "C"}] * 3
    text = json.dumps(good, indent=1)
    p = write(tmp_path / "s.json", text[: len(text) - 10])
    with pytest.raises(DataError) as e:
        readers.read_llara_json(p)
    assert e.value.row is None and e.value.line == text[: len(text) - 10].count("\n") + 1
    assert f"s.json, line {e.value.line}: not valid JSON" in str(e.value) and "row" not in str(e.value)


@pytest.mark.parametrize("candidates,num_candidates", [(["C"], 2), (["C", "D", "E"], 4), ([], 2)])
def test_llara_sample_with_too_few_candidates_refused(tmp_path, candidates, num_candidates):
    """One candidate (once accepted: strategies then raised inside Ray or made no rejected item),
    or fewer than data.num_candidates: refused with the file and the sample's index."""
    ok = {"historyList": "A::B", "itemList": ["C", "D", "E", "F"], "trueSelection": "C"}
    bad = {"historyList": "A::B", "itemList": candidates, "trueSelection": "C"}
    p = write(tmp_path / "s.json", json.dumps([ok, bad]))
    with pytest.raises(DataError, match=r"s\.json, row 2, column '(itemList|trueSelection)'"):
        readers.read_llara_json(p, "train", num_candidates)
