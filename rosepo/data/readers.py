"""Readers of interaction logs and catalogs into the canonical Arrow schema (`rosepo.schema`).

Formats: Parquet; CSV/TSV with a column mapping; RecBole atomic files (``.inter``/``.item``);
GroupLens ML-100K raw files (``u.data``/``u.item``, latin-1); and the prepared LLaRA / S-DPO
JSON (samples, see `read_llara_json`). Every malformed input raises `DataError` naming the
file, the 1-based data row and the column. Arrow compute does the checks on the fast path;
only on failure do we walk the column in Python to find the first bad row.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rosepo.data.titles import Listings, check_distinct, movielens_listings, normalize_title, title_key, title_year
from rosepo.errors import DataError
from rosepo.schema import CATALOG, HISTORY_SEP, INTERACTIONS

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
CATALOG_COLUMNS = ("item_id", "title")


def _file_info(path: str | Path, filesystem=None, name: str | None = None):
    """The `pyarrow.fs.FileInfo` of a file that exists and is not a folder (else `DataError`)."""
    import pyarrow.fs as pafs

    fs, name = filesystem or pafs.LocalFileSystem(), name or str(path)
    try:
        info = fs.get_file_info(str(path))
    except OSError as e:  # an object store that refuses, a malformed path
        raise DataError(f"cannot read the file: {e}", file=name) from None
    if info.type == pafs.FileType.Directory:
        raise DataError("is a directory; expected a file", file=name)
    if info.type != pafs.FileType.File:
        raise DataError("file does not exist", file=name)
    return info


def _read_bytes(path: str | Path, filesystem=None, name: str | None = None) -> bytes:
    """The bytes of a file on ``filesystem`` (a `pyarrow.fs.FileSystem`; local when None);
    errors name it ``name`` (``path`` when None)."""
    import pyarrow.fs as pafs

    fs, name = filesystem or pafs.LocalFileSystem(), name or str(path)
    _file_info(path, fs, name)
    try:
        with fs.open_input_stream(str(path)) as f:
            data = f.read()
    except OSError as e:  # unreadable (permissions), or gone since
        raise DataError(f"cannot read the file: {e.strerror or e}", file=name) from None
    if not data.strip():
        raise DataError("file is empty", file=name)
    return data


#: Byte-order marks of the encodings other than UTF-8 that editors write; longest first (the
#: UTF-32-LE mark starts with the UTF-16-LE one).
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
               (b"\xfe\xff", "UTF-16"))


def _decode(data: bytes, path: str | Path, encoding: str, header_lines: int) -> str:
    """``data`` as text. A leading UTF-8 byte-order mark (Excel, pandas ``utf-8-sig``) is dropped
    and says the file is UTF-8 whatever ``encoding``; UTF-16/32 text is refused with the remedy."""
    if data.startswith(b"\xef\xbb\xbf"):
        data, encoding = data[3:], "utf-8"
    for bom, name in _OTHER_BOMS:
        if data.startswith(bom):
            raise DataError(f"the file is {name} text (it starts with a {name} byte-order mark); re-encode it "
                            "as UTF-8", file=str(path))
    first = data.split(b"\n", 1)[0]
    if first.count(b"\x00") * 4 >= len(first) > 0:  # every other (or fourth) byte NUL: UTF-16/32 with no mark
        raise DataError("the first line is mostly NUL bytes: the file looks like UTF-16 or UTF-32 text; "
                        "re-encode it as UTF-8", file=str(path))
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"bytes are not valid {encoding} (byte 0x{data[e.start]:02x}); re-encode the "
                        f"file as {encoding}", file=str(path), row=line - header_lines) from None


def _read_delimited(path: str | Path, delimiter: str, *, header: bool, names: list[str] | None = None,
                    encoding: str = "utf-8", filesystem=None, name: str | None = None) -> pa.Table:
    """Read a delimited text file as a table of string columns, refusing ragged rows."""
    import pyarrow.csv as pacsv

    name = name or str(path)
    if len(delimiter) != 1:
        raise DataError(f"the delimiter must be one character, got {delimiter!r} (data.delimiter)",
                        file=name)
    text = _decode(_read_bytes(path, filesystem, name), name, encoding, 1 if header else 0)
    bad: list = []

    def on_invalid(row):  # pyarrow gives the first ragged row; we stop at it
        bad.append(row)
        return "skip"

    first_line = text.split("\n", 1)[0].rstrip("\r")
    col_names = names or [c.strip() for c in first_line.split(delimiter)]
    read = pacsv.ReadOptions(column_names=col_names, skip_rows=1 if header else 0, encoding="utf-8")
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char=False if delimiter == "\t" else '"',
                               invalid_row_handler=on_invalid)
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in col_names},
                                   strings_can_be_null=False, quoted_strings_can_be_null=False)
    try:
        table = pacsv.read_csv(pa.py_buffer(text.encode("utf-8")), read, parse, convert)
    except pa.ArrowInvalid as e:
        raise DataError(f"cannot parse as {delimiter!r}-delimited text: {e}", file=name) from None
    if bad:
        row = bad[0]
        number = row.number
        if number is None:  # pyarrow knows it only when reading single-threaded: find the line
            lines = [ln.rstrip("\r") for ln in text.split("\n")]
            number = lines.index(row.text) + 1 if row.text in lines else None
        if number is not None and header:
            number -= 1
        raise DataError(f"expected {row.expected_columns} fields, found {row.actual_columns}: "
                        f"{row.text[:120]!r}", file=name, row=number)
    return table


def _first_bad(values: list, ok: Callable[[object], bool]) -> int:
    for i, v in enumerate(values):
        if not ok(v):
            return i
    return -1


#: Largest magnitude up to which a float column holds every integer exactly (2 ** (mantissa bits + 1)):
#: beyond it, distinct ids or timestamps may already have been rounded to one value.
_FLOAT_EXACT = {16: 2**11, 32: 2**24, 64: 2**53}


def _float_limit(typ: pa.DataType) -> int:
    return _FLOAT_EXACT[typ.bit_width]


def _id_column(table: pa.Table, name: str, file: str) -> pa.Array:
    """An id column as non-empty strings (ints are accepted and rendered; floats when they hold
    whole numbers within their exact range)."""
    col = table.column(name)
    if pa.types.is_floating(col.type):
        vals, limit = col.to_pylist(), _float_limit(col.type)
        i = _first_bad(vals, lambda v: v is not None and float(v).is_integer() and abs(v) <= limit)
        if i >= 0:
            raise DataError(f"expected an integer or string id, found {vals[i]!r} (a {col.type} column holds "
                            f"integers exactly only up to {limit}: store ids as integers or strings)", file=file,
                            row=i + 1, column=name)
        col = pc.cast(col, pa.int64())
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        if not pa.types.is_integer(col.type):
            raise DataError(f"expected string or integer ids, found type {col.type}", file=file, column=name)
        col = pc.cast(col, pa.string())
    col = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
    empty = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_length(col), 0))  # kleene: null OR true is true
    if pc.any(empty).as_py():
        i = pc.index(empty, True).as_py()
        raise DataError("expected a non-empty id, found an empty or missing value", file=file, row=i + 1,
                        column=name)
    return col.combine_chunks()


_INT64 = (-2**63, 2**63)
#: The one syntax of an integer in text: optionally signed decimal digits, surrounding spaces
#: aside. Not "1_000", "0x10", "1e3" or "3.0", which Python or Arrow would each read in some
#: rows but not in others.
_INTEGER_TEXT = re.compile(r"\s*[+-]?[0-9]+\s*")


def _exact_int(v) -> int | None:
    """``v`` as an exact int64, or None: ints, whole-number Decimals, and text in the one integer
    syntax (`_INTEGER_TEXT`), never through a float, so 1700000000000000001 stays itself."""
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        if not _INTEGER_TEXT.fullmatch(v):
            return None
        v = int(v)
    if isinstance(v, decimal.Decimal):
        if not v.is_finite() or v.adjusted() > 19 or v != v.to_integral_value():
            return None
        v = int(v)
    return v if isinstance(v, int) and _INT64[0] <= v < _INT64[1] else None


def _iso_seconds(v) -> int | None:
    """An ISO-8601 date or time (``2024-01-31``, ``2024-01-31T12:00:00+01:00``) as whole Unix
    seconds (sub-seconds truncated; no offset = UTC), or None."""
    if not isinstance(v, str) or "-" not in v[1:]:
        return None
    try:
        t = datetime.datetime.fromisoformat(v.strip())
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return math.floor((t - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)).total_seconds())


#: ``data.timestamp_unit`` values and how many of each make a second.
TIMESTAMP_UNITS = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
#: Under ``auto``, the unit an integer timestamp's magnitude implies: the unit in which dates from
#: 1973-03-03 (10^8 s) to the year 5138 (10^11 s) take it. |t| < 10^11: seconds (smaller values
#: too: seconds before 1973, or ordinals); < 10^14: ms; < 10^17: µs; else ns.
UNIT_BANDS = ((10**11, "s"), (10**14, "ms"), (10**17, "us"), (math.inf, "ns"))


class TimestampUnit:
    """The integer timestamps of one file, block by block, in `INTERACTIONS`' terms. With a
    declared unit (``data.timestamp_unit``: `TIMESTAMP_UNITS`) they become whole seconds
    (floored; events within one second then order by item id). With ``auto`` they are kept as
    given, and refused when their magnitudes imply two units in the file (`UNIT_BANDS`): mixed
    units would order events wrongly. Arrow timestamp and date columns and ISO-8601 text carry
    their unit and are read as seconds whatever this says."""

    def __init__(self, unit: str, file: str):
        if unit != "auto" and unit not in TIMESTAMP_UNITS:
            raise DataError(f"unknown data.timestamp_unit {unit!r}; expected auto, {', '.join(TIMESTAMP_UNITS)}")
        self.unit, self.file = unit, file
        #: (unit, 1-based row in the file, value) of the file's first integer timestamp, under auto.
        self.first: tuple | None = None

    def __call__(self, ts: pa.Array, offset: int) -> pa.Array:
        """``ts`` (int64, no nulls) of the block whose first row is the file's row ``offset + 1``."""
        values = ts.to_numpy(zero_copy_only=False)
        if self.unit != "auto":
            return pa.array(np.floor_divide(values, TIMESTAMP_UNITS[self.unit]), pa.int64())
        if not len(values):
            return ts
        bands = np.searchsorted([b for b, _ in UNIT_BANDS], np.abs(values.astype(np.float64)), side="right")
        if self.first is None:
            self.first = (UNIT_BANDS[bands[0]][1], offset + 1, int(values[0]))
        other = np.flatnonzero(bands != [u for _, u in UNIT_BANDS].index(self.first[0]))
        if len(other):
            i = int(other[0])
            unit, row, value = self.first
            raise DataError(f"timestamp {int(values[i])} reads as {UNIT_BANDS[bands[i]][1]} by its magnitude, but row "
                            f"{row}'s {value} as {unit}: one file's timestamps are in one unit; set "
                            "data.timestamp_unit (s, ms, us or ns) to the file's unit, or convert the file to one unit "
                            "(data.timestamp_unit auto reads |t| < 1e11 as s, < 1e14 as ms, < 1e17 as us, else ns)",
                            file=self.file, row=i + 1, column="timestamp")
        return ts


