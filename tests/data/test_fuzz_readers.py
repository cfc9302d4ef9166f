"""Fuzzing the readers: whatever the bytes, a canonical table or a `DataError` naming the file.

Every reader of `rosepo.data.readers` gets random malformed input: CSV/TSV text built from
hostile fields (quotes, delimiters, NaN/inf, huge and negative numbers, empty fields, ragged
rows, several line endings, non-UTF-8 bytes), random JSON values, and random Parquet tables
(odd column names and types, nulls, lists, binary) plus corrupted Parquet bytes, text with
byte-order marks (UTF-8, UTF-16, UTF-32), integers near and above 2^53 and 2^63 as text, ints,
floats and decimals, and tiny interaction logs (degenerate sample sizes). Each file is
drawn either from the fuzzer or as a known-good file, so the second file of a pair (the
catalog) is reached too. The only accepted outcomes:

- a result that keeps the readers' promises: the canonical schema (`INTERACTIONS`/`CATALOG`),
  no nulls, no empty ids or titles, unique catalog ids;
- `DataError` whose message names the offending input file.

Any other exception, or an example slower than the deadline (a hang), fails the test.
`build_samples` must in addition leave nothing behind when its input is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from rosepo.config import DataConfig
from rosepo.data import readers
from rosepo.errors import DataError
from rosepo.schema import CATALOG, HISTORY_SEP, INTERACTIONS

#: ROSEPO_FUZZ_EXAMPLES=5000 for a long local hunt; outcomes: --hypothesis-show-statistics.
EXAMPLES = int(os.environ.get("ROSEPO_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5))
pytestmark = pytest.mark.timeout(max(120, EXAMPLES // 10))

# --- outcome checks -----------------------------------------------------------------------------


def outcome(call, *paths):
    """Run ``call``; return its result, or None after checking a DataError names one of ``paths``."""
    names = [str(p) for p in paths]
    try:
        result = call()
    except DataError as e:
        assert e.file in names, f"DataError names {e.file!r}, not one of {names}: {e}"
        assert f"file {e.file}" in str(e)
        event(f"DataError in {Path(e.file).name}: {e.reason[:24]}")
        return None
    event("accepted")
    return result


def assert_interactions(table: pa.Table) -> None:
    assert table.schema == INTERACTIONS
    for name in INTERACTIONS.names:
        assert table.column(name).null_count == 0, name
    for name in ("user_id", "item_id"):
        assert all(v and v == v.strip() for v in table.column(name).to_pylist()), name


def assert_catalog(table: pa.Table) -> None:
    assert table.schema == CATALOG
    ids, titles = table.column("item_id").to_pylist(), table.column("title").to_pylist()
    assert None not in ids and None not in titles
    assert all(i and i == i.strip() for i in ids)
    assert len(set(ids)) == len(ids)
    assert all(t and t == t.strip() and HISTORY_SEP not in t for t in titles)


def assert_pair(result) -> None:
    if result is not None:
        inter, catalog = result
        assert_interactions(inter)
        assert_catalog(catalog)


@contextmanager
def files(**contents: bytes) -> Iterator[dict[str, Path]]:
    """Write each ``name=bytes`` into a fresh temporary folder; yield name -> path."""
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for name, data in contents.items():
            paths[name] = Path(d) / name
            paths[name].write_bytes(data)
        yield paths


# --- strategies ---------------------------------------------------------------------------------

HOSTILE = ["", " ", "  x  ", "007", "nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400",
           "99999999999999999999", "9223372036854775808", "-9223372036854775809", "-1.5", "3.0", "1e3", "0x10",
           '"', '""', '"a,b"', 'a"b', '"unterminated', "Usual Suspects, The (1995)", "(1995)", " (1995) ", "::",
           "a::b", "\\N", "null", "NULL", "é", "\u00a0", "\u2028", "\x00", "\t", ",", "|", ";", "\ufeff",
           str(2**53 + 1), str(-(2**53) - 1), "1700000000000000001", "1.7e18", "2024-01-31", "2024-01-31T12:00:00Z",
           "2024-13-01", "9007199254740993.0"]
PLAIN = st.one_of(st.integers(-3, 30).map(str), st.sampled_from(["Heat", "Kolya", "Babe (1995)", "Fargo, The"]))
HOSTILE_FIELD = st.one_of(st.sampled_from(HOSTILE), st.integers(-2**70, 2**70).map(str),
                          st.floats().map(repr), st.text(max_size=6))
DELIMITERS = [",", "\t", ";", "|"]


def often(draw, tenths: int) -> bool:
    """True with probability ``tenths``/10; shrinks towards True, the usual case.

    (``sampled_from`` draws uniformly; ``integers(0, 9)`` would give 0 a third of the time.)
    """
    return draw(st.sampled_from(range(10))) < tenths


@st.composite
def field(draw) -> str:
    """A plain id, number or title nine times in ten, else something hostile."""
    return draw(PLAIN) if often(draw, 9) else draw(HOSTILE_FIELD)


@st.composite
def corrupted(draw, data: bytes) -> bytes:
    """``data`` untouched three times in four, else with bytes overwritten, inserted or cut off."""
    if often(draw, 7):
        return data
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "insert", "truncate"]))
        pos = draw(st.integers(0, len(buf)))
        if kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif pos < len(buf):
            buf[pos] = draw(st.integers(0, 255))
    return bytes(buf)


@st.composite
def delimited(draw, header: list[str] | None, width: int, delimiter: str | None = None) -> bytes:
    """Delimited text: a header (mostly the expected one) and rows (mostly of the right width),
    random line endings, mostly UTF-8, sometimes corrupted; one time in ten random bytes."""
    if not often(draw, 9):
        return draw(st.binary(max_size=200))
    delim = delimiter or draw(st.sampled_from(DELIMITERS))
    exact = st.lists(field(), min_size=width, max_size=width)
    lines = draw(st.lists(exact if often(draw, 7) else st.lists(field(), max_size=width + 2), max_size=8))
    if header is not None:
        lines.insert(0, header if often(draw, 6) else draw(st.one_of(st.permutations(header),
                                                                     st.lists(field(), max_size=5))))
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = eol.join(delim.join(line) for line in lines) + draw(st.sampled_from(["", eol]))
    encoding = "utf-8" if often(draw, 7) else draw(st.sampled_from(["utf-8-sig", "utf-16", "utf-16-le", "utf-32",
                                                                     "latin-1", "cp1252"]))
    return draw(corrupted(text.encode(encoding, errors="replace")))


def good_csv(header: list[str], rows: list[list[str]], delim: str = ",") -> bytes:
    return "\n".join(delim.join(r) for r in [header, *rows]).encode()


GOOD_INTER_ROWS = [["1", "10", "100"], ["1", "11", "200"], ["2", "10", "150"]]
GOOD_ITEM_ROWS = [["10", "Heat"], ["11", "Usual Suspects, The (1995)"]]
INTER_HEADER = ["user_id", "item_id", "timestamp"]
ITEM_HEADER = ["item_id", "title"]
MAPPED_HEADERS = {"user_id": "uid", "item_id": "iid", "timestamp": "ts", "title": "name"}
RANDOM_MAP = st.dictionaries(st.sampled_from(["user_id", "item_id", "timestamp", "title"]),
                             st.sampled_from(["user_id", "item_id", "timestamp", "title", "uid", "iid", "ts", "name",
                                              "", "x"]), max_size=4)


@st.composite
def naming(draw) -> tuple[dict | None, dict]:
    """A ``columns`` mapping and the header names the files use: canonical names with no
    mapping, file names with the matching mapping, or a random mapping with either."""
    mode = draw(st.sampled_from(["canonical", "canonical", "mapped", "mapped", "random"]))
    canonical = {c: c for c in MAPPED_HEADERS}
    if mode == "canonical":
        return draw(st.sampled_from([None, {}])), canonical
    if mode == "mapped":
        return MAPPED_HEADERS, MAPPED_HEADERS
    return draw(RANDOM_MAP), draw(st.sampled_from([canonical, MAPPED_HEADERS]))


# --- CSV / TSV ----------------------------------------------------------------------------------


@FUZZ
@given(data=st.data(), names=naming(),
       delimiter=st.sampled_from(DELIMITERS * 5 + ["", "::", '"', "\n", "\r", " "]))
def test_read_csv_files_fuzz(data, names, delimiter):
    columns, header = names
    d = delimiter if delimiter in DELIMITERS else ","
    inter_header, item_header = [header[c] for c in INTER_HEADER], [header[c] for c in ITEM_HEADER]
    inter = data.draw(st.one_of(st.just(good_csv(inter_header, GOOD_INTER_ROWS, d)),
                                delimited(inter_header, 3, d), delimited(inter_header, 3)))
    items = data.draw(st.one_of(st.just(good_csv(item_header, GOOD_ITEM_ROWS, d)),
                                delimited(item_header, 2, d), delimited(item_header, 2)))
    with files(**{"inter.csv": inter, "items.csv": items}) as p:
        result = outcome(lambda: readers.read_csv_files(p["inter.csv"], p["items.csv"], delimiter=delimiter,
                                                         columns=columns), p["inter.csv"], p["items.csv"])
    assert_pair(result)


@FUZZ
@given(data=st.data())
def test_read_recbole_fuzz(data):
    inter_header = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    item_header = ["item_id:token", "movie_title:token_seq", "release_year:token"]
    good_inter = good_csv(inter_header, [["196", "242", "3", "881250949"]], "\t")
    good_items = good_csv(item_header, [["242", "Kolya (1996)", "1996"]], "\t")
    inter = data.draw(st.one_of(st.just(good_inter), delimited(inter_header, 4, "\t"),
                                delimited(["user_id:token", "item_id:float", "timestamp:token", "user_id:x"], 4,
                                          "\t")))
    items = data.draw(st.one_of(st.just(good_items), delimited(item_header, 3, "\t"),
                                delimited(["item_id:token", "title:token_seq"], 2, "\t")))
    with files(**{"x.inter": inter, "x.item": items}) as p:
        result = outcome(lambda: readers.read_recbole(p["x.inter"], p["x.item"]), p["x.inter"], p["x.item"])
    assert_pair(result)


@FUZZ
@given(data=st.data())
def test_read_ml100k_raw_fuzz(data):
    good_inter = good_csv([], [["196", "242", "3", "881250949"]], "\t").lstrip(b"\n")
    good_items = good_csv([], [["242", "Kolya (1996)", "24-Jan-1997", "", "http://x"] + ["0"] * 19], "|")
    good_items = good_items.lstrip(b"\n")
    inter = data.draw(st.one_of(st.just(good_inter), delimited(None, 4, "\t")))
    items = data.draw(st.one_of(st.just(good_items), delimited(None, 24, "|")))
    with files(**{"u.data": inter, "u.item": items}) as p:
        result = outcome(lambda: readers.read_ml100k_raw(p["u.data"], p["u.item"]), p["u.data"], p["u.item"])
    assert_pair(result)


# --- Parquet ------------------------------------------------------------------------------------

_I64 = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(2**53 - 4, 2**53 + 4), st.integers(2**63 - 4, 2**63 - 1))
_SAFE_TS = st.integers(-2**40, 2**40)
COLUMN_KINDS = {
    "int64": (pa.int64(), _I64),
    "uint64": (pa.uint64(), st.integers(0, 2**64 - 1)),
    "int8": (pa.int8(), st.integers(-128, 127)),
    "float64": (pa.float64(), st.one_of(st.floats(), st.sampled_from([2.0**53, 2.0**53 + 2, -(2.0**53), 1.7e18]))),
    "float32": (pa.float32(), st.floats(width=32)),
    "string": (pa.string(), field()),
    "large_string": (pa.large_string(), field()),
    "binary": (pa.binary(), st.binary(max_size=6)),
    "bool": (pa.bool_(), st.booleans()),
    "list<int64>": (pa.list_(pa.int64()), st.lists(_I64, max_size=3)),
    "list<string>": (pa.list_(pa.string()), st.lists(field(), max_size=3)),
    "timestamp[s]": (pa.timestamp("s"), _SAFE_TS),
    "timestamp[ms]": (pa.timestamp("ms"), _SAFE_TS),
    "timestamp[ns]": (pa.timestamp("ns", tz="UTC"), _SAFE_TS),
    "date32": (pa.date32(), st.integers(-10**5, 10**5)),
    "decimal": (pa.decimal128(38, 2), st.decimals(min_value=Decimal("-1e35"), max_value=Decimal("1e35"),
                                                  places=2, allow_nan=False)),
    "null": (pa.null(), st.none()),
}


_ID_KINDS = ["int64", "string", "float64", "uint64", "int8", "large_string"]
#: Column kinds a reader may accept for each canonical column (others are drawn too, less often).
SUITABLE = {"user_id": _ID_KINDS, "item_id": _ID_KINDS, "title": ["string", "large_string"],
            "timestamp": ["int64", "uint64", "timestamp[s]", "timestamp[ms]", "timestamp[ns]", "float64", "string",
                          "decimal"]}


@st.composite
def random_column(draw, kinds: list[str], n: int) -> pa.Array:
    """``n`` values of a kind drawn from ``kinds``; nulls in one column in four; strings
    sometimes dictionary-encoded."""
    typ, values = COLUMN_KINDS[draw(st.sampled_from(kinds))]
    cell = values if often(draw, 7) else st.one_of(st.none(), values)
    col = pa.array(draw(st.lists(cell, min_size=n, max_size=n)), typ)
    return col.dictionary_encode() if pa.types.is_string(typ) and often(draw, 2) else col


@st.composite
def random_table(draw, canonical: list[str], header: dict) -> pa.Table:
    """0-5 rows; each canonical column (named per ``header``) present nine times in ten, of a
    suitable kind mostly; 0-2 extra columns of any kind whose names may repeat others."""
    n = draw(st.integers(0, 5))
    named = []
    for c in canonical:
        if often(draw, 9):
            kinds = SUITABLE[c] if often(draw, 7) else sorted(COLUMN_KINDS)
            named.append((header[c], draw(random_column(kinds, n))))
    for _ in range(draw(st.integers(0 if named else 1, 2))):
        name = draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=4)))
        named.append((name, draw(random_column(sorted(COLUMN_KINDS), n))))
    named = draw(st.permutations(named))
    return pa.Table.from_arrays([c for _, c in named], names=[name for name, _ in named])


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


GOOD_ITEMS = pa.table({"item_id": ["a", "b"], "title": ["A", "B"]})
NAMES = ["user_id", "item_id", "timestamp", "title", "uid", "iid", "ts", "name"]


@st.composite
def parquet_file(draw, good: dict, header: dict) -> bytes:
    """Bytes of a known-good table (columns ``good``, named per ``header``) or a random table
    with the same canonical columns; sometimes corrupted."""
    if often(draw, 3):
        table = pa.table({header[c]: v for c, v in good.items()})
    else:
        table = draw(random_table(list(good), header))
    return draw(corrupted(parquet_bytes(table)))


@FUZZ
@given(data=st.data(), names=naming())
def test_read_parquet_files_fuzz(data, names):
    columns, header = names
    inter = data.draw(parquet_file({"user_id": [1, 2], "item_id": ["a", "b"], "timestamp": [5, 6]}, header))
    items = data.draw(parquet_file({"item_id": ["a", "b"], "title": ["A", "B"]}, header))
    with files(**{"i.parquet": inter, "c.parquet": items}) as p:
        result = outcome(lambda: readers.read_parquet_files(p["i.parquet"], p["c.parquet"], columns=columns),
                         p["i.parquet"], p["c.parquet"])
    assert_pair(result)


# --- check_consistency --------------------------------------------------------------------------


@FUZZ
@given(events=st.lists(st.tuples(st.sampled_from("uvw"), st.sampled_from("abcde"), st.integers(-2, 2)),
                       max_size=12),
       catalog_ids=st.sets(st.sampled_from("abcdef"), max_size=6),
       drop_duplicates=st.booleans(), drop_unknown_items=st.booleans())
def test_check_consistency_fuzz(events, catalog_ids, drop_duplicates, drop_unknown_items):
    """Either a refusal naming the file, or: only known items, no duplicate events, and every
    input event either kept (in order) or counted as dropped."""
    inter = pa.Table.from_pylist([dict(zip(INTERACTIONS.names, e)) for e in events], schema=INTERACTIONS)
    ids = sorted(catalog_ids)
    catalog = pa.Table.from_pydict({"item_id": ids, "title": [i.upper() for i in ids]}, schema=CATALOG)
    result = outcome(lambda: readers.check_consistency(inter, catalog, "events.csv",
                                                       drop_duplicates=drop_duplicates,
                                                       drop_unknown_items=drop_unknown_items), "events.csv")
    unknown = [e for e in events if e[1] not in catalog_ids]
    known = [e for e in events if e[1] in catalog_ids]
    if result is None:
        assert (unknown and not drop_unknown_items) or (len(set(known)) < len(known) and not drop_duplicates)
        return
    out, stats = result
    assert_interactions(out)
    rows = [tuple(r.values()) for r in out.to_pylist()]
    assert rows == list(dict.fromkeys(known))
    assert stats == {"unknown_items_dropped": len(unknown), "duplicates_dropped": len(known) - len(rows)}


# --- LLaRA JSON ---------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6), st.sampled_from(HOSTILE)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=12)
GOOD_TITLE = st.sampled_from(["Heat", "Kolya", "Babe", "Fargo", "Usual Suspects, The"])
BAD_TITLE = st.one_of(st.sampled_from([" Heat ", "", " ", "a::b", "::", "Heat\n"]), st.text(max_size=5))


@st.composite
def title(draw) -> str:
    return draw(GOOD_TITLE) if often(draw, 8) else draw(BAD_TITLE)


@st.composite
def llara_record(draw):
    """A sample that is often valid and otherwise wrong in one or a few fields."""
    cands = draw(st.lists(title(), max_size=6, unique=often(draw, 8)))
    target = draw(st.sampled_from(cands)) if cands and often(draw, 8) else draw(title())
    rec = {"historyList": HISTORY_SEP.join(draw(st.lists(title(), min_size=1, max_size=3))), "itemList": cands,
           "trueSelection": target}
    if not often(draw, 7):
        for key in draw(st.sets(st.sampled_from(sorted(rec) + ["extra"]), min_size=1, max_size=2)):
            rec[key] = draw(JSON_VALUES)
    if draw(st.integers(0, 9)) == 0:
        del rec[draw(st.sampled_from(["historyList", "itemList", "trueSelection"]))]
    return rec


@st.composite
def llara_file(draw) -> bytes:
    value = draw(st.lists(llara_record(), max_size=4)) if often(draw, 8) else draw(JSON_VALUES)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))
    data = text.encode("utf-8", errors="surrogatepass")
    return draw(corrupted(data)) if often(draw, 9) else draw(st.binary(max_size=100))


@FUZZ
@given(data=llara_file(), num_candidates=st.integers(0, 3))
def test_read_llara_json_fuzz(data, num_candidates):
    with files(**{"train.json": data}) as p:
        rows = outcome(lambda: readers.read_llara_json(p["train.json"], "train", num_candidates), p["train.json"])
    if rows is not None:
        assert rows and len({r["sample_id"] for r in rows}) == len(rows)
        for r in rows:
            assert len(r["candidate_titles"]) >= max(2, num_candidates)  # a wrong title to reject, at least
            assert r["target_title"] in r["candidate_titles"]
            assert all(isinstance(t, str) and t.strip() for t in r["candidate_titles"] + r["history_titles"])
            assert len(set(r["candidate_titles"])) == len(r["candidate_titles"])


@pytest.mark.parametrize("text", ["[" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 50_000])
def test_read_llara_json_deep_nesting(tmp_path, text):
    """A deeply nested document makes Python's json recurse past its limit: a DataError, not a
    RecursionError."""
    path = tmp_path / "deep.json"
    path.write_text(text)
    with pytest.raises(DataError, match="deep.json"):
        readers.read_llara_json(path)


# --- hand-made cases the fuzzer found -----------------------------------------------------------


@pytest.mark.parametrize("inter,kw", [
    ("user_id,item_id,timestamp\n1,10,99999999999999999999\n", {}),   # overflows int64
    ("user_id,item_id,timestamp\n1,10,1e300\n", {}),
    ("user_id,item_id,timestamp,user_id\n1,10,5,2\n", {}),              # duplicate column
    ("user_id,item_id,timestamp\n1,10,5\n", {"columns": {"user_id": "item_id"}}),  # two names, one column
    ("user_id,item_id,timestamp\n1,10,5\n", {"delimiter": ""}),
    ("user_id,item_id,timestamp\n1,10,5\n", {"delimiter": "::"}),
])
def test_csv_found_cases(tmp_path, inter, kw):
    """Inputs that once escaped as OverflowError / KeyError / ValueError: now DataErrors."""
    i, c = tmp_path / "i.csv", tmp_path / "c.csv"
    i.write_text(inter)
    c.write_text("item_id,title\n10,Heat\n")
    with pytest.raises(DataError, match=r"file .*i\.csv"):
        readers.read_csv_files(i, c, **kw)


def test_recbole_title_empty_once_normalised(tmp_path):
    """"(1995)" is a non-empty title that normalisation (year stripped) makes empty: refused."""
    i = tmp_path / "x.inter"
    c = tmp_path / "x.item"
    i.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t1\t5\n")
    c.write_text("item_id:token\tmovie_title:token_seq\n1\t(1995)\n")
    with pytest.raises(DataError, match=r"x\.item, row 1, column 'title'"):
        readers.read_recbole(i, c)


@pytest.mark.parametrize("column,match", [
    (pa.array([1e20]), "expected an integer or string id"),
    (pa.array([2**64 - 1], pa.uint64()), None),
])
def test_parquet_out_of_range_ids(tmp_path, column, match):
    pq.write_table(pa.table({"user_id": [1], "item_id": column, "timestamp": [1]}), tmp_path / "i.parquet")
    pq.write_table(pa.table({"item_id": ["1"], "title": ["A"]}), tmp_path / "c.parquet")
    if match is None:   # an unsigned id is just a (long) id
        inter, _ = readers.read_parquet_files(tmp_path / "i.parquet", tmp_path / "c.parquet")
        assert inter.column("item_id").to_pylist() == [str(2**64 - 1)]
    else:
        with pytest.raises(DataError, match=match):
            readers.read_parquet_files(tmp_path / "i.parquet", tmp_path / "c.parquet")


@pytest.mark.parametrize("column,expected", [
    (pa.array([1500, -1500, 2000], pa.timestamp("ms")), [1, -1, 2]),    # truncated to whole seconds
    (pa.array([2**64 - 1], pa.uint64()), None),
    (pa.array([1e300]), None),
    (pa.array([Decimal(10**30)], pa.decimal128(38, 0)), None),
])
def test_parquet_timestamps(tmp_path, column, expected):
    n = len(column)
    pq.write_table(pa.table({"user_id": ["u"] * n, "item_id": ["a"] * n, "timestamp": column}),
                   tmp_path / "i.parquet")
    pq.write_table(pa.table({"item_id": ["a"], "title": ["A"]}), tmp_path / "c.parquet")
    if expected is None:
        with pytest.raises(DataError, match=r"i\.parquet, row 1, column 'timestamp': expected an integer"):
            readers.read_parquet_files(tmp_path / "i.parquet", tmp_path / "c.parquet")
    else:
        inter, _ = readers.read_parquet_files(tmp_path / "i.parquet", tmp_path / "c.parquet")
        assert inter.column("timestamp").to_pylist() == expected


@pytest.mark.parametrize("ids", [pa.array([1, None, 3]), pa.array(["a", None, "c"])])
def test_parquet_null_ids(tmp_path, ids):
    """A null id is refused (it once slipped through: ``null OR true`` is null, not true)."""
    pq.write_table(pa.table({"user_id": ids, "item_id": ["a", "a", "a"], "timestamp": [1, 2, 3]}),
                   tmp_path / "i.parquet")
    pq.write_table(GOOD_ITEMS, tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"i\.parquet, row 2, column 'user_id': expected a non-empty id"):
        readers.read_parquet_files(tmp_path / "i.parquet", tmp_path / "c.parquet")


def test_parquet_non_utf8_column_name(tmp_path):
    """A corrupted footer can hold a column name that is not UTF-8 (pyarrow decodes names lazily)."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"user_id": [1], "item_id": [1], "timestamp": [1]}), sink, store_schema=False)
    data = bytearray(sink.getvalue().to_pybytes())
    data[data.index(b"user_id")] = 0x97  # the schema's name, which pyarrow takes the column name from
    (tmp_path / "i.parquet").write_bytes(bytes(data))
    (tmp_path / "c.parquet").write_bytes(parquet_bytes(GOOD_ITEMS))
    with pytest.raises(DataError, match=r"i\.parquet"):
        readers.read_parquet_files(tmp_path / "i.parquet", tmp_path / "c.parquet")


