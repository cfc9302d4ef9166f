"""Build recommendation samples from interaction logs, on Ray Data.

Stage graph of this module (`build_samples`):

1. driver: read and check the catalog (small), list the interaction files (one file, a folder or
   a glob of shards; local paths or URIs through `pyarrow.fs`). No interaction is read here.
2. read: one Ray Data task per file reads it (`readers.interaction_blocks`: Parquet streamed by
   batches, text whole), maps and checks its columns, refuses unknown items against a broadcast of
   the catalog's ids, and tags every event with ``_pos`` (file index, row in the file): errors
   name the file and its exact row.
3. shuffle: ``repartition(keys=["user_id"])``, Ray Data's hash shuffle, materialised in the
   object store; every partition is one block holding whole users.
4. stats: one task per partition drops (or finds) duplicate events and counts events per user;
   only the user ids and their counts come back. The driver refuses duplicates, empty input or
   too-short users, and turns the user-level split into two split-key bounds.
5. build: one task per partition sorts it by (user, time, item), cuts it at user boundaries into
   blocks of at most `MAX_BLOCK_ROWS` interactions, builds each block's sliding windows,
   candidates and prompts, writes them as Parquet shards per split and returns one small row per
   user (split, count, digest) -> ``manifest.json`` with the counts and the content hash.

Nothing but the catalog, the file list and O(users) small rows passes through the driver: its
memory does not grow with the number of interactions (the user ids do: the split ranks users).
Nothing is written outside the stage's temporary folder until every task has succeeded.

Determinism: every random choice (split, candidates, template) derives from the seed and a
stable hash of the user or sample id, never from partition, block or file order, so the output
content is the same for any parallelism and file layout; the manifest's ``content_hash`` proves it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rosepo.config import DataConfig
from rosepo.data import readers
from rosepo.data.fetch import fetch
from rosepo.data.prompts import check_domain, choose_template, render_prompt, stable_int
from rosepo.data.titles import Listings, check_distinct, title_key
from rosepo.errors import DataError
from rosepo.layout import CATALOG_FILE
from rosepo.schema import INTERACTIONS, SAMPLES
from rosepo.storage import atomic_dir, write_manifest

SPLITS = ("train", "valid", "test")
#: ``data.format`` values that read MovieLens, whose colliding titles `titles.movielens_listings`
#: makes distinct (other catalogs' are refused).
MOVIELENS_FORMATS = ("movielens-100k", "ml100k-raw")
#: Most interactions one Ray task turns into samples at a time (about 0.8 samples each, ~2.5 KB
#: per sample as Python objects): bounds a worker's memory whatever the input size.
MAX_BLOCK_ROWS = 100_000
#: What the build returns of each user with samples (`write_user_windows`).
PER_USER = pa.schema([("user_id", pa.string()), ("split", pa.string()), ("samples", pa.int64()),
                      ("digest", pa.binary())])
#: Input bytes per shuffle partition (at least ``data.num_partitions`` partitions): a partition of
#: ML-100K-shaped Parquet is then about 1.5M interactions, ~60 MB in a worker.
PARTITION_BYTES = 8 * 2**20
#: ``_pos`` = file index << FILE_SHIFT | row index in the file: input order, and where an event came from.
FILE_SHIFT = 40
#: Folder of the stage's temporary folder where read tasks leave the errors of refused files.
REFUSED = ".refused"


@dataclasses.dataclass(frozen=True)
class Source:
    """The interaction files of an input, listed but not read; shipped to every read task."""

    #: Reader format of the files (`readers.FILE_FORMATS`).
    fmt: str
    #: The input as configured (a file, folder, glob or URI): named by errors about the whole input.
    name: str
    #: Each file as errors name it, and its path on ``filesystem``, in input order.
    files: tuple
    paths: tuple
    filesystem: object
    #: Bytes of all files (sizes the shuffle).
    size: int
    delimiter: str = ","
    columns: dict = dataclasses.field(default_factory=dict)
    #: ``data.timestamp_unit`` (`readers.TimestampUnit`).
    timestamp_unit: str = "auto"
    #: What the catalog's reader merged and dated (MovieLens' films listed twice, `titles.movielens_listings`).
    listings: Listings = Listings()

    def events(self, i: int, known: pa.Array | None) -> Iterator[pa.Table]:
        """The events of file ``i`` in blocks with ``_pos``; unknown items refused when ``known``
        (the catalog's ids) is given. Ids of a film listed twice stay as read (`clean_events` merges them)."""
        offset = 0
        for block in readers.interaction_blocks(self.fmt, self.paths[i], filesystem=self.filesystem,
                                                name=self.files[i], delimiter=self.delimiter, columns=self.columns,
                                                timestamp_unit=self.timestamp_unit):
            if known is not None:
                readers.check_known(readers.remap_items(block, self.listings.merged), known, self.files[i], offset)
            pos = np.arange(offset, offset + len(block), dtype=np.int64) + (i << FILE_SHIFT)
            yield block.append_column("_pos", pa.array(pos))
            offset += len(block)

    def where(self, pos: int) -> dict:
        """``file`` and 1-based ``row`` of the event at ``_pos`` ``pos``."""
        return {"file": self.files[pos >> FILE_SHIFT], "row": (pos & ((1 << FILE_SHIFT) - 1)) + 1}


def _filesystem(spec: str):
    """``(pyarrow filesystem, path on it, prefix)`` of a local path or a URI (``s3://``, ``gs://``,
    ``file://``, ...); ``prefix + path`` names a file of it in errors."""
    import pyarrow.fs as pafs

    if "://" not in spec:
        return pafs.LocalFileSystem(), spec, ""
    try:
        fs, path = pafs.FileSystem.from_uri(spec)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"cannot open the file system of this URI: {e}", file=spec) from None
    return fs, path, spec[: spec.index("://") + 3]