def _timestamp_column(table: pa.Table, name: str, file: str, unit: TimestampUnit, offset: int) -> pa.Array:
    """A timestamp column as int64, exactly: integers (in ``unit``: `TimestampUnit`), text in the
    one integer syntax (`_INTEGER_TEXT`), whole-number decimals, floats within their exact range,
    Arrow timestamps and dates (seconds), or ISO-8601 text (seconds). One column holds numbers or
    ISO times, not both (their units differ). ``offset``: the file's rows before this table."""
    col = table.column(name)
    if pa.types.is_date(col.type):
        col = pc.cast(col, pa.timestamp("s"))
    if pa.types.is_timestamp(col.type):  # whole seconds: sub-second parts are truncated
        return pc.cast(pc.cast(col, pa.timestamp("s"), safe=False), pa.int64()).combine_chunks()
    fast = pa.types.is_integer(col.type) or (
        pa.types.is_string(col.type) and pc.all(pc.match_substring_regex(col, r"^-?[0-9]+$"), min_count=0).as_py())
    if fast and col.null_count == 0:
        try:  # the usual case, exact: Arrow refuses what is out of range
            return unit(pc.cast(col, pa.int64()).combine_chunks(), offset)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # the walk below names the row
            pass
    vals = col.to_pylist()
    if pa.types.is_floating(col.type):
        limit = _float_limit(col.type)
        for i, v in enumerate(vals):
            if v is not None and math.isfinite(v) and v.is_integer() and abs(v) > limit:
                raise DataError(f"expected an integer timestamp, found {v!r} (a {col.type} column holds integers "
                                f"exactly only up to {limit}: store timestamps as int64)", file=file, row=i + 1,
                                column=name)
        out = [int(v) if v is not None and math.isfinite(v) and v.is_integer() else None for v in vals]
    else:
        out = [_exact_int(v) for v in vals]
    iso = [_iso_seconds(v) if o is None else None for v, o in zip(vals, out)]
    numbers, times = sum(o is not None for o in out), sum(t is not None for t in iso)
    if numbers and times:  # the first row's kind decides; name the first row of the other kind
        kind = out if out[0] is not None else iso
        i = _first_bad(kind, lambda v: v is not None)
        raise DataError(f"expected {'an integer timestamp' if kind is out else 'an ISO-8601 time'} like row 1, "
                        f"found {vals[i]!r}; one column cannot mix numbers and ISO-8601 times", file=file,
                        row=i + 1, column=name)
    if times:
        out = iso
    i = _first_bad(out, lambda v: v is not None)
    if i >= 0:
        raise DataError(f"expected an integer timestamp or an ISO-8601 time, found {vals[i]!r} (an integer is "
                        "optionally signed decimal digits)", file=file, row=i + 1, column=name)
    return pa.array(out, pa.int64()) if times else unit(pa.array(out, pa.int64()), offset)


