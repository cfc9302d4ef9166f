"""Readers: every format into the canonical schema, and every bad input refused precisely."""

from __future__ import annotations

import json

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
