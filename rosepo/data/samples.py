"""Build recommendation samples from interaction logs, on Ray Data.

Stage graph of this module: read + validate (Arrow, driver) → sort by (user, time, item) and
cut into blocks of at most `MAX_BLOCK_ROWS` interactions at user boundaries → one Ray Data
``map_batches`` task per block builds its users' sliding windows, candidates and prompts, writes
them as Parquet shards per split and returns one small row per user (split, count, digest) →
``manifest.json`` with the counts and the content hash made from those digests.

Grouping users is a sort plus block cuts at user boundaries instead of a Ray Data
``groupby().map_groups()`` (a full shuffle: 17 s for 100k rows on 2 cores, against well under
a second for the Arrow sort), so blocks hold whole users and need no further exchange. Nothing
but the input and the per-user rows passes through the driver or the object store: memory is
bounded by the block size, not by the output (7.9M samples from 10M interactions).

Determinism: every random choice (split, candidates, template) derives from the seed and a
stable hash of the user or sample id, never from block order, so output content is the same
for any parallelism; the manifest's ``content_hash`` proves it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rosepo.config import DataConfig
from rosepo.data import readers
from rosepo.data.fetch import fetch
from rosepo.data.prompts import check_domain, choose_template, render_prompt, stable_int
from rosepo.errors import DataError
from rosepo.schema import SAMPLES
from rosepo.storage import atomic_dir, write_manifest

SPLITS = ("train", "valid", "test")
#: Most interactions one Ray task turns into samples (about 0.8 samples each, ~2.5 KB per sample
#: as Python objects): bounds a worker's memory whatever the input size.
MAX_BLOCK_ROWS = 100_000


def _movielens_100k(cfg: DataConfig) -> tuple[pa.Table, pa.Table, Path, Path]:
    folder = fetch("movielens-100k", cfg.data_dir)
    inter_path, item_path = folder / "ml-100k.inter", folder / "ml-100k.item"
    return (*readers.read_recbole(inter_path, item_path), inter_path, item_path)


def _files(read):
    """A source reading ``data.interactions`` and ``data.catalog`` with ``read(inter, catalog, cfg)``."""
    def source(cfg: DataConfig) -> tuple[pa.Table, pa.Table, str, str]:
        if not cfg.interactions or not cfg.catalog:
            raise DataError(f"data.format={cfg.format} needs data.interactions and data.catalog paths")
        return (*read(cfg.interactions, cfg.catalog, cfg), cfg.interactions, cfg.catalog)
    return source


#: ``data.format`` -> reader of interactions and catalog (``llara-json``, prepared samples, is
#: `import_llara`). The names are `rosepo.config.DataFormat`'s; a test checks they agree.
SOURCES = {
    "movielens-100k": _movielens_100k,
    "recbole": _files(lambda i, c, cfg: readers.read_recbole(i, c)),
    "ml100k-raw": _files(lambda i, c, cfg: readers.read_ml100k_raw(i, c)),
    "csv": _files(lambda i, c, cfg: readers.read_csv_files(i, c, delimiter=cfg.delimiter, columns=cfg.columns)),
    "parquet": _files(lambda i, c, cfg: readers.read_parquet_files(i, c, columns=cfg.columns)),
}


def load_source(cfg: DataConfig) -> tuple[pa.Table, pa.Table, dict]:
    """Read and validate interactions and catalog per ``cfg.format``; returns (inter, catalog, stats).

    Refuses, with the counts, an input that cannot give one sample: no interactions, too few
    distinct titles to draw candidates from, or no user with ``min_history + 1`` events.
    """
    if cfg.format not in SOURCES:
        raise DataError(f"unknown data.format {cfg.format!r}; expected one of {', '.join(SOURCES)} or llara-json")
    inter, catalog, inter_path, item_path = SOURCES[cfg.format](cfg)
    inter, stats = readers.check_consistency(inter, catalog, str(inter_path),
                                             drop_duplicates=cfg.drop_duplicates,
                                             drop_unknown_items=cfg.drop_unknown_items)
    if len(inter) == 0:
        raise DataError("no interactions to build samples from", file=str(inter_path))
    need = cfg.max_history + cfg.num_candidates
    distinct = len(pc.unique(catalog.column("title")))
    if distinct < need:
        raise DataError(f"the catalog has {distinct} distinct titles but samples need at least {need} "
                        f"(data.max_history + data.num_candidates) to draw distinct candidates outside the "
                        "history", file=str(item_path))
    events = pc.value_counts(inter.column("user_id")).field("counts")
    longest = pc.max(events).as_py()
    if longest < cfg.min_history + 1:
        raise DataError(f"no samples to build: {len(events)} user(s) with {len(inter)} events, the longest with "
                        f"{longest}, but a sample needs data.min_history + 1 = {cfg.min_history + 1} events of one "
                        "user; lower data.min_history or add events", file=str(inter_path))
    return inter, catalog, stats


def assign_splits(users: list[str], fractions: tuple, seed: int) -> dict[str, str]:
    """User-level split: users ordered by a seeded stable hash, cut by ``fractions`` (exact counts)."""
    order = sorted(users, key=lambda u: (stable_int("split", seed, u), u))
    n = len(order)
    n_train = round(fractions[0] * n)
    n_valid = round(fractions[1] * n)
    return {u: ("train" if i < n_train else "valid" if i < n_train + n_valid else "test")
            for i, u in enumerate(order)}


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


def user_rows(user: str, seq: list[str], split: str, *, titles: dict[str, str], item_ids: list[str],
              cfg: DataConfig) -> list[tuple]:
    """The samples of one user (``seq``: item ids in time order) as tuples in `SAMPLES` column order.

    A sample's history is the at most ``max_history`` items before the target, oldest first;
    windows with fewer than ``min_history`` items, or whose target is in the history, are dropped.
    Train users keep all windows (or the last ``max_train_windows_per_user``); valid/test users keep
    their last ``eval_windows_per_user``.
    """
    positions = [t for t in range(cfg.min_history, len(seq)) if seq[t] not in seq[max(0, t - cfg.max_history):t]]
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
                       split_of: dict[str, str], cfg: DataConfig) -> pa.Table:
    """Ray Data task: the samples of one `user_blocks` block, written as
    ``{out_dir}/{split}/part-{block:05d}.parquet``; returns one row per user with samples:
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
            pq.write_table(_table(rows), Path(out_dir) / split / f"part-{block_id:05d}.parquet")
    return pa.table({"user_id": pa.array(users["user_id"], pa.string()), "split": pa.array(users["split"], pa.string()),
                     "samples": pa.array(users["samples"], pa.int64()), "digest": pa.array(users["digest"], pa.binary())})


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