def list_files(spec: str, filesystem=None) -> tuple[object, list[str], list[str], int]:
    """The files of an input: one file, a folder (every file under it, in path order, skipping
    names that start with ``.`` or ``_`` such as ``_SUCCESS``) or a glob (``*``, ``?``, ``[...]``
    in the path). ``spec`` is a local path or a URI, or a path on ``filesystem`` when given.
    Returns ``(filesystem, paths, names in errors, total bytes)``; a single file keeps ``spec``
    as its name."""
    import pyarrow.fs as pafs

    fs, path, prefix = (filesystem, spec, "") if filesystem is not None else _filesystem(spec)
    star = next((i for i, ch in enumerate(path) if ch in "*?["), None)
    if star is None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return fs, [path], [spec], info.size
        if info.type != pafs.FileType.Directory:
            raise DataError("file does not exist", file=spec)
        base = path.rstrip("/")
    else:
        base = (path[:star].rsplit("/", 1)[0] or "/") if "/" in path[:star] else "."
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    found = sorted((f for f in found if f.type == pafs.FileType.File
                    and not any(part[:1] in "._" for part in f.path[len(base):].split("/") if part)
                    and (star is None or fnmatch.fnmatchcase(f.path, path))), key=lambda f: f.path)
    if not found:
        raise DataError("no file matches this pattern" if star is not None else "the folder holds no file",
                        file=spec)
    return fs, [f.path for f in found], [prefix + f.path for f in found], sum(f.size for f in found)


def open_source(cfg: DataConfig) -> tuple[Source, pa.Table, str]:
    """Read and check the catalog, list the interaction files (none is read); returns
    ``(source, catalog, catalog name)``."""
    if cfg.format == "movielens-100k":
        folder = fetch("movielens-100k", cfg.data_dir)
        fmt, inter_spec, item_spec = "recbole", str(folder / "ml-100k.inter"), str(folder / "ml-100k.item")
    elif cfg.format in readers.FILE_FORMATS:
        if not cfg.interactions or not cfg.catalog:
            raise DataError(f"data.format={cfg.format} needs data.interactions and data.catalog paths")
        fmt, inter_spec, item_spec = cfg.format, cfg.interactions, cfg.catalog
    else:
        raise DataError(f"unknown data.format {cfg.format!r}; expected movielens-100k, "
                        f"{', '.join(readers.FILE_FORMATS)} or llara-json")
    columns = dict(cfg.columns) if fmt in ("csv", "parquet") else {}
    fs, paths, names, size = list_files(inter_spec)
    item_fs, item_path, _ = _filesystem(item_spec)
    catalog, listings = readers.read_catalog(fmt, item_path, filesystem=item_fs, name=item_spec,
                                             delimiter=cfg.delimiter, columns=columns,
                                             movielens=cfg.format in MOVIELENS_FORMATS)
    source = Source(fmt, inter_spec, tuple(names), tuple(paths), fs, size, cfg.delimiter, columns, cfg.timestamp_unit,
                    listings)
    return source, catalog, item_spec


def listing_counts(listings: Listings) -> dict:
    """The manifest's counts of `Listings`: ids merged into another id of their film, titles dated."""
    return {"items_merged": len(listings.merged), "titles_dated": len(listings.dated)}


def clean_events(events: pa.Table, known: pa.Array, merged: dict,
                 cfg: DataConfig) -> tuple[pa.Table, dict, dict | None]:
    """``events`` (with ``_pos``, whole users) with the ids of a film listed twice merged
    (``merged``, `readers.merge_listings`), without unknown items (``data.drop_unknown_items``) and
    repeats of one (user, item, timestamp), the first in input order kept. Returns the events,
    the counts dropped and the earliest repeat (a row with ``_pos``; None when there is none),
    which refuses the input unless ``data.drop_duplicates``."""
    events, listed = readers.merge_listings(events, merged, "_pos")
    unknown = 0
    if cfg.drop_unknown_items:
        events, unknown = readers.drop_unknown(events, known)
    kept, first, repeats = readers.drop_repeats(events, "_pos")
    repeat = None if first is None else events.slice(first, 1).to_pylist()[0]
    return kept, {"duplicates_dropped": repeats, "unknown_items_dropped": unknown, "merged_events_dropped": listed}, \
        repeat


