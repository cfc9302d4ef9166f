"""Data-pipeline benchmark: rosepo's Ray Data sample builder against a single-process baseline.

Two implementations of the same samples (same windows, splits, candidates, templates, prompts,
so the same ``content_hash``):

- ``rosepo``: `rosepo.data.samples.build_samples` as shipped: Ray Data reads and checks the
  input file by file, hash-shuffles it by user, counts per partition, then one task per partition
  sorts it and builds, writes and digests its users' samples in blocks of at most
  `rosepo.data.samples.MAX_BLOCK_ROWS` interactions; the driver holds the catalog and per-user
  rows only.
- ``pandas``: `build_samples_pandas`, one process: pandas sort + ``groupby``, the per-sample
  functions of rosepo (`draw_candidates`, `choose_template`, `render_prompt`, `assign_splits`) in
  a loop of its own, Parquet written in bounded batches, the content hash made from the per-user
  digests of the rows it wrote (the same definition, `users_digest`): equal hashes mean equal rows.

Input: MovieLens-100K replicated ``k`` times with remapped user ids (copy ``r``: user ``u`` ->
``f"{u}-r{r}"``) as a Parquet interactions file plus the catalog (`scaled_input`).

Each measured build runs in its own child process (``python -m bench.data_pipeline child ...``);
the parent samples the RSS of the child (the driver) and of the child and all its descendants
(Ray's raylet, GCS, workers) every 0.1 s and kills the tree if it passes a memory cap, so one
oversized run cannot take the machine down.

    python -m bench data [--sizes 1] [--reps 2] [--solo 10]
    python -m bench data --users 20 --reps 1 --solo   # seconds: a check, not a measurement
"""

from __future__ import annotations

import json
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
#: A build is killed when the machine's available memory falls below this (shared machine).
MIN_AVAILABLE = 2 * 2**30


# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------

def scaled_input(copies: int, root: str | Path | None = None, data_dir: str | Path = REPO / "data",
                 users: int = 0) -> tuple[Path, Path]:
    """MovieLens-100K replicated ``copies`` times with remapped users, as Parquet; cached under
    ``root`` (default `WORK`).

    Returns ``(interactions.parquet, catalog.parquet)``. Copy ``r`` renames user ``u`` to
    ``f"{u}-r{r}"``; items, titles and timestamps are unchanged, so every copy yields the same
    windows for its own users (different candidates: they are seeded by sample id). ``users`` > 0
    keeps only the first ``users`` users (by id) of ML-100K before copying.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from rosepo.data.fetch import fetch
    from rosepo.data.readers import read_recbole

    folder = Path(root or WORK) / (f"input-{copies}x" + (f"-{users}u" if users else ""))
    inter_path, cat_path = folder / "interactions.parquet", folder / "catalog.parquet"
    if inter_path.is_file() and cat_path.is_file():
        return inter_path, cat_path
    src = fetch("movielens-100k", str(data_dir))
    inter, catalog = read_recbole(src / "ml-100k.inter", src / "ml-100k.item", movielens=True)
    if users:
        kept = sorted(set(inter.column("user_id").to_pylist()))[:users]
        inter = inter.filter(pc.is_in(inter.column("user_id"), pa.array(kept)))
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
    samples in ``sample_id`` order — and ``groupby`` walks users. Rows are written in batches of
    ``batch_rows``, so memory does not grow with the output; each user's rows are digested as
    they are made, and the content hash combines the digests (`users_digest`).
    """
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rosepo.data.samples import SPLITS, assign_splits, load_source, users_digest
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
    encode = json.JSONEncoder(ensure_ascii=False).encode  # what json.dumps(..., ensure_ascii=False) builds
    digests = []
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
            rows = user_samples(user, seq.tolist(), split, titles, item_ids, cfg)
            if rows:
                h = hashlib.sha256()
                for row in rows:
                    h.update(encode(row).encode())
                digests.append((split, user, h.digest()))
            buffers[split].extend(rows)
            if len(buffers[split]) >= batch_rows:
                flush(split)
        for split in SPLITS:
            if buffers[split]:
                flush(split)
            if split in writers:
                writers[split].close()
        ph.lap("windows+digests+write")
    return {"samples": counts, "content_hash": users_digest(digests), "phases": ph.seconds}