def _mapped(table: pa.Table, mapping: dict, canonical: tuple, file: str) -> pa.Table:
    """Rename the file's columns to canonical names; refuse missing ones. A name's leading
    byte-order mark (a table read from a ``utf-8-sig`` CSV without stripping it) is ignored."""
    table = table.rename_columns([c.removeprefix("\ufeff") for c in table.column_names])
    rename = {mapping.get(c, c): c for c in canonical}
    if len(rename) < len(canonical):
        raise DataError(f"data.columns maps two of {', '.join(canonical)} to the same file column: "
                        f"{ {c: mapping.get(c, c) for c in canonical} }", file=file)
    twice = [src for src in rename if table.column_names.count(src) > 1]
    if twice:
        raise DataError(f"column {twice[0]!r} appears more than once in the file", file=file)
    missing = [src for src, dst in rename.items() if src not in table.column_names]
    if missing:
        raise DataError(f"missing column(s) {', '.join(repr(m) for m in missing)}; the file has "
                        f"{', '.join(repr(c) for c in table.column_names)}; map them with data.columns "
                        f"(canonical name -> file column)", file=file)
    return pa.table({dst: table.column(src) for src, dst in rename.items()})


def canonical_interactions(table: pa.Table, file: str, mapping: dict | None = None,
                           unit: TimestampUnit | None = None, offset: int = 0) -> pa.Table:
    """Map, type-check and convert a raw table to `INTERACTIONS`; ``unit`` reads its integer
    timestamps (``auto`` when None), ``offset`` is the file's rows before this table."""
    t = _mapped(table, mapping or {}, INTERACTION_COLUMNS, file)
    return pa.Table.from_arrays([_id_column(t, "user_id", file), _id_column(t, "item_id", file),
                                 _timestamp_column(t, "timestamp", file, unit or TimestampUnit("auto", file), offset)],
                                schema=INTERACTIONS)