def check_counts(name: str, events: int, users: int, longest: int, catalog: pa.Table, catalog_name: str,
                 cfg: DataConfig) -> None:
    """Refuse, with the counts, input that cannot give one sample: no events, too few distinct
    titles to draw candidates from, or no user with ``min_history + 1`` events."""
    if events == 0:
        raise DataError("no interactions to build samples from", file=name)
    need = cfg.max_history + cfg.num_candidates
    distinct = len(pc.unique(catalog.column("title")))
    if distinct < need:
        raise DataError(f"the catalog has {distinct} distinct titles but samples need at least {need} "
                        f"(data.max_history + data.num_candidates) to draw distinct candidates outside the "
                        "history", file=catalog_name)
    if longest < cfg.min_history + 1:
        raise DataError(f"no samples to build: {users} user(s) with {events} events, the longest with "
                        f"{longest}, but a sample needs data.min_history + 1 = {cfg.min_history + 1} events of one "
                        "user; lower data.min_history or add events", file=name)


def load_source(cfg: DataConfig) -> tuple[pa.Table, pa.Table, dict]:
    """Read and validate the whole input in this process: ``(interactions, catalog, stats)``.

    The single-process reference of `build_samples`' read and checks (the same per-file reader
    and checks, the same refusals), for baselines and tests; `build_samples` never gathers the
    interactions.
    """
    source, catalog, catalog_name = open_source(cfg)
    known = None if cfg.drop_unknown_items else catalog.column("item_id")
    events = pa.concat_tables([INTERACTIONS.empty_table().append_column("_pos", pa.array([], pa.int64())),
                               *(b for i in range(len(source.files)) for b in source.events(i, known))])
    if cfg.timestamp_unit == "auto":
        check_file_units([json.dumps(file_units(events))], source)
    events, stats, repeat = clean_events(events, catalog.column("item_id"), source.listings.merged, cfg)
    stats |= listing_counts(source.listings)
    if repeat is not None and not cfg.drop_duplicates:
        raise readers.duplicate_error(repeat, **source.where(repeat["_pos"]))
    counts = pc.value_counts(events.column("user_id")).field("counts")
    check_counts(source.name, len(events), len(counts), pc.max(counts).as_py() or 0, catalog, catalog_name, cfg)
    return events.drop_columns(["_pos"]), catalog, stats


def _split_key(user: str, seed: int) -> tuple:
    return stable_int("split", seed, user), user


def split_bounds(users, fractions: tuple, seed: int) -> tuple:
    """The split keys (`_split_key`) where train and valid end, over all ``users`` ordered by a
    seeded stable hash and cut by ``fractions`` (exact counts); None: no user beyond. With them,
    `user_split` gives any user's split without the list of users."""
    keys = sorted(_split_key(u, seed) for u in users)
    n_train = round(fractions[0] * len(keys))
    n_valid = round(fractions[1] * len(keys))
    return tuple(keys[i] if i < len(keys) else None for i in (n_train, n_train + n_valid))


def user_split(user: str, bounds: tuple, seed: int) -> str:
    """The split of ``user`` given `split_bounds`."""
    key = _split_key(user, seed)
    for split, bound in zip(SPLITS, bounds):
        if bound is None or key < bound:
            return split
    return SPLITS[-1]


def assign_splits(users: list[str], fractions: tuple, seed: int) -> dict[str, str]:
    """User-level split: users ordered by a seeded stable hash, cut by ``fractions`` (exact counts)."""
    bounds = split_bounds(users, fractions, seed)
    return {u: user_split(u, bounds, seed) for u in users}


def draw_candidates(sample_id: str, target: str, history: list[str], item_ids: list[str],
                    titles: dict[str, str], k: int, seed: int) -> list[str]:
    """The target plus ``k - 1`` items drawn uniformly, seeded per sample, then shuffled.

    Drawn items are distinct by title and never share a title with the target or the history
    (catalogs such as ML-100K list a few movies twice under two ids; a candidate list naming one
    title twice could not be answered unambiguously).
    """
    rng = np.random.default_rng(stable_int("candidates", seed, sample_id))
    seen = {titles[i] for i in history} | {titles[target]}
    negatives: list[str] = []
    while len(negatives) < k - 1:
        item = item_ids[int(rng.integers(len(item_ids)))]
        if titles[item] not in seen:
            seen.add(titles[item])
            negatives.append(item)
    cands = [target] + negatives
    return [cands[i] for i in rng.permutation(len(cands))]