def build_samples(cfg: DataConfig, out_dir: str | Path, *, start_ray: Callable[[], object] | None = None) -> dict:
    """Build the samples of ``cfg`` into ``out_dir`` (atomically) and return its manifest.

    ``out_dir`` gets ``train/``, ``valid/``, ``test/`` Parquet shards and ``manifest.json``. The
    input is read and validated first; ``start_ray`` (e.g. `rosepo.runtime.init_ray`
    with the run's address) is called only then, so a refused input costs no Ray start.
    """
    import ray

    t0 = time.perf_counter()
    check_domain(cfg.domain)
    if cfg.format == "llara-json":
        return import_llara(cfg, out_dir)
    inter, catalog, stats = load_source(cfg)
    titles = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
    item_ids = sorted(titles)
    users = pc.unique(inter.column("user_id")).to_pylist()
    split_of = assign_splits(users, cfg.split, cfg.seed)
    too_short = pc.sum(pc.less(pc.value_counts(inter.column("user_id")).field("counts"),
                               cfg.min_history + 1)).as_py()
    facts = {"users": len(users), "items": len(catalog), "interactions": len(inter),
             "items_interacted": len(pc.unique(inter.column("item_id")))}
    blocks = user_blocks(inter, cfg.num_partitions)
    del inter  # the blocks hold a sorted copy; once Ray holds them, the driver keeps neither table
    if start_ray is not None:
        start_ray()
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
        ds = ray.data.from_arrow(blocks)
        del blocks
        ds = ds.map_batches(
            write_user_windows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
            fn_kwargs={"out_dir": str(tmp), "titles": titles, "item_ids": item_ids, "split_of": split_of,
                       "cfg": cfg})
        per_user = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        splits = per_user.column("split").to_pylist()
        counts = {s: pc.sum(pc.filter(per_user.column("samples"), pc.equal(per_user.column("split"), s))).as_py() or 0
                  for s in SPLITS}
        # Users with no sample: too few events, or every target already in its history window.
        dropped = {"too_short": too_short, "no_new_target": len(users) - len(per_user) - too_short}
        if not sum(counts.values()):
            raise DataError(f"no samples: all {len(users)} users were dropped ({dropped['too_short']} with fewer "
                            f"than data.min_history + 1 = {cfg.min_history + 1} events, {dropped['no_new_target']} "
                            "whose every target is already in its history); lower data.min_history")
        manifest = {
            "stage": "samples",
            "config": cfg.__dict__ | {"split": list(cfg.split)},
            **facts, "samples": counts, "policies": stats, "users_dropped": dropped,
            "content_hash": users_digest(zip(splits, per_user.column("user_id").to_pylist(),
                                             per_user.column("digest").to_pylist())),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_manifest(tmp, manifest)
    return manifest


def import_llara(cfg: DataConfig, out_dir: str | Path) -> dict:
    """Import prepared LLaRA / S-DPO JSON samples (``cfg.llara``: split -> file) as a samples folder.

    History, candidates and target are kept exactly; prompts are rendered from our templates.
    Every file is read and checked before anything is written.
    """
    import pyarrow.parquet as pq

    if not cfg.llara or set(cfg.llara) - set(SPLITS):
        raise DataError(f"data.format=llara-json needs data.llara mapping splits {SPLITS} to JSON files, "
                        f"got {cfg.llara!r}")
    rows = {split: readers.read_llara_json(cfg.llara[split], split, cfg.num_candidates) if split in cfg.llara else []
            for split in SPLITS}
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
                    "samples": {split: len(rows[split]) for split in SPLITS}, "content_hash": samples_hash(tmp)}
        write_manifest(tmp, manifest)
    return manifest


def select_samples(table: pa.Table, n: int, seed: int) -> pa.Table:
    """A deterministic subset of ``n`` samples (0 = all): order by a seeded hash of the sample id."""
    if not n or n >= len(table):
        return table
    ids = table.column("sample_id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: (stable_int("subset", seed, ids[i]), ids[i]))
    return table.take(sorted(order[:n]))


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