#: What a refusal of two titles that are one (`rosepo.data.titles.check_distinct`) tells to do.
TITLES_REMEDY = ("give each item a title of its own (e.g. add the year: \"Cape Fear (1962)\"), or list an item "
                 "once and use one id for it in the interactions")


def canonical_catalog(table: pa.Table, file: str, mapping: dict | None = None, normalize: bool = True,
                      years: list[str] | None = None) -> tuple[pa.Table, Listings]:
    """Map, type-check and convert a raw table to `CATALOG`: titles normalised (``normalize``:
    `normalize_title`, else runs of whitespace collapsed), unique ids, and titles distinct under
    `title_key`. With ``years`` (MovieLens: each row's release year) colliding titles are made
    distinct by `movielens_listings` (films listed twice merged, namesakes dated); without,
    two items of one title are refused naming both ids and rows. Returns the catalog and the
    `Listings` (empty without ``years``)."""
    t = _mapped(table, mapping or {}, CATALOG_COLUMNS, file)
    ids = _id_column(t, "item_id", file)
    if not (pa.types.is_string(t.column("title").type) or pa.types.is_large_string(t.column("title").type)):
        raise DataError(f"expected string titles, found type {t.column('title').type}", file=file, column="title")
    titles = t.column("title").to_pylist()
    out = []
    for i, title in enumerate(titles):
        if not isinstance(title, str) or not title.strip():
            raise DataError("expected a non-empty title", file=file, row=i + 1, column="title")
        title = normalize_title(title) if normalize else " ".join(title.split())
        if not title:
            raise DataError(f"expected a non-empty title, found {titles[i]!r} (empty once normalised)",
                            file=file, row=i + 1, column="title")
        if HISTORY_SEP in title:
            raise DataError(f"title {title!r} contains the history separator {HISTORY_SEP!r}", file=file,
                            row=i + 1, column="title")
        out.append(title)
    counts = pc.value_counts(ids)
    dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(dup):
        item = dup[0]["values"].as_py()
        row = ids.to_pylist().index(item)
        dup_row = ids.to_pylist().index(item, row + 1)
        raise DataError(f"item id {item!r} appears twice (first at row {row + 1})", file=file,
                        row=dup_row + 1, column="item_id")
    ids, listings = ids.to_pylist(), Listings()
    if years is not None:
        kept, listings = movielens_listings(ids, out, years)
        ids, out = list(kept), list(kept.values())
    check_distinct(((item, title, file, i + 1) for i, (item, title) in enumerate(zip(ids, out))), TITLES_REMEDY)
    return pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(out, pa.string())], schema=CATALOG), listings