def decoy_sample(row: dict, item_ids: list[str], titles: dict[str, str], seed: int, copy: int,
                 prompt_style: str, domain: str) -> dict:
    """A decoy of the sample ``row`` (SAMPLES fields): its candidate list with the target replaced,
    at its place, by an item drawn uniformly (seeded per sample, ``seed`` and ``copy``) whose
    title is neither a candidate's nor in the history; the prompt rendered again with the
    sample's template, ``sample_id`` + ``~copy``. The target fields keep the true target, which
    the decoy's list no longer holds: SFT trains a decoy without an answer label, by the terms
    that read the candidates only (`rosepo.train.sft`)."""
    rng = np.random.default_rng(stable_int("decoy", seed, copy, row["sample_id"]))
    seen = {titles[i] for i in row["history_item_ids"]} | set(row["candidate_titles"])
    item, tries = item_ids[int(rng.integers(len(item_ids)))], 0
    while titles[item] in seen:
        tries += 1
        # Whether any title is left is a pass over the catalog: checked once, only when draws keep failing.
        if tries == len(item_ids) and len(seen) >= len({titles[i] for i in item_ids}):
            raise DataError(f"sample {row['sample_id']}: no item outside its candidates and history to draw a "
                            f"decoy from (a catalog of {len(item_ids)} items)")
        item = item_ids[int(rng.integers(len(item_ids)))]
    cands = [item if i == row["target_item_id"] else i for i in row["candidate_item_ids"]]
    c_titles = [titles[i] for i in cands]
    return {**row, "sample_id": f"{row['sample_id']}~{copy}", "candidate_item_ids": cands,
            "candidate_titles": c_titles,
            "prompt": render_prompt(row["template_id"], list(row["history_titles"]), c_titles, prompt_style, domain)}


def window_drop(history: list, target, cfg: DataConfig) -> str | None:
    """Why the window ``(history, target)`` gives no sample, or None when it gives one: the window
    rule of both the logs (`user_rows`) and LLaRA imports (`import_llara`). ``history`` is the at
    most ``data.max_history`` items before the target; ``"too_short"``: fewer than
    ``data.min_history`` of them; ``"target_in_history"``: the target is among them. Items compare
    as given: ids of a checked catalog (one title each under `title_key`), or title keys."""
    if len(history) < cfg.min_history:
        return "too_short"
    if target in history:
        return "target_in_history"
    return None


def user_rows(user: str, seq: list[str], split: str, *, titles: dict[str, str], item_ids: list[str],
              cfg: DataConfig) -> list[tuple]:
    """The samples of one user (``seq``: item ids in time order) as tuples in `SAMPLES` column order.

    A sample's history is the at most ``max_history`` items before the target, oldest first;
    windows that `window_drop` drops give none. Train users keep all windows (or the last
    ``max_train_windows_per_user``); valid/test users keep their last ``eval_windows_per_user``.
    """
    positions = [t for t in range(cfg.min_history, len(seq))
                 if window_drop(seq[max(0, t - cfg.max_history):t], seq[t], cfg) is None]
    keep = cfg.max_train_windows_per_user if split == "train" else cfg.eval_windows_per_user
    if keep:
        positions = positions[-keep:]
    rows = []
    for t in positions:
        history, target = seq[max(0, t - cfg.max_history):t], seq[t]
        sid = f"{user}:{t:06d}"
        cands = draw_candidates(sid, target, history, item_ids, titles, cfg.num_candidates, cfg.seed)
        tid = choose_template(sid, cfg.seed, cfg.prompt_style)
        h_titles = [titles[i] for i in history]
        c_titles = [titles[i] for i in cands]
        rows.append((sid, user, split, history, h_titles, target, titles[target], cands, c_titles, tid,
                     render_prompt(tid, h_titles, c_titles, cfg.prompt_style, cfg.domain), titles[target]))
    return rows


def _user_runs(block: pa.Table):
    """``(user, item ids)`` of each user of a block sorted by user, in block order."""
    users = block.column("user_id").to_pylist()
    items = block.column("item_id").to_pylist()
    start = 0
    while start < len(users):
        end = start
        while end < len(users) and users[end] == users[start]:
            end += 1
        yield users[start], items[start:end]
        start = end


def _table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [[] for _ in SAMPLES]
    return pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(cols, SAMPLES)], schema=SAMPLES)


def build_user_windows(block: pa.Table, *, titles: dict[str, str], item_ids: list[str],
                       split_of: dict[str, str], cfg: DataConfig) -> pa.Table:
    """All samples (`user_rows`) of the users in ``block`` (rows sorted by user, time, item;
    users complete), as one table."""
    return _table([row for user, seq in _user_runs(block)
                   for row in user_rows(user, seq, split_of[user], titles=titles, item_ids=item_ids, cfg=cfg)])


def _row_json(row) -> bytes:
    """What the content hash reads of a sample: its values, in `SAMPLES` order, as JSON."""
    return json.dumps(list(row), ensure_ascii=False).encode()


def write_user_windows(block: pa.Table, *, out_dir: str, titles: dict[str, str], item_ids: list[str],
                       split_of: dict[str, str], cfg: DataConfig, shard: str = "") -> pa.Table:
    """The samples of one `user_blocks` block, written as
    ``{out_dir}/{split}/part-{shard}{block:05d}.parquet``; returns one row per user with samples:
    ``user_id``, ``split``, ``samples`` (count) and ``digest`` (sha256 of its rows, `users_digest`)."""
    import pyarrow.parquet as pq

    block_id = block.column("_block")[0].as_py()
    per_split: dict[str, list] = {s: [] for s in SPLITS}
    users: dict[str, list] = {"user_id": [], "split": [], "samples": [], "digest": []}
    for user, seq in _user_runs(block):
        split = split_of[user]
        rows = user_rows(user, seq, split, titles=titles, item_ids=item_ids, cfg=cfg)
        if not rows:
            continue
        h = hashlib.sha256()
        for row in rows:
            h.update(_row_json(row))
        per_split[split] += rows
        for key, value in (("user_id", user), ("split", split), ("samples", len(rows)), ("digest", h.digest())):
            users[key].append(value)
    for split, rows in per_split.items():
        if rows:
            pq.write_table(_table(rows), Path(out_dir) / split / f"part-{shard}{block_id:05d}.parquet")
    return pa.table(users, schema=PER_USER)