# ---------------------------------------------------------------------------------------------
# Measurement: one child process per build, process-tree memory sampled by the parent
# ---------------------------------------------------------------------------------------------

IMPLS = ("rosepo", "pandas")


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
    else:
        out = build_samples_pandas(cfg, out_dir)
    res.update(out, seconds=time.perf_counter() - t)
    print("DONE", flush=True)  # the parent stops counting CPU time and peaks here
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
            pss_every: int = 10, users: int = 0) -> dict:
    """Run one build of ``impl`` on the ``copies``x input (of the first ``users`` users, 0: all; see
    `scaled_input`) in a child process and return its result.

    Added to the child's own result: ``peak_rss`` (bytes, summed over the child and all its
    descendants, Ray's included, sampled every ``interval_s``), ``driver_peak_rss`` (the child
    alone: the driver of a Ray build), ``peak_pss`` (the same with PSS,
    every ``pss_every`` samples: shared pages counted once), ``idle_rss`` (the tree once Ray is
    up, before the build), ``cpu_s`` (user + system seconds of the tree during the build, as last
    sampled: the measure of work least disturbed by other load on the machine), ``phase_peak_rss``
    (peak per step, for the builders that report steps) and ``status`` (ok / killed-memory /
    timeout / failed). The tree is killed, process by process, past ``cap_bytes`` or ``timeout_s``.
    """
    import psutil
    import pyarrow.parquet as pq

    inter_path, cat_path = scaled_input(copies, users=users)
    size = f"{copies}x" + (f"-{users}u" if users else "")
    out_dir = WORK / f"out-{impl}-{size}"
    log = WORK / f"log-{impl}-{size}-{time.strftime('%H%M%S')}.txt"
    WORK.mkdir(parents=True, exist_ok=True)
    # The child starts its own Ray: no address of one this process may be connected to.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0")
    with open(log, "w") as err:
        child = subprocess.Popen([sys.executable, "-m", "bench.data_pipeline", "child", impl, str(inter_path),
                                  str(cat_path), str(out_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=err, text=True)
    proc = psutil.Process(child.pid)
    st = {"peak": 0, "driver": 0, "pss": 0, "phase": 0, "status": "ok", "idle": None, "cpu_ready": 0.0,
          "cpu_done": None}
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
                st["driver"] = max(st["driver"], _tree_sum(procs[:1], "rss"))
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
    result.update(impl=impl, copies=copies, rows=pq.read_metadata(inter_path).num_rows, peak_rss=st["peak"],
                  driver_peak_rss=st["driver"], peak_pss=st["pss"],
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


def _ratio(med, ka, kb, field: str) -> str:
    try:
        return f"×{med(kb, field) / med(ka, field):.2f}"
    except (KeyError, TypeError, ZeroDivisionError):  # results of an older run, without the field
        return "-"


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
             "(max) | driver peak RSS MiB | peak PSS MiB | of which idle Ray RSS | Ray start s (not in wall) | samples "
             "| status |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        rows, impl = k
        rs = every[k]
        secs = [r["seconds"] for r in ok[k]]
        rate = f"{rows / med(k, 'seconds'):,.0f}" if secs else "-"
        cpu = f"{med(k, 'cpu_s'):.0f}" if secs else "-"
        peaks = [r["peak_rss"] for r in rs]
        pss = [r["peak_pss"] for r in rs]
        driver = [r.get("driver_peak_rss") for r in rs if r.get("driver_peak_rss")]
        idle = [r["idle_rss"] for r in rs if r.get("idle_rss") and r["impl"] != "pandas"]
        samples = f"{sum(ok[k][0]['samples'].values()):,}" if secs else "-"
        starts = [r["ray_start_s"] for r in rs if "ray_start_s" in r]
        status = ", ".join(sorted({r["status"] for r in rs}))
        lines.append(f"| {rows:,} | {impl} | {len(ok[k])}/{len(rs)} | {_median_spread(secs)} | {rate} | {cpu} | "
                     f"{_fmt_mib(statistics.median(peaks))} ({_fmt_mib(max(peaks))}) | "
                     f"{_fmt_mib(statistics.median(driver)) if driver else '-'} | "
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
        got = {r["content_hash"] for r in ok[k]}
        lines.append(f"| {rows:,} | {impl} | {med(base, 'seconds') / med(k, 'seconds'):.2f} | "
                     f"{med(k, 'cpu_s') / med(base, 'cpu_s'):.2f} | {med(k, 'peak_rss') / med(base, 'peak_rss'):.1f} | "
                     f"{'yes' if got == want and len(want) == 1 else 'NO'} |")
    growth = []
    for impl in IMPLS:
        sizes = [rows for rows, i in keys if i == impl and ok[(rows, i)]]
        for a, b in zip(sizes, sizes[1:]):
            ka, kb = (a, impl), (b, impl)
            growth.append(f"| {impl} | {a:,} → {b:,} (×{b / a:g}) | ×{med(kb, 'seconds') / med(ka, 'seconds'):.1f} | "
                          f"×{med(kb, 'cpu_s') / med(ka, 'cpu_s'):.1f} | "
                          f"×{med(kb, 'peak_rss') / med(ka, 'peak_rss'):.2f} | "
                          f"{_ratio(med, ka, kb, 'driver_peak_rss')} |")
    if growth:
        lines += ["", "| impl | size | wall time | CPU time | peak RSS | driver peak RSS |",
                  "|---|---|---|---|---|---|", *growth]
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


def run(argv: list[str] | None = None) -> int:
    """``python -m bench data [options]``; the defaults (2 × A/B at 100k, A/B once at 1M) are
    what ``make bench`` runs. BENCHMARKS.md gives the commands of the 10M point."""
    import argparse

    import psutil
    import pyarrow.parquet as pq

    from bench.common import machine

    p = argparse.ArgumentParser(prog="python -m bench data", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[1],
                   help="input sizes in copies of ML-100K (1 = 100k interactions) for the A/B runs")
    p.add_argument("--reps", type=int, default=2, help="repetitions per size and implementation (alternated)")
    p.add_argument("--impls", nargs="+", default=["rosepo", "pandas"], choices=IMPLS,
                   help="implementations run alternately at every size")
    p.add_argument("--solo", type=int, nargs="*", default=[10],
                   help="extra sizes (copies) run once per --solo-impls, in turn; e.g. 100 for 10M")
    p.add_argument("--solo-impls", nargs="+", default=["rosepo", "pandas"], choices=IMPLS,
                   help="implementations run once at each --solo size")
    p.add_argument("--users", type=int, default=0,
                   help="only the first N users of ML-100K, before the copies (0: all; a few: a check in seconds)")
    p.add_argument("--cap-gib", type=float, default=None,
                   help="kill a build whose process tree passes this RSS (default: none; a build is always "
                        "killed when the machine's available memory falls under 2 GiB)")
    p.add_argument("--timeout", type=float, default=900.0, help="kill a build running longer (seconds)")
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
    for c in sorted({c for c, _ in plan}):
        t = time.perf_counter()
        inter_path, _ = scaled_input(c, users=args.users)
        print(f"input {c}x ({pq.read_metadata(inter_path).num_rows:,} interactions) ready in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
    results = []
    for c, impl in plan:
        r = measure(impl, c, cap_bytes=cap, timeout_s=args.timeout, users=args.users)
        results.append(r)
        print(f"  {impl:>13} {r['rows']:>11,}: {r.get('seconds', float('nan')):7.1f} s  peak "
              f"{_fmt_mib(r['peak_rss'])} MiB (driver {_fmt_mib(r['driver_peak_rss'])})  "
              f"{r['status']}  {r.get('content_hash', '')[:12]}  "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nmachine at the end: {machine()}\n")
    print(summarise(results))
    failed = [f"{r['impl']} {r['rows']:,}: {r['log']}" for r in results if r["status"] == "failed"]
    if failed:  # a crash, not a limit this benchmark sets (memory, time): the logs say why
        print("failed builds (their logs): " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "child":
        _child(*sys.argv[2:])
    else:
        sys.exit(run(sys.argv[1:]))
