"""Data-pipeline benchmark: rosepo's Ray Data sample builder against a single-process baseline.

Three implementations of the same samples (same windows, splits, candidates, templates, prompts,
so the same ``content_hash``):

- ``rosepo``: `rosepo.data.samples.build_samples` as shipped (Arrow read + sort in the driver,
  Ray Data ``map_batches(build_user_windows)``, ``materialize``, one filter + write per split,
  `samples_hash` re-reading everything).
- ``pandas``: `build_samples_pandas`, one process: pandas sort + ``groupby``, the per-sample
  functions of rosepo (`draw_candidates`, `choose_template`, `render_prompt`, `assign_splits`),
  Parquet written in bounded batches, the content hash streamed from the written files.
- ``streaming``: `build_samples_streaming`, the change proposed for rosepo: the same Ray Data
  ``map_batches(build_user_windows)``, but blocks of bounded size in ``sample_id`` order, each
  written to Parquet by the task that built it (no ``materialize``, no per-split passes), and
  the same content hash streamed file by file (`stream_samples_hash`).

Input: MovieLens-100K replicated ``k`` times with remapped user ids (copy ``r``: user ``u`` ->
``f"{u}-r{r}"``) as a Parquet interactions file plus the catalog (`scaled_input`).

Each measured build runs in its own child process (``python -m bench.data_pipeline child ...``);
the parent samples the RSS of the child and all its descendants (Ray's raylet, GCS, workers)
every 0.1 s and kills the tree if it passes a memory cap, so one oversized run cannot take
the machine down.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Inputs, outputs, logs and results.json (``ROSEPO_BENCH_DIR`` overrides; ``make clean`` removes runs/).
WORK = Path(os.environ.get("ROSEPO_BENCH_DIR", REPO / "runs" / "bench")) / "data"
ML100K_ROWS = 100_000
#: Largest block handed to one Ray task by `build_samples_streaming` (interactions), so a
#: worker holds at most ~100k samples whatever the input size.
MAX_BLOCK_ROWS = 100_000
#: A build is killed when the machine's available memory falls below this (shared machine).
MIN_AVAILABLE = 2 * 2**30


# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------

def scaled_input(copies: int, root: str | Path = WORK, data_dir: str | Path = REPO / "data") -> tuple[Path, Path]:
    """MovieLens-100K replicated ``copies`` times with remapped users, as Parquet; cached.

    Returns ``(interactions.parquet, catalog.parquet)``. Copy ``r`` renames user ``u`` to
    ``f"{u}-r{r}"``; items, titles and timestamps are unchanged, so every copy yields the same
    windows for its own users (different candidates: they are seeded by sample id).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from rosepo.data.fetch import fetch
    from rosepo.data.readers import read_recbole

    folder = Path(root) / f"input-{copies}x"
    inter_path, cat_path = folder / "interactions.parquet", folder / "catalog.parquet"
    if inter_path.is_file() and cat_path.is_file():
        return inter_path, cat_path
    src = fetch("movielens-100k", str(data_dir))
    inter, catalog = read_recbole(src / "ml-100k.inter", src / "ml-100k.item")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "interactions.parquet.tmp"
    with pq.ParquetWriter(tmp, inter.schema) as w:
        for r in range(copies):
            users = pc.binary_join_element_wise(inter.column("user_id"), pa.scalar(f"-r{r}"), "")
            w.write_table(inter.set_column(0, "user_id", users), row_group_size=1 << 20)
    os.replace(tmp, inter_path)
    pq.write_table(catalog, cat_path)
    return inter_path, cat_path


def data_config(inter_path: str | Path, cat_path: str | Path):
    """The default `DataConfig` reading the given Parquet interactions and catalog."""
    from rosepo.config import DataConfig

    return DataConfig(format="parquet", interactions=str(inter_path), catalog=str(cat_path))


# ---------------------------------------------------------------------------------------------
# Content hash, streamed
# ---------------------------------------------------------------------------------------------