#: Formats of interaction and catalog files (`interaction_blocks`, `read_catalog`).
FILE_FORMATS = ("recbole", "ml100k-raw", "csv", "parquet")
#: Most rows in one table that `interaction_blocks` yields.
BLOCK_ROWS = 100_000
_ML100K_DATA = ["user_id", "item_id", "rating", "timestamp"]
_ML100K_ITEM = ["item_id", "title", "release", "video_release", "url"] + [f"g{i}" for i in range(19)]
#: What pyarrow raises on a file that is not Parquet, or whose pages or strings are corrupt.
_PARQUET_ERRORS = (pa.ArrowException, OSError, UnicodeDecodeError)


def _recbole_names(table: pa.Table) -> pa.Table:
    """RecBole headers are ``name:type`` (``user_id:token``): keep the names."""
    return table.rename_columns([c.split(":")[0] for c in table.column_names])


def _parquet_tables(path: str | Path, filesystem, name: str, batch_rows: int):
    """A Parquet file as raw tables: first its schema (no rows), then its rows in batches of at most
    ``batch_rows``, each checked readable (strings must be UTF-8); read as it is consumed."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs = filesystem or pafs.LocalFileSystem()
    if _file_info(path, fs, name).size == 0:
        raise DataError("file is empty", file=name)
    try:
        pf = pq.ParquetFile(fs.open_input_file(str(path)))
        yield pf.schema_arrow.empty_table()  # decoded lazily: a corrupted footer fails here
        for batch in pf.iter_batches(batch_size=batch_rows):
            table = pa.Table.from_batches([batch])
            table.validate(full=True)
            yield table
    except _PARQUET_ERRORS as e:
        raise DataError(f"not a readable Parquet file: {e}", file=name) from None


def _shifted(e: DataError, offset: int) -> DataError:
    """``e`` with its row counted from the file's first row instead of its block's."""
    return DataError(e.reason, file=e.file, row=None if e.row is None else e.row + offset, column=e.column,
                     line=e.line)


def interaction_blocks(fmt: str, path: str | Path, *, filesystem=None, name: str | None = None,
                       delimiter: str = ",", columns: dict | None = None, timestamp_unit: str = "auto",
                       block_rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
    """One interaction file of format ``fmt`` (`FILE_FORMATS`) as `INTERACTIONS` tables of at most
    ``block_rows`` rows, in file order; ``filesystem`` a `pyarrow.fs.FileSystem` (local when None),
    ``name`` the file in errors, whose rows count from the file's first data row; integer
    timestamps read in ``timestamp_unit`` (`TimestampUnit`: under ``auto``, one unit per file).

    Parquet streams batch by batch (memory bounded by a block, whatever the file's size; the columns
    and their types are checked before any row is read). Text is read and checked whole (a
    ragged row or a byte that does not decode is found only by reading the text): shard large
    text logs into several files.
    """
    name = name or str(path)
    unit = TimestampUnit(timestamp_unit, name)
    if fmt == "parquet":
        tables = _parquet_tables(path, filesystem, name, block_rows)
        canonical_interactions(next(tables), name, columns, unit)
        offset = 0
        for table in tables:
            try:
                block = canonical_interactions(table, name, columns, unit, offset)
            except DataError as e:
                raise _shifted(e, offset) from None
            offset += len(table)
            yield block
        return
    where = {"filesystem": filesystem, "name": name}
    if fmt == "recbole":
        raw = _recbole_names(_read_delimited(path, "\t", header=True, **where))
    elif fmt == "ml100k-raw":
        raw = _read_delimited(path, "\t", header=False, names=_ML100K_DATA, **where)
    elif fmt == "csv":
        raw = _read_delimited(path, delimiter, header=True, **where)
    else:
        raise DataError(f"unknown interaction file format {fmt!r}; expected one of {', '.join(FILE_FORMATS)}")
    table = canonical_interactions(raw, name, columns, unit)
    for batch in table.to_batches(max_chunksize=block_rows):
        yield pa.Table.from_batches([batch], schema=INTERACTIONS)


def read_catalog(fmt: str, path: str | Path, *, filesystem=None, name: str | None = None, delimiter: str = ",",
                 columns: dict | None = None, movielens: bool = False) -> tuple[pa.Table, Listings]:
    """A catalog file of format ``fmt`` (`FILE_FORMATS`) as `CATALOG` and its `Listings`; RecBole
    and ML-100K titles normalised (``"Usual Suspects, The (1995)"`` -> ``"The Usual Suspects"``),
    the others kept. Titles that are one under `title_key` are refused, except in MovieLens:
    ``ml100k-raw``, and ``recbole`` with ``movielens`` (the fetched ``movielens-100k``), whose
    titles are made distinct by their years (`movielens_listings`)."""
    name = name or str(path)
    where = {"filesystem": filesystem, "name": name}
    if fmt == "recbole":
        items = _recbole_names(_read_delimited(path, "\t", header=True, **where))
        title_col = "movie_title" if "movie_title" in items.column_names else "title"
        years = None
        if movielens:
            years = (items.column("release_year").to_pylist() if "release_year" in items.column_names
                     else [title_year(t) for t in items.column(title_col).to_pylist()])
        return canonical_catalog(items, name, {"title": title_col}, years=years)
    if fmt == "ml100k-raw":
        items = _read_delimited(path, "|", header=False, names=_ML100K_ITEM, encoding="latin-1", **where)
        return canonical_catalog(items, name, years=[title_year(t) for t in items.column("title").to_pylist()])
    if fmt == "csv":
        return canonical_catalog(_read_delimited(path, delimiter, header=True, **where), name, columns,
                                 normalize=False)
    if fmt == "parquet":
        table = pa.concat_tables(list(_parquet_tables(path, filesystem, name, BLOCK_ROWS)))
        return canonical_catalog(table, name, columns, normalize=False)
    raise DataError(f"unknown catalog file format {fmt!r}; expected one of {', '.join(FILE_FORMATS)}")


def _read_pair(fmt: str, inter_path, item_path, movielens: bool = False, **kw) -> tuple[pa.Table, pa.Table]:
    inter = pa.concat_tables([INTERACTIONS.empty_table(), *interaction_blocks(fmt, inter_path, **kw)])
    catalog, listings = read_catalog(fmt, item_path, movielens=movielens, **kw)
    inter = inter.append_column("_row", pa.array(np.arange(len(inter), dtype=np.int64)))
    return merge_listings(inter, listings.merged, "_row")[0].drop_columns(["_row"]), catalog


def read_recbole(inter_path: str | Path, item_path: str | Path, *,
                 movielens: bool = False) -> tuple[pa.Table, pa.Table]:
    """RecBole atomic files: TSV with ``name:type`` headers (``user_id:token`` ...); ``movielens``:
    ML-100K's, whose films listed twice are merged, their events remapped (`read_catalog`)."""
    return _read_pair("recbole", inter_path, item_path, movielens)