# --- build_samples leaves nothing behind ---------------------------------------------------------

_ITEMS_OK = "item_id,title\n" + "".join(f"{i},Movie {i}\n" for i in range(40))
_INTER_OK = "user_id,item_id,timestamp\n" + "".join(f"u{u},{i},{i}\n" for u in range(3) for i in range(20))


@pytest.mark.parametrize("inter,items,match", [
    ("user,item,time\n1,2,3\n", _ITEMS_OK, "missing column"),
    (_INTER_OK + "u9,1,yesterday\n", _ITEMS_OK, "expected an integer timestamp"),
    (_INTER_OK.encode() + b"u9,\xff,3\n", _ITEMS_OK, "not valid utf-8"),
    (_INTER_OK + "u9,999,3\n", _ITEMS_OK, "not in the catalog"),
    ("user_id,item_id,timestamp\nu1,1,1\nu1,2,2\n", "item_id,title\n1,A\n2,B\n", "distinct titles"),
    (_INTER_OK + "u9,1,3,4\n", _ITEMS_OK, "expected 3 fields"),
])
def test_build_samples_refuses_and_leaves_nothing(tmp_path, inter, items, match, ray_session):
    """A refused build raises DataError before any output exists: no output folder, no
    ``.tmp-*`` sibling; an earlier output of the same folder is left untouched."""
    from rosepo.data.samples import build_samples

    (tmp_path / "in").mkdir()
    i, c = tmp_path / "in" / "inter.csv", tmp_path / "in" / "items.csv"
    i.write_bytes(inter if isinstance(inter, bytes) else inter.encode())
    c.write_text(items)
    cfg = DataConfig(format="csv", interactions=str(i), catalog=str(c), max_history=5, num_candidates=5)
    fresh, kept = tmp_path / "out" / "fresh", tmp_path / "out" / "kept"
    kept.mkdir(parents=True)
    (kept / "manifest.json").write_text("{}")
    for out in (fresh, kept):
        with pytest.raises(DataError, match=match):
            build_samples(cfg, out)
    assert not fresh.exists()
    assert [p.name for p in kept.iterdir()] == ["manifest.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["kept"]


# --- issue 19: byte-order marks, integers past 2^53, degenerate sizes, bad data config values ---

SAFE_ID = st.text(alphabet="abcxyz0123456789", min_size=1, max_size=4)
#: Integers where float64 stops being exact (2^53) and where int64 ends (2^63), and ordinary ones.
BIG_INT = st.one_of(st.integers(-10**12, 10**12), st.integers(2**53 - 3, 2**53 + 3), st.integers(-(2**53) - 3, -(2**53)),
                    st.integers(1_700_000_000_000_000_000, 1_700_000_000_000_000_300), st.integers(2**63 - 3, 2**63 + 3),
                    st.integers(-(2**63) - 2, -(2**63) + 2))
IN_INT64 = range(-2**63, 2**63)


@FUZZ
@given(rows=st.lists(st.tuples(SAFE_ID, SAFE_ID, st.integers(-10**11 + 1, 10**11 - 1)), min_size=1, max_size=6),
       delimiter=st.sampled_from(DELIMITERS), eol=st.sampled_from(["\n", "\r\n"]))
def test_utf8_bom_reads_like_no_bom_and_utf16_32_refused_fuzz(rows, delimiter, eol):
    """The same CSV/TSV with and without a UTF-8 BOM reads to the same tables; as UTF-16 or
    UTF-32 (with or without a mark) it is refused naming the file and the remedy."""
    items = sorted({r[1] for r in rows})
    inter_text = eol.join(delimiter.join(map(str, r)) for r in [INTER_HEADER, *rows]) + eol
    item_text = eol.join(delimiter.join(r) for r in [ITEM_HEADER, *[[i, f"T {i}"] for i in items]]) + eol
    results = []
    for encoding in ("utf-8", "utf-8-sig"):
        with files(**{"i.csv": inter_text.encode(encoding), "c.csv": item_text.encode(encoding)}) as p:
            results.append(readers.read_csv_files(p["i.csv"], p["c.csv"], delimiter=delimiter))
    assert results[0][0].equals(results[1][0]) and results[0][1].equals(results[1][1])
    assert results[0][0].column("timestamp").to_pylist() == [r[2] for r in rows]
    for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"):
        with files(**{"i.csv": inter_text.encode(encoding), "c.csv": item_text.encode()}) as p:
            with pytest.raises(DataError, match=r"i\.csv: .*(UTF-16|UTF-32).*re-encode it as UTF-8"):
                readers.read_csv_files(p["i.csv"], p["c.csv"], delimiter=delimiter)


@FUZZ
@given(values=st.one_of(st.lists(BIG_INT, min_size=1, max_size=5),
                        st.lists(st.integers(-2**53, 2**53), min_size=1, max_size=5)),
       kind=st.sampled_from(["csv", "string", "int64", "uint64", "decimal", "float64", "float32"]))
def test_integer_timestamps_near_and_past_2_53_fuzz(values, kind):
    """Whatever the column kind, a timestamp is read exactly or its row is refused: never rounded.
    Text, ints and decimals hold any int64 exactly; floats only up to 2^53 (float32: 2^24), past
    which the value may already be a rounding of another and is refused. Values whose magnitudes
    imply two units (`readers.UNIT_BANDS`) are refused too (data.timestamp_unit auto)."""
    n = len(values)
    if kind == "csv":
        text = "user_id,item_id,timestamp\n" + "".join(f"u,i{k},{v}\n" for k, v in enumerate(values))
        contents = {"i.csv": text.encode(), "c.csv": good_csv(ITEM_HEADER, [[f"i{k}", f"T{k}"] for k in range(n)])}
        expected = values if all(v in IN_INT64 for v in values) else None
    else:
        if kind in ("int64", "uint64"):
            lo = 0 if kind == "uint64" else -2**63
            values = [min(max(v, lo), 2**63 - 1 if kind == "int64" else 2**64 - 1) for v in values]
        typ = {"string": pa.string(), "int64": pa.int64(), "uint64": pa.uint64(), "decimal": pa.decimal128(38, 0),
               "float64": pa.float64(), "float32": pa.float32()}[kind]
        cells = ([str(v) for v in values] if kind == "string" else [Decimal(v) for v in values] if kind == "decimal"
                 else [float(v) for v in values] if kind.startswith("float") else values)
        column = pa.array(cells, typ)
        exact = column.to_pylist()
        if kind.startswith("float"):
            limit = 2**53 if kind == "float64" else 2**24
            expected = [int(v) for v in exact] if all(abs(v) <= limit for v in exact) else None
        else:
            expected = [int(v) for v in exact] if all(int(v) in IN_INT64 for v in exact) else None
        table = pa.table({"user_id": ["u"] * n, "item_id": [f"i{k}" for k in range(n)], "timestamp": column})
        contents = {"i.parquet": parquet_bytes(table),
                    "c.parquet": parquet_bytes(pa.table({"item_id": [f"i{k}" for k in range(n)],
                                                         "title": [f"T{k}" for k in range(n)]}))}
    bands = {next(u for bound, u in readers.UNIT_BANDS if abs(v) < bound) for v in expected or []}
    with files(**contents) as p:
        names = sorted(p)
        read = readers.read_csv_files if kind == "csv" else readers.read_parquet_files
        c_path, i_path = p[names[0]], p[names[1]]
        if len(bands) > 1:
            with pytest.raises(DataError, match=r"row \d+, column 'timestamp': timestamp .* reads as .*timestamp_unit"):
                read(i_path, c_path)
            event(f"{kind}: units mixed")
        elif expected is None:
            with pytest.raises(DataError, match=r"row \d+, column 'timestamp': expected an integer timestamp"):
                read(i_path, c_path)
            event(f"{kind}: refused")
        else:
            inter, _ = read(i_path, c_path)
            assert inter.column("timestamp").to_pylist() == expected
            event(f"{kind}: exact")


def _windows(seq: list[str], cfg: DataConfig, split: str) -> int:
    """Reference count of a user's samples (the rule of `user_rows`, written again plainly)."""
    n = sum(1 for t in range(cfg.min_history, len(seq)) if seq[t] not in seq[max(0, t - cfg.max_history):t])
    keep = cfg.max_train_windows_per_user if split == "train" else cfg.eval_windows_per_user
    return min(n, keep) if keep else n


@FUZZ
@given(events=st.lists(st.lists(st.sampled_from("abcdefgh"), max_size=7), min_size=1, max_size=4),
       min_history=st.integers(1, 4), extra_history=st.integers(0, 2), num_candidates=st.integers(2, 4),
       catalog_size=st.integers(3, 12), train_keep=st.integers(0, 2), eval_keep=st.integers(0, 2))
def test_degenerate_sample_sizes_fuzz(events, min_history, extra_history, num_candidates, catalog_size,
                                      train_keep, eval_keep):
    """Tiny logs: users with no, few or repeated events, a catalog barely large enough, window
    limits. Either `load_source` refuses for the right reason (no events, too few titles, no
    user with min_history + 1 events), or every user gives exactly the windows of the rule and
    the users without any are the ones `build_samples` counts as dropped. No Ray: the Ray task's
    function is called directly."""
    from rosepo.data.samples import assign_splits, load_source, user_blocks, write_user_windows

    items = "abcdefghijkl"[:catalog_size]
    rows = [(f"u{u}", item, t) for u, seq in enumerate(events) for t, item in enumerate(seq) if item in items]
    text = "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)
    cfg = DataConfig(format="csv", min_history=min_history, max_history=min_history + extra_history,
                     num_candidates=num_candidates, max_train_windows_per_user=train_keep,
                     eval_windows_per_user=eval_keep)
    with files(**{"i.csv": text.encode(), "c.csv": good_csv(ITEM_HEADER, [[i, f"T {i}"] for i in items])}) as p:
        cfg = DataConfig(**{**cfg.__dict__, "interactions": str(p["i.csv"]), "catalog": str(p["c.csv"])})
        result = outcome(lambda: load_source(cfg), p["i.csv"], p["c.csv"])
        per_user = {}
        for u, i, t in rows:
            per_user.setdefault(u, []).append(i)
        if result is None:
            longest = max((len(s) for s in per_user.values()), default=0)
            assert (not rows or catalog_size < cfg.max_history + num_candidates or longest < min_history + 1)
            return
        inter, catalog, _ = result
        assert rows and max(len(s) for s in per_user.values()) >= min_history + 1
        titles = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
        split_of = assign_splits(sorted(per_user), cfg.split, cfg.seed)
        out = Path(p["i.csv"]).parent / "out"
        for split in ("train", "valid", "test"):
            (out / split).mkdir(parents=True)
        got = pa.concat_tables([write_user_windows(b, out_dir=str(out), titles=titles, item_ids=sorted(titles),
                                                   split_of=split_of, cfg=cfg) for b in user_blocks(inter, 2)])
        counts = dict(zip(got.column("user_id").to_pylist(), got.column("samples").to_pylist()))
        expected = {u: _windows(s, cfg, split_of[u]) for u, s in per_user.items()}
        assert counts == {u: n for u, n in expected.items() if n}
        event("no samples: build_samples refuses" if not counts else "samples")


DATA_KEYS = ["data.max_history", "data.min_history", "data.num_candidates", "data.max_train_windows_per_user",
             "data.eval_windows_per_user", "data.num_partitions", "data.seed", "data.format", "data.delimiter",
             "data.split", "data.columns", "data.llara"]
DATA_VALUES = st.one_of(st.integers(-3, 25).map(str), st.sampled_from(
    ["-1", "0", "1e3", "2.5", "''", "'\\t'", "'::'", "xlsx", "csv", "llara-json", "[0.8, 0.1, 0.1]", "[1, 0]",
     "{user_id: uid}", "{user: uid}", "{train: t.json}", "{tst: t.json}", "null", "true", str(2**63)]))


@FUZZ
@given(items=st.dictionaries(st.sampled_from(DATA_KEYS), DATA_VALUES, max_size=4))
def test_data_config_values_fuzz(items):
    """Random values of the data keys: a ConfigError naming a data key, or a config whose
    sample builder can rely on its ranges (nothing negative, history bounds ordered)."""
    from rosepo.config import load_config
    from rosepo.errors import ConfigError

    overrides = [f"{k}={v}" for k, v in items.items()]
    if items.get("data.format") in ("csv",):
        overrides += ["data.interactions=i.csv", "data.catalog=c.csv"]
    try:
        cfg = load_config(None, overrides).data
    except ConfigError as e:
        assert "'data." in str(e), str(e)
        event("ConfigError")
        return
    event("valid")
    assert 1 <= cfg.min_history <= cfg.max_history and cfg.num_candidates >= 2 and cfg.num_partitions >= 1
    assert cfg.max_train_windows_per_user >= 0 and cfg.eval_windows_per_user >= 0 and 0 <= cfg.seed < 2**63
    assert len(cfg.delimiter) == 1 and cfg.format in ("movielens-100k", "csv")