def users_digest(entries) -> str:
    """The content hash of a samples folder from ``(split, user_id, sha256 of the user's rows in
    sample_id order)`` of every user with samples: sha256 over those digests, split by split
    (train, valid, test), users in ``sample_id`` order. Independent of how rows were grouped."""
    order = {s: i for i, s in enumerate(SPLITS)}
    h = hashlib.sha256()
    for _, _, digest in sorted(entries, key=lambda e: (order[e[0]], e[1] + ":")):
        h.update(digest)
    return h.hexdigest()


def user_blocks(inter: pa.Table, num_blocks: int, max_rows: int = MAX_BLOCK_ROWS) -> list[pa.Table]:
    """Sort by (user, timestamp, item) and cut at user boundaries into blocks of about
    ``min(rows / num_blocks, max_rows)`` rows, each tagged with its index (column ``_block``).

    Users sort by ``user_id + ":"``, the order of their sample ids (``"1:..." > "10:..."``), so
    the shards of a split read in name order are in ``sample_id`` order. Ties in timestamp are
    broken by item id, so the order never depends on input row order.
    """
    key = pc.binary_join_element_wise(inter.column("user_id"), pa.scalar(":"), "")
    inter = inter.append_column("_key", key).sort_by(
        [("_key", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending")]).drop_columns(["_key"])
    users = inter.column("user_id")
    n = len(inter)
    # first row of each user: where user_id differs from the previous row
    change = pc.not_equal(users.slice(1), users.slice(0, n - 1)) if n > 1 else pa.array([], pa.bool_())
    starts = np.flatnonzero(np.asarray(change.to_numpy(zero_copy_only=False))) + 1
    target = max(1, min(max_rows, math.ceil(n / max(1, num_blocks))))
    cuts, last = [0], 0
    for s in starts.tolist():
        if s - last >= target:
            cuts.append(s)
            last = s
    cuts.append(n)
    return [inter.slice(a, b - a).append_column("_block", pa.array(np.full(b - a, i, np.int32)))
            for i, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a]


def read_events(files: pa.Table, *, source: Source, known: pa.Array | None, refused: str) -> Iterator[pa.Table]:
    """Ray Data task: the checked events of the files whose indices are ``files["file"]``
    (`Source.events`), block by block. A refused file's `DataError` is written to
    ``{refused}/{file index}.json`` for the driver (`build_samples`), then the task fails."""
    from ray.data.exceptions import UserCodeException

    for i in files.column("file").to_pylist():
        try:
            yield from source.events(i, known)
        except DataError as e:
            Path(refused).mkdir(exist_ok=True)
            where = {"file": e.file, "row": e.row, "column": e.column, "line": e.line}
            (Path(refused) / f"{i:08d}.json").write_text(json.dumps({"message": e.reason, **where}))
            # Ray wraps a generator's errors as its own internal errors (logged with their stacks) and
            # loses a DataError's fields on the way: fail as the user-code error this is, quietly.
            raise UserCodeException(str(e)) from None


def partition_stats(part: pa.Table, *, known: pa.Array, merged: dict, cfg: DataConfig) -> pa.Table:
    """Ray Data task: of one shuffle partition (whole users), once cleaned (`clean_events`): one row
    with its users, their event counts, the counts dropped, the earliest repeat (JSON, "" for none)
    and the catalog items it holds (bits over the catalog's ids, sorted)."""
    units = file_units(part) if cfg.timestamp_unit == "auto" else {}
    part, dropped, repeat = clean_events(part, known, merged, cfg)
    per_user = pc.value_counts(part.column("user_id"))
    seen = np.zeros(len(known), bool)
    seen[pc.index_in(part.column("item_id"), value_set=known).to_numpy(zero_copy_only=False)] = True
    return pa.table({"users": [per_user.field("values")], "events": [per_user.field("counts")],
                     "duplicates": [dropped["duplicates_dropped"]], "unknown": [dropped["unknown_items_dropped"]],
                     "merged": [dropped["merged_events_dropped"]],
                     "repeat": [json.dumps(repeat) if repeat else ""], "items": [np.packbits(seen).tobytes()],
                     "units": [json.dumps(units)]},
                    schema=_STATS)


_STATS = pa.schema([("users", pa.list_(pa.string())), ("events", pa.list_(pa.int64())), ("duplicates", pa.int64()),
                    ("unknown", pa.int64()), ("merged", pa.int64()), ("repeat", pa.string()), ("items", pa.binary()),
                    ("units", pa.string())])


def file_units(events: pa.Table) -> dict[str, list]:
    """Of events with ``_pos``: per input file (its index, as a string), ``[unit, _pos, timestamp]``
    of its first event here, the unit its timestamp's magnitude implies (`readers.UNIT_BANDS`).
    Under ``data.timestamp_unit: auto`` each file is read in its own unit, one per file
    (`readers.TimestampUnit`); `check_file_units` refuses an input whose files disagree."""
    if not len(events):
        return {}
    pos = events.column("_pos").to_numpy()
    order = np.argsort(pos, kind="stable")
    pos, ts = pos[order], events.column("timestamp").to_numpy()[order]
    files, first = np.unique(pos >> FILE_SHIFT, return_index=True)  # pos sorted: each file's first row
    bands = np.searchsorted([b for b, _ in readers.UNIT_BANDS], np.abs(ts[first].astype(np.float64)), side="right")
    return {str(f): [readers.UNIT_BANDS[b][1], int(pos[i]), int(ts[i])]
            for f, i, b in zip(files.tolist(), first.tolist(), bands.tolist())}


def check_file_units(parts: list[str], source: Source) -> None:
    """Refuse (`DataError`) files of one input whose integer timestamps are in different units
    under ``data.timestamp_unit: auto`` (``parts``: `file_units` of each partition, as JSON):
    each file is read in its own unit, and events of two units would be ordered wrongly."""
    first: dict[int, list] = {}
    for text in parts:
        for f, (unit, pos, value) in json.loads(text or "{}").items():
            if int(f) not in first or pos < first[int(f)][1]:
                first[int(f)] = [unit, pos, value]
    units = {}
    for f in sorted(first):
        units.setdefault(first[f][0], f)
    if len(units) < 2:
        return
    (ua, fa), (ub, fb) = sorted(units.items(), key=lambda kv: kv[1])[:2]
    a, b = source.where(first[fa][1]), source.where(first[fb][1])
    raise DataError(f"timestamp {first[fb][2]} reads as {ub} by its magnitude, but {a['file']} row {a['row']}'s "
                    f"{first[fa][2]} as {ua}: the files of one input must share one unit (each is read as given "
                    "under data.timestamp_unit auto); convert them to one unit, then set data.timestamp_unit to it",
                    file=b["file"], row=b["row"], column="timestamp")


def build_partition(part: pa.Table, *, out_dir: str, titles: dict[str, str], item_ids: list[str], bounds: tuple,
                    known: pa.Array, merged: dict, clean: bool, cfg: DataConfig) -> pa.Table:
    """Ray Data task: the samples of one shuffle partition (whole users): cleaned when ``clean``
    (`clean_events`), sorted and cut by `user_blocks`, written by `write_user_windows` one block
    at a time (shards named by the partition's first user, so names never collide); returns
    the per-user rows (`PER_USER`)."""
    if clean:
        part = clean_events(part, known, merged, cfg)[0]
    blocks = user_blocks(part.drop_columns(["_pos"]), 1)
    if not blocks:
        return PER_USER.empty_table()
    shard = hashlib.sha256(blocks[0].column("user_id")[0].as_py().encode()).hexdigest()[:12] + "-"
    users = pc.unique(part.column("user_id")).to_pylist()
    splits = {u: user_split(u, bounds, cfg.seed) for u in users}
    return pa.concat_tables([write_user_windows(b, out_dir=out_dir, titles=titles, item_ids=item_ids, split_of=splits,
                                                cfg=cfg, shard=shard) for b in blocks])


def _arrow(ds) -> list[pa.Table]:
    import ray

    return [t for t in ray.get(ds.to_arrow_refs()) if len(t)]


def build_samples(cfg: DataConfig, out_dir: str | Path, *, start_ray: Callable[[], object] | None = None) -> dict:
    """Build the samples of ``cfg`` into ``out_dir`` (atomically) and return its manifest.

    ``out_dir`` gets ``train/``, ``valid/``, ``test/`` Parquet shards and ``manifest.json``. The
    catalog and the list of interaction files are checked first; ``start_ray`` (e.g.
    `rosepo.runtime.init_ray` with the run's address) is called only then: the interactions are
    read, checked and grouped on Ray Data (the module's docstring has the stages). A refused
    input raises the `DataError` of the first refused file (in input order, of those read), and
    leaves nothing behind.
    """
    t0 = time.perf_counter()
    check_domain(cfg.domain)
    if cfg.format == "llara-json":
        return import_llara(cfg, out_dir)
    source, catalog, catalog_name = open_source(cfg)
    if start_ray is not None:
        start_ray()
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
        try:
            manifest = _build(cfg, source, catalog, catalog_name, tmp)
        except Exception:
            refused = sorted((tmp / REFUSED).glob("*.json"))  # the first file of those refused
            if not refused:
                raise
            where = json.loads(refused[0].read_text())
            raise DataError(where.pop("message"), **where) from None
        manifest["seconds"] = round(time.perf_counter() - t0, 2)
        write_catalog(tmp, catalog)
        write_manifest(tmp, manifest)
    return manifest


def write_catalog(folder: Path, catalog: pa.Table) -> None:
    """The catalogue the samples were drawn from (``item_id``, ``title``; after merges and dated
    namesakes) into the samples folder: what `rosepo recommend` and an export draw candidates from,
    so a run folder needs its input no more."""
    import pyarrow.parquet as pq

    pq.write_table(catalog.select(["item_id", "title"]).sort_by("item_id"), folder / CATALOG_FILE)


def _build(cfg: DataConfig, source: Source, catalog: pa.Table, catalog_name: str, tmp: Path) -> dict:
    """The Ray part of `build_samples`: read, shuffle, stats, checks, build; returns the manifest."""
    import ray

    titles = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
    item_ids = sorted(titles)
    known = pa.array(item_ids, pa.string())
    files = ray.data.from_items([{"file": i} for i in range(len(source.files))], override_num_blocks=len(source.files))
    events = files.map_batches(read_events, batch_size=1, batch_format="pyarrow",
                               fn_kwargs={"source": source, "known": None if cfg.drop_unknown_items else known,
                                          "refused": str(tmp / REFUSED)})
    partitions = max(cfg.num_partitions, math.ceil(source.size / PARTITION_BYTES))
    parts = events.repartition(partitions, keys=["user_id"]).materialize()
    merged = source.listings.merged
    stats = _arrow(parts.map_batches(partition_stats, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
                                     fn_kwargs={"known": known, "merged": merged, "cfg": cfg}))
    stats = pa.concat_tables([_STATS.empty_table(), *stats])
    check_file_units(stats.column("units").to_pylist(), source)
    repeats = [json.loads(r) for r in stats.column("repeat").to_pylist() if r]
    if repeats and not cfg.drop_duplicates:
        first = min(repeats, key=lambda r: r["_pos"])
        raise readers.duplicate_error(first, **source.where(first["_pos"]))
    users = pc.list_flatten(stats.column("users"))
    events_per_user = pc.list_flatten(stats.column("events"))
    n_events = pc.sum(events_per_user).as_py() or 0
    check_counts(source.name, n_events, len(users), pc.max(events_per_user).as_py() or 0, catalog, catalog_name, cfg)
    policies = {"duplicates_dropped": pc.sum(stats.column("duplicates")).as_py(),
                "unknown_items_dropped": pc.sum(stats.column("unknown")).as_py(),
                "merged_events_dropped": pc.sum(stats.column("merged")).as_py(), **listing_counts(source.listings)}
    seen = np.bitwise_or.reduce([np.frombuffer(b, np.uint8) for b in stats.column("items").to_pylist()])
    facts = {"users": len(users), "items": len(catalog), "interactions": n_events,
             "items_interacted": int(np.unpackbits(seen)[: len(item_ids)].sum())}
    too_short = pc.sum(pc.less(events_per_user, cfg.min_history + 1)).as_py()
    bounds = split_bounds(users.to_pylist(), cfg.split, cfg.seed)
    del stats, users, events_per_user
    per_user = pa.concat_tables([PER_USER.empty_table(), *_arrow(parts.map_batches(
        build_partition, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
        fn_kwargs={"out_dir": str(tmp), "titles": titles, "item_ids": item_ids, "bounds": bounds, "known": known,
                   "merged": merged, "clean": any(policies.values()), "cfg": cfg}))])
    counts = {s: pc.sum(pc.filter(per_user.column("samples"), pc.equal(per_user.column("split"), s))).as_py() or 0
              for s in SPLITS}
    # Users with no sample: too few events, or every target already in its history window.
    dropped = {"too_short": too_short, "no_new_target": facts["users"] - len(per_user) - too_short}
    if not sum(counts.values()):
        raise DataError(f"no samples: all {facts['users']} users were dropped ({dropped['too_short']} with fewer "
                        f"than data.min_history + 1 = {cfg.min_history + 1} events, {dropped['no_new_target']} "
                        "whose every target is already in its history); lower data.min_history")
    return {
        "stage": "samples",
        "config": cfg.__dict__ | {"split": list(cfg.split)},
        **facts, "samples": counts, "policies": policies, "users_dropped": dropped,
        "content_hash": users_digest(zip(per_user.column("split").to_pylist(), per_user.column("user_id").to_pylist(),
                                         per_user.column("digest").to_pylist())),
    }


def import_llara(cfg: DataConfig, out_dir: str | Path) -> dict:
    """Import prepared LLaRA / S-DPO JSON samples (``cfg.llara``: split -> file) as a samples folder.

    Candidates and target are kept exactly. The logs' window rule applies: a history is cut to
    its last ``data.max_history`` titles, and a sample `window_drop` drops (a history shorter than
    ``data.min_history``, or holding the target) is left out, counted in the manifest's
    ``samples_dropped``. One title is spelled one way across all files (`titles.check_distinct`:
    the format has no ids, so two spellings would be two items). Prompts are rendered from our
    templates. Every file is read and checked before anything is written.
    """
    import pyarrow.parquet as pq

    if not cfg.llara or set(cfg.llara) - set(SPLITS):
        raise DataError(f"data.format=llara-json needs data.llara mapping splits {SPLITS} to JSON files, "
                        f"got {cfg.llara!r}")
    rows = {split: readers.read_llara_json(cfg.llara[split], split, cfg.num_candidates) if split in cfg.llara else []
            for split in SPLITS}
    check_distinct(((t, t, cfg.llara[split], i + 1) for split in SPLITS for i, r in enumerate(rows[split])
                    for t in r["history_titles"] + r["candidate_titles"] + [r["target_title"]]), readers.LLARA_REMEDY)
    dropped = {"too_short": 0, "target_in_history": 0}
    for split in SPLITS:
        kept = []
        for r in rows[split]:
            history = r["history_titles"][-cfg.max_history:]
            reason = window_drop([title_key(t) for t in history], title_key(r["target_title"]), cfg)
            if reason:
                dropped[reason] += 1
                continue
            kept.append(r | {"history_titles": history, "history_item_ids": history})
        rows[split] = kept
    if not any(rows.values()):
        raise DataError(f"no samples: all {sum(dropped.values())} samples of {', '.join(cfg.llara.values())} were "
                        f"dropped ({dropped['too_short']} with fewer than data.min_history = {cfg.min_history} "
                        f"history titles, {dropped['target_in_history']} whose history holds the target); lower "
                        "data.min_history")
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        for split in SPLITS:
            for r in rows[split]:
                r["template_id"] = choose_template(r["sample_id"], cfg.seed, cfg.prompt_style)
                r["prompt"] = render_prompt(r["template_id"], r["history_titles"], r["candidate_titles"],
                                            cfg.prompt_style, cfg.domain)
                r["answer"] = r["target_title"]
            (tmp / split).mkdir()
            pq.write_table(pa.Table.from_pylist(rows[split], schema=SAMPLES), tmp / split / "part-0.parquet")
        manifest = {"stage": "samples", "source": "llara-json", "config": cfg.__dict__ | {"split": list(cfg.split)},
                    "samples": {split: len(rows[split]) for split in SPLITS}, "samples_dropped": dropped,
                    "content_hash": samples_hash(tmp)}
        titles = sorted({t for split in SPLITS for r in rows[split]
                         for t in r["history_titles"] + r["candidate_titles"] + [r["target_title"]]})
        write_catalog(tmp, pa.table({"item_id": titles, "title": titles}))  # the format's ids are its titles
        write_manifest(tmp, manifest)
    return manifest


def select_samples(table: pa.Table, n: int, seed: int) -> pa.Table:
    """A deterministic subset of ``n`` samples (0 = all): order by a seeded hash of the sample id."""
    if not n or n >= len(table):
        return table
    ids = table.column("sample_id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: (stable_int("subset", seed, ids[i]), ids[i]))
    return table.take(sorted(order[:n]))


def length_batches(table: pa.Table, batch_size: int) -> list[pa.Table]:
    """The batches of a scoring pass over samples: ``table`` sorted by prompt length in
    characters, longest first (ties by ``sample_id``), cut every ``batch_size`` rows. Each batch
    is padded to its own longest prompt, so similar lengths waste little; the longest comes first,
    so a batch too large for the device fails at once, not at the end."""
    if not len(table):
        return []
    order = table.append_column("_length", pc.utf8_length(table.column("prompt"))).sort_by(
        [("_length", "descending"), ("sample_id", "ascending")]).drop_columns(["_length"])
    return [order.slice(i, batch_size) for i in range(0, len(order), batch_size)]


def read_split(samples_dir: str | Path, split: str) -> pa.Table:
    """Read one split of a samples folder as an Arrow table sorted by ``sample_id``."""
    import pyarrow.parquet as pq

    folder = Path(samples_dir) / split
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return SAMPLES.empty_table()
    table = pa.concat_tables([pq.read_table(f, schema=SAMPLES) for f in files])
    return table.sort_by("sample_id")


def samples_hash(samples_dir: str | Path, batch_rows: int = 16_384) -> str:
    """Content hash of a samples folder (`users_digest` of its rows), read shard by shard.

    Streams when each split's shards, read in name order, hold every user's rows together and
    in ``sample_id`` order (what `build_samples` writes); otherwise it reads the split whole,
    sorted by ``sample_id`` (`read_split`).
    """
    import pyarrow.parquet as pq

    entries: list = []
    for split in SPLITS:
        files = sorted((Path(samples_dir) / split).glob("*.parquet"))
        batches = (b for f in files for b in pq.ParquetFile(f).iter_batches(batch_size=batch_rows,
                                                                               columns=SAMPLES.names))
        got = _split_digests(split, batches, ordered=True)
        if got is None:
            got = _split_digests(split, read_split(samples_dir, split).to_batches(), ordered=False)
        entries += got
    return users_digest(entries)


def _split_digests(split: str, batches, *, ordered: bool) -> list | None:
    """``(split, user, sha256 of the user's rows)`` for every user of ``batches``, rows taken in
    the order given. ``ordered``: None as soon as rows are not user by user in ``sample_id`` order."""
    hashers: dict = {}
    last = user = None
    for batch in batches:
        cols = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        for row in zip(*cols):
            if ordered:
                if (last is not None and not last < row[0]) or (row[1] != user and row[1] in hashers):
                    return None
                last, user = row[0], row[1]
            hashers.setdefault(row[1], hashlib.sha256()).update(_row_json(row))
    return [(split, u, h.digest()) for u, h in hashers.items()]