def read_ml100k_raw(data_path: str | Path, item_path: str | Path) -> tuple[pa.Table, pa.Table]:
    """GroupLens ML-100K raw files: ``u.data`` (tab, no header) and ``u.item`` (pipe, latin-1);
    films listed twice are merged, their events remapped (`read_catalog`)."""
    return _read_pair("ml100k-raw", data_path, item_path, True)


def read_csv_files(inter_path: str | Path, item_path: str | Path, *, delimiter: str = ",",
                   columns: dict | None = None) -> tuple[pa.Table, pa.Table]:
    """CSV/TSV with a header; ``columns`` maps canonical names to the files' column names."""
    return _read_pair("csv", inter_path, item_path, delimiter=delimiter, columns=columns)


def read_parquet_files(inter_path: str | Path, item_path: str | Path, *,
                       columns: dict | None = None) -> tuple[pa.Table, pa.Table]:
    """Parquet files; ``columns`` maps canonical names to the files' column names."""
    return _read_pair("parquet", inter_path, item_path, columns=columns)


def remap_items(events: pa.Table, merged: dict[str, str]) -> pa.Table:
    """``events`` with every item id that is a key of ``merged`` replaced by its value."""
    if not merged:
        return events
    items = events.column("item_id")
    to = pc.take(pa.array(list(merged.values()), pa.string()),
                 pc.index_in(items, value_set=pa.array(list(merged), pa.string())))
    return events.set_column(events.schema.get_field_index("item_id"), "item_id", pc.coalesce(to, items))