def stream_samples_hash(samples_dir: str | Path, batch_rows: int = 16_384) -> str:
    """`rosepo.data.samples.samples_hash`, same digest, without holding a split in memory.

    Valid when each split's files, read in file-name order, are already in ``sample_id``
    order (what `build_samples_pandas` and `build_samples_streaming` write); this is checked
    batch by batch and any other folder falls back to `samples_hash` (read all, sort).
    """
    import hashlib

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from rosepo.data.samples import SPLITS, samples_hash
    from rosepo.schema import SAMPLES

    encode = json.JSONEncoder(ensure_ascii=False).encode  # what json.dumps(..., ensure_ascii=False) builds
    h = hashlib.sha256()
    for split in SPLITS:
        last = None
        for f in sorted((Path(samples_dir) / split).glob("*.parquet")):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=SAMPLES.names):
                ids = batch.column(0)
                if len(ids) > 1 and not pc.all(pc.less(ids.slice(0, len(ids) - 1), ids.slice(1))).as_py():
                    return samples_hash(samples_dir)
                if last is not None and not last < ids[0].as_py():
                    return samples_hash(samples_dir)
                last = ids[-1].as_py()
                cols = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
                h.update("".join(map(encode, zip(*cols))).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Baseline: one process, pandas
# ---------------------------------------------------------------------------------------------

def user_samples(user: str, seq: list[str], split: str, titles: dict[str, str], item_ids: list[str],
                 cfg) -> list[tuple]:
    """The samples of one user (items in time order) as tuples in `rosepo.schema.SAMPLES` order.

    An independent rewrite of the per-user loop of `build_user_windows` (the baseline must not
    share it, or the equality check would prove nothing); the per-sample functions are rosepo's.
    """
    from rosepo.data.prompts import choose_template, render_prompt
    from rosepo.data.samples import draw_candidates

    lo = cfg.max_history
    positions = [t for t in range(cfg.min_history, len(seq)) if seq[t] not in seq[max(0, t - lo):t]]
    keep = cfg.max_train_windows_per_user if split == "train" else cfg.eval_windows_per_user
    if keep:
        positions = positions[-keep:]
    rows = []
    for t in positions:
        history, target = seq[max(0, t - lo):t], seq[t]
        sid = f"{user}:{t:06d}"
        cands = draw_candidates(sid, target, history, item_ids, titles, cfg.num_candidates, cfg.seed)
        tid = choose_template(sid, cfg.seed)
        h_titles = [titles[i] for i in history]
        c_titles = [titles[i] for i in cands]
        rows.append((sid, user, split, history, h_titles, target, titles[target], cands, c_titles, tid,
                     render_prompt(tid, h_titles, c_titles), titles[target]))
    return rows


class Phases:
    """Wall time per named step; each `lap` also calls `HOOK` (the child's progress marker)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """Close the step ``name`` (it ran since the previous lap)."""
        now = time.perf_counter()
        self.seconds[name] = now - self.last
        self.last = now
        if HOOK is not None:
            HOOK(name)


#: Called with a step's name when it ends; set by the child process to tell the parent.
HOOK = None


def _titles(catalog) -> tuple[dict, list]:
    titles = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist()))
    return titles, sorted(titles)


def build_samples_pandas(cfg, out_dir: str | Path, batch_rows: int = 50_000) -> dict:
    """Single-process baseline of `rosepo.data.samples.build_samples`: same output folder layout
    (``{train,valid,test}/*.parquet``) and content hash; returns counts, hash and step times.

    Reading and validation are rosepo's `load_source` (the definition of valid input); then
    pandas sorts by (``user_id + ":"``, timestamp, item) — that user key puts every split's
    samples in ``sample_id`` order, so the hash can be streamed — and ``groupby`` walks users.
    Rows are written in batches of ``batch_rows``, so memory does not grow with the output.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rosepo.data.samples import SPLITS, assign_splits, load_source
    from rosepo.schema import SAMPLES
    from rosepo.storage import atomic_dir

    ph = Phases()
    inter, catalog, _ = load_source(cfg)
    titles, item_ids = _titles(catalog)
    ph.lap("load_source")
    df = inter.to_pandas()
    split_of = assign_splits(df["user_id"].unique().tolist(), cfg.split, cfg.seed)
    df["key"] = df["user_id"] + ":"
    df = df.sort_values(["key", "timestamp", "item_id"], ignore_index=True)
    ph.lap("splits+sort")
    counts = dict.fromkeys(SPLITS, 0)
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        writers, buffers = {}, {s: [] for s in SPLITS}

        def flush(split):
            cols = list(zip(*buffers[split]))
            table = pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(cols, SAMPLES)], schema=SAMPLES)
            if split not in writers:
                (tmp / split).mkdir()
                writers[split] = pq.ParquetWriter(tmp / split / "part-0.parquet", SAMPLES)
            writers[split].write_table(table)
            counts[split] += len(table)
            buffers[split] = []

        for key, seq in df.groupby("key", sort=False)["item_id"]:  # groups in row order: sorted
            user = key[:-1]
            split = split_of[user]
            buffers[split].extend(user_samples(user, seq.tolist(), split, titles, item_ids, cfg))
            if len(buffers[split]) >= batch_rows:
                flush(split)
        for split in SPLITS:
            if buffers[split]:
                flush(split)
            if split in writers:
                writers[split].close()
        ph.lap("windows+write")
        digest = stream_samples_hash(tmp)
        ph.lap("hash (streamed)")
    return {"samples": counts, "content_hash": digest, "phases": ph.seconds}


# ---------------------------------------------------------------------------------------------
# Proposed rosepo variant: bounded blocks, written by the tasks, hash streamed
# ---------------------------------------------------------------------------------------------

def ordered_user_blocks(inter, num_blocks: int, max_rows: int = MAX_BLOCK_ROWS) -> list:
    """Sort by (``user_id + ":"``, timestamp, item) and cut at user boundaries into blocks of
    about ``min(len / num_blocks, max_rows)`` rows, each tagged with its index in ``_block``.

    The ``user_id + ":"`` key makes block order, and row order inside a block, ``sample_id``
    order (for ids without ``":"``; `stream_samples_hash` checks and falls back otherwise).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    key = pc.binary_join_element_wise(inter.column("user_id"), pa.scalar(":"), "")
    inter = inter.append_column("_key", key).sort_by(
        [("_key", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending")]).drop_columns(["_key"])
    users, n = inter.column("user_id"), len(inter)
    change = pc.not_equal(users.slice(1), users.slice(0, n - 1)) if n > 1 else pa.array([], pa.bool_())
    starts = np.flatnonzero(np.asarray(change.to_numpy(zero_copy_only=False))) + 1
    target = max(1, min(max_rows, math.ceil(n / max(1, num_blocks))))
    cuts, last = [0], 0
    for s in starts.tolist():
        if s - last >= target:
            cuts.append(s)
            last = s
    cuts.append(n)
    return [inter.slice(a, b - a).append_column("_block", pa.array([i] * (b - a), pa.int32()))
            for i, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a]


def user_digests(samples) -> list[tuple[str, int, bytes]]:
    """``(split, rows, sha256 of the rows' JSON)`` per user of a `build_user_windows` table, in
    row order; the JSON of a row is exactly what `samples_hash` feeds its hash."""
    import hashlib

    encode = json.JSONEncoder(ensure_ascii=False).encode
    cols = [samples.column(i).to_pylist() for i in range(samples.num_columns)]
    out, prev = [], None
    for row in zip(*cols):
        if row[1] != prev:
            prev = row[1]
            out.append([row[2], 0, hashlib.sha256()])
        out[-1][1] += 1
        out[-1][2].update(encode(row).encode())
    return [(split, n, h.digest()) for split, n, h in out]


def write_user_windows(block, *, out_dir: str, titles: dict, item_ids: list, split_of: dict, cfg,
                       digests: bool = False):
    """Build one block's samples with `build_user_windows`, write them as
    ``{out_dir}/{split}/part-{block:05d}.parquet`` and return one row per user: block, position,
    split, sample count and (``digests``) the sha256 of the user's rows (`user_digests`)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from rosepo.data.samples import SPLITS, build_user_windows

    block_id = block.column("_block")[0].as_py()
    samples = build_user_windows(block.drop_columns(["_block"]), titles=titles, item_ids=item_ids,
                                 split_of=split_of, cfg=cfg)
    for split in SPLITS:
        part = samples.filter(pc.equal(samples.column("split"), split))
        if len(part):
            pq.write_table(part, Path(out_dir) / split / f"part-{block_id:05d}.parquet")
    if digests:
        users = user_digests(samples)
    else:
        per_user = samples.group_by(["user_id", "split"], use_threads=False).aggregate([("sample_id", "count")])
        users = [(s, n, b"") for s, n in zip(per_user.column("split").to_pylist(),
                                               per_user.column("sample_id_count").to_pylist())]
    return pa.table({"block": pa.array([block_id] * len(users), pa.int32()), "pos": list(range(len(users))),
                     "split": [u[0] for u in users], "n": [u[1] for u in users], "digest": [u[2] for u in users]})


def build_samples_streaming(cfg, out_dir: str | Path, task_hash: bool = False) -> dict:
    """`build_samples` with the changes proposed for rosepo; the same folder and, unless
    ``task_hash``, the same content hash.

    Ray Data ``map_batches`` over blocks of at most `MAX_BLOCK_ROWS` interactions in
    ``sample_id`` order; each task writes its samples and returns only per-user counts, so
    nothing is materialised in the object store and memory stays flat as the input grows.
    The hash is `stream_samples_hash` over the written files (one core, in the driver), or with
    ``task_hash`` a sha256 over the per-user digests the tasks computed in parallel (another
    digest of the same content: it cannot equal `samples_hash`).
    """
    import hashlib

    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    from rosepo.data.samples import SPLITS, assign_splits, load_source
    from rosepo.storage import atomic_dir

    ph = Phases()
    inter, catalog, _ = load_source(cfg)
    titles, item_ids = _titles(catalog)
    ph.lap("load_source")
    split_of = assign_splits(pc.unique(inter.column("user_id")).to_pylist(), cfg.split, cfg.seed)
    blocks = ordered_user_blocks(inter, cfg.num_partitions)
    ph.lap("splits+sort+cut")
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
        ds = ray.data.from_arrow(blocks).map_batches(
            write_user_windows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
            fn_kwargs={"out_dir": str(tmp), "titles": titles, "item_ids": item_ids, "split_of": split_of,
                       "cfg": cfg, "digests": task_hash})
        users = pa.Table.from_pylist(ds.take_all()).sort_by([("block", "ascending"), ("pos", "ascending")])
        counts = {s: pc.sum(pc.filter(users.column("n"), pc.equal(users.column("split"), s))).as_py() or 0
                  for s in SPLITS}
        ph.lap("map_batches (windows+write)")
        if task_hash:
            h = hashlib.sha256()
            splits, digests = users.column("split").to_pylist(), users.column("digest").to_pylist()
            for split in SPLITS:
                for s, d in zip(splits, digests):
                    if s == split:
                        h.update(d)
            digest = h.hexdigest()
            ph.lap("hash (per-user digests from tasks)")
        else:
            digest = stream_samples_hash(tmp)
            ph.lap("hash (streamed)")
    return {"samples": counts, "content_hash": digest, "phases": ph.seconds}


def build_samples_rosepo_phased(cfg, out_dir: str | Path) -> dict:
    """`rosepo.data.samples.build_samples` step by step with a timer per step (the profile).

    The same calls in the same order as ``build_samples`` (load_source, assign_splits,
    user_blocks, map_batches + materialize, filter + write + count per split, samples_hash).
    """
    import pyarrow.compute as pc
    import ray

    from rosepo.data import samples as S
    from rosepo.storage import atomic_dir

    ph = Phases()
    inter, catalog, _ = S.load_source(cfg)
    titles, item_ids = _titles(catalog)
    ph.lap("load_source")
    split_of = S.assign_splits(pc.unique(inter.column("user_id")).to_pylist(), cfg.split, cfg.seed)
    blocks = S.user_blocks(inter, cfg.num_partitions)
    ph.lap("splits+sort+cut")
    ds = ray.data.from_arrow(blocks).map_batches(
        S.build_user_windows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
        fn_kwargs={"titles": titles, "item_ids": item_ids, "split_of": split_of, "cfg": cfg}).materialize()
    ph.lap("map_batches+materialize")
    counts = {}
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        for split in S.SPLITS:
            part = ds.filter(expr=f"split == '{split}'")
            part.write_parquet(str(tmp / split), min_rows_per_file=50_000)
            counts[split] = part.count()
        ph.lap("filter+write+count")
        digest = S.samples_hash(tmp)
        ph.lap("samples_hash")
    return {"samples": counts, "content_hash": digest, "phases": ph.seconds}


# ---------------------------------------------------------------------------------------------
# Measurement: one child process per build, process-tree memory sampled by the parent
# ---------------------------------------------------------------------------------------------

IMPLS = ("rosepo", "pandas", "streaming", "streaming-taskhash", "rosepo-phased")


def _child(impl: str, inter_path: str, cat_path: str, out_dir: str) -> None:
    """Body of the child process: (start Ray,) build once, print one JSON line."""
    import logging

    global HOOK
    HOOK = lambda name: print("PHASE " + name, flush=True)  # noqa: E731

    cfg = data_config(inter_path, cat_path)
    res = {"impl": impl}
    if impl != "pandas":
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        res["ray_start_s"] = time.perf_counter() - t
        time.sleep(1.0)  # let Ray's start-up settle before the parent's idle snapshot
    else:
        import pandas  # noqa: F401  (imported here so the build's time and CPU exclude it)

        from rosepo.data import samples  # noqa: F401
    print("READY", flush=True)  # the parent snapshots the tree's memory and CPU time here
    t = time.perf_counter()
    if impl == "rosepo":
        from rosepo.data.samples import build_samples

        m = build_samples(cfg, out_dir)
        out = {"samples": m["samples"], "content_hash": m["content_hash"]}
    elif impl == "pandas":
        out = build_samples_pandas(cfg, out_dir)
    elif impl.startswith("streaming"):
        out = build_samples_streaming(cfg, out_dir, task_hash=impl == "streaming-taskhash")
    else:
        out = build_samples_rosepo_phased(cfg, out_dir)
    res.update(out, seconds=time.perf_counter() - t)
    print("DONE", flush=True)  # the parent stops counting CPU time and peaks here
    if impl == "streaming-taskhash":  # after the timed build: prove the rows equal the baseline's
        HOOK("(check: rows hash)")
        res["rows_hash"] = stream_samples_hash(out_dir)
    print("RESULT " + json.dumps(res), flush=True)


def _tree(proc) -> list:
    import psutil

    try:
        return [proc] + proc.children(recursive=True)
    except psutil.Error:
        return []


def _kill(procs) -> None:
    import psutil

    for p in procs:
        try:
            p.kill()  # psutil checks the creation time: never a recycled pid
        except psutil.Error:
            pass


def _reap(procs, grace_s: float = 10.0) -> None:
    """Kill the processes of a finished child's tree still alive after ``grace_s`` (Ray's
    agents outlive a driver that was killed, re-parented to init)."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    _kill(alive)


def _tree_sum(procs, what: str) -> int:
    """Sum of ``rss`` (cheap) or ``pss`` (reads smaps: counts shared pages, such as Ray's object
    store, once) over the processes still alive."""
    import psutil

    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss if what == "rss" else p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def measure(impl: str, copies: int, *, cap_bytes: int, timeout_s: float, interval_s: float = 0.1,
            pss_every: int = 10) -> dict:
    """Run one build of ``impl`` on the ``copies``x input in a child process and return its result.

    Added to the child's own result: ``peak_rss`` (bytes, summed over the child and all its
    descendants, Ray's included, sampled every ``interval_s``), ``peak_pss`` (the same with PSS,
    every ``pss_every`` samples: shared pages counted once), ``idle_rss`` (the tree once Ray is
    up, before the build), ``cpu_s`` (user + system seconds of the tree during the build, as last
    sampled: the measure of work least disturbed by other load on the machine), ``phase_peak_rss``
    (peak per step, for the builders that report steps) and ``status`` (ok / killed-memory /
    timeout / failed). The tree is killed, process by process, past ``cap_bytes`` or ``timeout_s``.
    """
    import psutil

    inter_path, cat_path = scaled_input(copies)
    out_dir = WORK / f"out-{impl}-{copies}x"
    log = WORK / f"log-{impl}-{copies}x-{time.strftime('%H%M%S')}.txt"
    WORK.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0")
    with open(log, "w") as err:
        child = subprocess.Popen([sys.executable, "-m", "bench.data_pipeline", "child", impl, str(inter_path),
                                  str(cat_path), str(out_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=err, text=True)
    proc = psutil.Process(child.pid)
    st = {"peak": 0, "pss": 0, "phase": 0, "status": "ok", "idle": None, "cpu_ready": 0.0, "cpu_done": None}
    cpu: dict[int, float] = {}  # pid -> user + system seconds, last seen
    seen: dict[int, psutil.Process] = {}  # every process of the tree, to reap what Ray leaves behind
    phase_peaks: dict[str, int] = {}
    done = threading.Event()

    def sample():
        start, i = time.monotonic(), 0
        while not done.is_set():
            procs = _tree(proc)
            rss = _tree_sum(procs, "rss")
            if i % pss_every == 0 and st["cpu_done"] is None:
                st["pss"] = max(st["pss"], _tree_sum(procs, "pss"))
            i += 1
            for q in procs:
                seen.setdefault(q.pid, q)
                try:
                    t = q.cpu_times()
                    cpu[q.pid] = t.user + t.system
                except psutil.Error:
                    pass
            if st["cpu_done"] is None:
                st["peak"] = max(st["peak"], rss)
            st["phase"] = max(st["phase"], rss)
            low = psutil.virtual_memory().available < MIN_AVAILABLE
            over = ("killed-memory" if rss > cap_bytes or low else
                    "timeout" if time.monotonic() - start > timeout_s else "")
            if over:
                st["status"] = over
                _kill(procs)
                return
            done.wait(interval_s)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    result = {}
    for line in child.stdout:
        if line.startswith("READY"):
            st["idle"] = _tree_sum(_tree(proc), "rss")
            st["cpu_ready"], st["phase"] = sum(cpu.values()), 0
        elif line.startswith("PHASE "):
            phase_peaks[line[len("PHASE "):].strip()] = st["phase"]
            st["phase"] = 0
        elif line.startswith("DONE"):
            st["cpu_done"] = sum(cpu.values())
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    child.wait()
    done.set()
    watcher.join()
    _reap(list(seen.values()))
    if not result and st["status"] == "ok":
        st["status"] = "failed"
    cpu_end = st["cpu_done"] if st["cpu_done"] is not None else sum(cpu.values())
    result.update(impl=impl, copies=copies, rows=copies * ML100K_ROWS, peak_rss=st["peak"], peak_pss=st["pss"],
                  idle_rss=st["idle"], cpu_s=cpu_end - st["cpu_ready"], phase_peak_rss=phase_peaks,
                  status=st["status"])
    if st["status"] != "ok":
        result["log"] = str(log)
    return result


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

def _fmt_mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def _median_spread(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.1f} ({min(values):.1f}–{max(values):.1f})" if len(values) > 1 else f"{med:.1f}"


def summarise(results: list[dict]) -> str:
    """Markdown tables: per (size, impl) wall time (median, range), rows/s, CPU time, peak memory;
    ratios against the pandas baseline with the equality check; growth with size; steps."""
    keys = sorted({(r["rows"], r["impl"]) for r in results}, key=lambda k: (k[0], IMPLS.index(k[1])))
    ok = {k: [r for r in results if (r["rows"], r["impl"]) == k and r["status"] == "ok"] for k in keys}
    every = {k: [r for r in results if (r["rows"], r["impl"]) == k] for k in keys}

    def med(k, field):
        vals = [r[field] for r in ok[k]]
        return statistics.median(vals) if vals else None

    lines = ["| interactions | impl | runs ok/all | wall s, median (min–max) | interactions/s | CPU s | peak RSS MiB "
             "(max) | peak PSS MiB | of which idle Ray RSS | Ray start s (not in wall) | samples | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        rows, impl = k
        rs = every[k]
        secs = [r["seconds"] for r in ok[k]]
        rate = f"{rows / med(k, 'seconds'):,.0f}" if secs else "-"
        cpu = f"{med(k, 'cpu_s'):.0f}" if secs else "-"
        peaks = [r["peak_rss"] for r in rs]
        pss = [r["peak_pss"] for r in rs]
        idle = [r["idle_rss"] for r in rs if r.get("idle_rss") and r["impl"] != "pandas"]
        samples = f"{sum(ok[k][0]['samples'].values()):,}" if secs else "-"
        starts = [r["ray_start_s"] for r in rs if "ray_start_s" in r]
        status = ", ".join(sorted({r["status"] for r in rs}))
        lines.append(f"| {rows:,} | {impl} | {len(ok[k])}/{len(rs)} | {_median_spread(secs)} | {rate} | {cpu} | "
                     f"{_fmt_mib(statistics.median(peaks))} ({_fmt_mib(max(peaks))}) | "
                     f"{_fmt_mib(statistics.median(pss))} | {_fmt_mib(statistics.median(idle)) if idle else '-'} | "
                     f"{_median_spread(starts)} | {samples} | {status} |")
    lines += ["", "| interactions | impl | throughput / pandas | CPU s / pandas | peak RSS / pandas | rows equal "
              "pandas (content hash) |", "|---|---|---|---|---|---|"]
    for k in keys:
        rows, impl = k
        base = (rows, "pandas")
        if impl == "pandas" or not ok.get(base) or not ok[k]:
            continue
        want = {r["content_hash"] for r in ok[base]}
        got = {r.get("rows_hash", r["content_hash"]) for r in ok[k]}
        lines.append(f"| {rows:,} | {impl} | {med(base, 'seconds') / med(k, 'seconds'):.2f} | "
                     f"{med(k, 'cpu_s') / med(base, 'cpu_s'):.2f} | {med(k, 'peak_rss') / med(base, 'peak_rss'):.1f} | "
                     f"{'yes' if got == want and len(want) == 1 else 'NO'} |")
    growth = []
    for impl in IMPLS:
        sizes = [rows for rows, i in keys if i == impl and ok[(rows, i)]]
        for a, b in zip(sizes, sizes[1:]):
            ka, kb = (a, impl), (b, impl)
            growth.append(f"| {impl} | {a:,} → {b:,} (×{b / a:g}) | ×{med(kb, 'seconds') / med(ka, 'seconds'):.1f} | "
                          f"×{med(kb, 'cpu_s') / med(ka, 'cpu_s'):.1f} | ×{med(kb, 'peak_rss') / med(ka, 'peak_rss'):.2f} |")
    if growth:
        lines += ["", "| impl | size | wall time | CPU time | peak RSS |", "|---|---|---|---|---|"] + growth
    stepped = [k for k in keys if ok[k] and ok[k][0].get("phases")]
    if stepped:
        lines += ["", "| interactions | impl | step | wall s (median) | peak RSS MiB in the step (- : shorter than "
                  "one sample) |", "|---|---|---|---|---|"]
        for k in stepped:
            for name in ok[k][0]["phases"]:
                secs = statistics.median(r["phases"][name] for r in ok[k])
                peak = [r["phase_peak_rss"][name] for r in ok[k] if r.get("phase_peak_rss", {}).get(name)]
                lines.append(f"| {k[0]:,} | {k[1]} | {name} | {secs:.1f} | "
                             f"{_fmt_mib(statistics.median(peak)) if peak else '-'} |")
    return "\n".join(lines)


def machine() -> str:
    """One line: cores, memory, load average, date."""
    import psutil

    vm = psutil.virtual_memory()
    la = os.getloadavg()
    return (f"{os.cpu_count()} cores, {vm.total / 2**30:.1f} GiB RAM ({vm.available / 2**30:.1f} GiB available), "
            f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")


def run(argv: list[str] | None = None) -> int:
    """``python -m bench data [options]``; the defaults (3 x A/B at 100k, once each at 1M) take
    about 8 minutes on an idle 2-core machine. BENCHMARKS.md gives the command of the full study."""
    import argparse

    import psutil

    p = argparse.ArgumentParser(prog="python -m bench data", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1],
                   help="input sizes in copies of ML-100K (1 = 100k interactions) for the A/B runs")
    p.add_argument("--reps", type=int, default=3, help="repetitions per size and implementation (alternated)")
    p.add_argument("--impls", nargs="+", default=["rosepo", "pandas"], choices=IMPLS,
                   help="implementations run alternately at every size")
    p.add_argument("--solo", type=int, nargs="*", default=[10],
                   help="extra sizes (copies) run once per --solo-impls, e.g. 100 for 10M")
    p.add_argument("--solo-impls", nargs="+", default=["rosepo", "pandas"], choices=IMPLS,
                   help="implementations run once at each --solo size")
    p.add_argument("--profile", type=int, nargs="*", default=[],
                   help="sizes (copies) at which rosepo's build is run once step by step with timers")
    p.add_argument("--cap-gib", type=float, default=None,
                   help="kill a build whose process tree passes this RSS (default: none; a build is always "
                        "killed when the machine's available memory falls under 2 GiB)")
    p.add_argument("--timeout", type=float, default=420.0, help="kill a build running longer (seconds)")
    p.add_argument("--json", default=str(WORK / "results.json"), help="where to write the raw results")
    p.add_argument("--report", nargs="+", default=None, metavar="JSON",
                   help="run nothing: print the tables of earlier results files (merged)")
    args = p.parse_args(argv)
    if args.report:
        print(summarise([r for f in args.report for r in json.loads(Path(f).read_text())]))
        return 0

    cap = int(args.cap_gib * 2**30) if args.cap_gib else psutil.virtual_memory().total
    print(f"machine: {machine()}; memory cap per build {cap / 2**30:.1f} GiB", flush=True)
    plan = [(c, impl) for c in args.sizes for _ in range(args.reps) for impl in args.impls]
    plan += [(c, impl) for c in args.solo for impl in args.solo_impls]
    plan += [(c, "rosepo-phased") for c in args.profile]
    for c in sorted({c for c, _ in plan}):
        t = time.perf_counter()
        scaled_input(c)
        print(f"input {c}x ({c * ML100K_ROWS:,} interactions) ready in {time.perf_counter() - t:.1f} s", flush=True)
    results = []
    for c, impl in plan:
        r = measure(impl, c, cap_bytes=cap, timeout_s=args.timeout)
        results.append(r)
        print(f"  {impl:>13} {c * ML100K_ROWS:>11,}: {r.get('seconds', float('nan')):7.1f} s  peak "
              f"{_fmt_mib(r['peak_rss'])} MiB  {r['status']}  {r.get('content_hash', '')[:12]}  "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nmachine at the end: {machine()}\n")
    print(summarise(results))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "child":
        _child(*sys.argv[2:])
    else:
        sys.exit(run(sys.argv[1:]))