def merge_listings(events: pa.Table, merged: dict[str, str], order: str) -> tuple[pa.Table, int]:
    """``events`` on the films listed more than once (``merged``: id -> the film's id,
    `movielens_listings`) under the film's id (`remap_items`). Of one user's events on such a film
    under several of its ids, only those under the id the user met first (earliest timestamp,
    then ``order``, a column of distinct integers) are kept: the user rated one film, not two.
    Returns the events and how many were dropped."""
    if not merged:
        return events, 0
    remapped = remap_items(events, merged)
    on_film = pc.is_in(remapped.column("item_id"), value_set=pa.array(sorted(set(merged.values())), pa.string()))
    sub = pa.table({"user": events.column("user_id"), "film": remapped.column("item_id"),
                    "item": events.column("item_id"), "t": events.column("timestamp"), "order": events.column(order)})
    sub = sub.filter(on_film).sort_by([("user", "ascending"), ("film", "ascending"), ("t", "ascending"),
                                       ("order", "ascending")])
    first: dict[tuple, str] = {}
    drop = [o for u, f, i, o in zip(*(sub.column(c).to_pylist() for c in ("user", "film", "item", "order")))
            if first.setdefault((u, f), i) != i]
    if not drop:
        return remapped, 0
    return remapped.filter(pc.invert(pc.is_in(events.column(order), value_set=pa.array(drop, pa.int64())))), len(drop)


def check_known(events: pa.Table, known: pa.Array, file: str, offset: int = 0) -> None:
    """Refuse the first event whose item is not in ``known`` (the catalog's ids), naming its row:
    ``offset`` + its index in ``events`` + 1."""
    ok = pc.is_in(events.column("item_id"), value_set=known)
    if not pc.all(ok, min_count=0).as_py():  # min_count=0: True, not null, for no events
        i = pc.index(ok, False).as_py()
        raise DataError(f"item {events.column('item_id')[i].as_py()!r} is not in the catalog; fix the "
                        "data or set data.drop_unknown_items=true", file=file, row=offset + i + 1, column="item_id")


def drop_unknown(events: pa.Table, known: pa.Array) -> tuple[pa.Table, int]:
    """``events`` whose item is in ``known``, and how many were not."""
    ok = pc.is_in(events.column("item_id"), value_set=known)
    kept = events.filter(ok)
    return kept, len(events) - len(kept)


def drop_repeats(events: pa.Table, order: str) -> tuple[pa.Table, int | None, int]:
    """``events`` without repeats of one (user, item, timestamp): of each, the event first in input
    order (``order``: a column of distinct integers) is kept, in place. Also returns the index in
    ``events`` of the earliest repeat (None when there is none) and the number dropped."""
    firsts = events.group_by(["user_id", "item_id", "timestamp"], use_threads=False).aggregate([(order, "min")])
    if len(firsts) == len(events):
        return events, None, 0
    keep = pc.is_in(events.column(order), value_set=firsts.column(f"{order}_min"))
    earliest = pc.min(pc.filter(events.column(order), pc.invert(keep)))
    return events.filter(keep), pc.index(events.column(order), earliest).as_py(), len(events) - len(firsts)


def duplicate_error(event: dict, file: str, row: int) -> DataError:
    """The refusal of a repeated (user, item, timestamp) event."""
    return DataError(f"duplicate event user {event['user_id']!r} item {event['item_id']!r} at {event['timestamp']}; "
                     "fix the data or set data.drop_duplicates=true", file=file, row=row)


def check_consistency(inter: pa.Table, catalog: pa.Table, file: str, *, drop_duplicates: bool,
                      drop_unknown_items: bool) -> tuple[pa.Table, dict]:
    """Refuse (or, when the policy flag is on, drop and count) duplicate events and unknown items,
    of one table in this process (`rosepo.data.samples` does the same per partition, on Ray)."""
    stats = {"duplicates_dropped": 0, "unknown_items_dropped": 0}
    known = catalog.column("item_id")
    inter = inter.append_column("_row", pa.array(np.arange(len(inter), dtype=np.int64)))
    if drop_unknown_items:
        inter, stats["unknown_items_dropped"] = drop_unknown(inter, known)
    else:
        check_known(inter, known, file)
    kept, first, stats["duplicates_dropped"] = drop_repeats(inter, "_row")
    if first is not None and not drop_duplicates:
        event = inter.slice(first, 1).to_pylist()[0]
        raise duplicate_error(event, file, event["_row"] + 1)
    return kept.drop_columns(["_row"]), stats


#: What a refusal of two spellings of one title in LLaRA JSON tells to do.
LLARA_REMEDY = "spell each title one way in every sample and file (LLaRA JSON names items by their titles)"


def read_llara_json(path: str | Path, split: str = "train", num_candidates: int = 2) -> list[dict]:
    """The prepared LLaRA / S-DPO JSON: ``[{historyList, itemList, trueSelection}, ...]``.

    These are samples already; item ids are the titles themselves (the format has no ids), so
    one title is spelled one way in the file (`rosepo.data.titles.check_distinct`).
    Returns rows with the `rosepo.schema.SAMPLES` fields except ``prompt``/``template_id``.
    A sample with fewer than ``num_candidates`` candidates (``data.num_candidates``; never fewer
    than 2) is refused with its 1-based index as the row: rejected sampling needs wrong candidates.
    """
    text = _decode(_read_bytes(path), path, "utf-8", 0)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg} (column {e.colno})", file=str(path), line=e.lineno) from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read", file=str(path)) from None
    if not isinstance(data, list):
        raise DataError("expected a JSON list of samples", file=str(path))
    rows = []
    for i, rec in enumerate(data):
        where = {"file": str(path), "row": i + 1}
        if not isinstance(rec, dict):
            raise DataError("expected an object with historyList, itemList, trueSelection", **where)
        for key, typ in (("historyList", str), ("itemList", list), ("trueSelection", str)):
            if not isinstance(rec.get(key), typ):
                raise DataError(f"expected {typ.__name__}, found {type(rec.get(key)).__name__}", column=key,
                                **where)
        history = [h.strip() for h in rec["historyList"].split(HISTORY_SEP)]
        candidates = rec["itemList"]
        target = rec["trueSelection"]
        if any(not h for h in history):
            raise DataError("empty title in historyList", column="historyList", **where)
        if not all(isinstance(c, str) and c.strip() for c in candidates):
            raise DataError("itemList must hold non-empty title strings", column="itemList", **where)
        if any(HISTORY_SEP in c for c in candidates):
            raise DataError(f"a candidate title contains the history separator {HISTORY_SEP!r}",
                            column="itemList", **where)
        if len({title_key(c) for c in candidates}) != len(candidates):
            raise DataError("itemList has repeated titles (case and spacing aside)", column="itemList", **where)
        if len(candidates) < max(2, num_candidates):
            raise DataError(f"the sample has {len(candidates)} candidate(s), fewer than data.num_candidates "
                            f"({num_candidates}): the target and at least {max(2, num_candidates) - 1} wrong "
                            "title(s) are needed", column="itemList", **where)
        if title_key(target) not in {title_key(c) for c in candidates}:
            raise DataError(f"trueSelection {target!r} is not in itemList", column="trueSelection", **where)
        rows.append({
            "sample_id": f"{split}:{i:07d}", "user_id": f"{split}:{i:07d}", "split": split,
            "history_item_ids": history, "history_titles": history,
            "target_item_id": target, "target_title": target,
            "candidate_item_ids": list(candidates), "candidate_titles": list(candidates),
        })
    if not rows:
        raise DataError("no samples in file", file=str(path))
    check_distinct(((t, t, str(path), i + 1) for i, r in enumerate(rows)
                    for t in r["history_titles"] + r["candidate_titles"] + [r["target_title"]]), LLARA_REMEDY)
    return rows
