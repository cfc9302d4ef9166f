"""The user documentation's commands run as written, its links resolve, and the README stays a guide.

Every shell command in a fenced code block of README.md, BENCHMARKS.md and docs/*.md that starts
with ``rosepo``, ``python -m rosepo``, ``python jobs/``, ``python -m bench`` or ``python -m tools.``
(also after the ``--`` of ``ray job submit ... -- python jobs/train.py ...``) is checked without
running anything heavy:

- ``rosepo ...`` parses with `rosepo.cli.build_parser` (``jobs/NAME.py`` is the CLI subcommand its
  file passes to `rosepo.cli.main`); ``python -m bench NAME`` names a benchmark of the registry;
  ``python -m tools.NAME`` names a module of tools/;
- every ``key=value`` override loads: `rosepo.config.load_config` of the command's ``--config``
  (for a benchmark without one, the tiny default) with those overrides;
- every path of the repository it names exists. A path is the repository's when its first folder is
  one the repository ships (`REPO_FOLDERS`: configs/, docs/, cluster/, ...); any other path (runs/,
  data/, models/, an absolute path, a file of the user's own such as ``my-data.yaml``) is the
  user's, made by an earlier command or by the user, and is not checked.

docs/record.md is the dated experiment record: its commands are kept as they were run, with the
options of their day, so they are not checked; it may name issue numbers, which the user
documentation must not.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS
from rosepo.cli import build_parser
from rosepo.config import load_config
from rosepo.errors import RosepoError

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "docs" / "record.md"
#: The user documentation: what a user reads and runs.
USER_DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md",
             *sorted(p for p in (REPO / "docs").glob("*.md") if p != RECORD)]
#: Top-level folders the repository ships; a path starting with another folder is the user's.
REPO_FOLDERS = ("bench", "cluster", "configs", "docs", "jobs", "rosepo", "tests", "tools")
#: The command prefixes checked, and a benchmark's config when it names none.
PREFIXES = ("rosepo ", "python -m rosepo ", "python jobs/", "python -m bench ", "python -m tools.")
BENCH_CONFIG = "configs/ml100k-tiny.yaml"
README_MAX_LINES = 250
#: "#14", "issue 14": an issue number (a link's "#6-the-..." anchor is not one).
ISSUE_NUMBER = re.compile(r"#\d+(?![\d-])|\b[Ii]ssues? \d")
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")
FILE_SUFFIX = re.compile(r"\.(ya?ml|json|py|md|txt|cfg|toml)$")


def fenced_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every command with a checked prefix in the fenced code blocks of
    ``text``: continuation lines (a trailing ``\\``) joined, and each command that follows a
    ``--`` separator (``ray job submit ... -- python jobs/train.py ...``) taken on its own."""
    out, fenced, pending, start = [], False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        if not pending:
            start = n
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical, pending = " ".join(pending.split()), ""
        for part in [logical, *logical.split(" -- ")[1:]]:
            if part.startswith(PREFIXES):
                out.append((start, part))
    return out


def doc_commands() -> list[tuple[str, int, str]]:
    return [(p.relative_to(REPO).as_posix(), n, c) for p in USER_DOCS
            for n, c in fenced_commands(p.read_text(encoding="utf-8"))]


COMMANDS = doc_commands()


def is_repo_path(token: str) -> bool:
    """Whether ``token`` names a path of the repository (see the module docstring)."""
    parts = Path(token).parts
    return (len(parts) > 1 or bool(FILE_SUFFIX.search(token))) and parts[0] in REPO_FOLDERS


def _option(words: list[str], name: str) -> str | None:
    for i, w in enumerate(words):
        if w == name and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
    return None


def _load(config: str | None, overrides: list[str]) -> None:
    """Load ``config`` (a repository config, or None: the defaults) with ``overrides``; a config
    of the user's own cannot be read here, so its overrides are checked on the defaults."""
    load_config(config if config is None or is_repo_path(config) else None, overrides)


def check_command(command: str) -> None:
    """Raise AssertionError (or the config's error) unless ``command`` runs as written (module
    docstring). A ``$(...)`` substitution is checked as a command of its own, then left out: what
    it prints (e.g. `tools.small_movielens`' overrides) is only known when it runs."""
    for inner in re.findall(r"\$\(([^()]*)\)", command):
        check_command(inner)
    command = re.sub(r"\$\([^()]*\)", "", command)
    words = shlex.split(command, comments=True)
    missing = [w for w in (w.split("=", 1)[-1] if w.startswith("--") else w for w in words[1:])
               if not OVERRIDE.match(w) and is_repo_path(w) and not (REPO / w).exists()]
    assert not missing, f"names files the repository lacks: {missing}"
    if words[:3] == ["python", "-m", "bench"]:
        name = words[3] if len(words) > 3 else ""
        assert name in BENCHMARKS or name == "all", f"no benchmark {name!r}; bench/__main__.py has {sorted(BENCHMARKS)}"
        _load(_option(words, "--config") or BENCH_CONFIG, [w for w in words[4:] if OVERRIDE.match(w)])
        return
    if words[:2] == ["python", "-m"] and words[2].startswith("tools."):
        module = words[2].removeprefix("tools.")
        assert (REPO / "tools" / f"{module}.py").is_file(), f"no module tools/{module}.py"
        return
    if words[:3] == ["python", "-m", "rosepo"]:
        assert (REPO / "rosepo" / "__main__.py").is_file(), "python -m rosepo needs rosepo/__main__.py"
        argv = words[3:]
    elif words[0] == "python" and words[1].startswith("jobs/"):
        job = (REPO / words[1]).read_text(encoding="utf-8")
        sub = re.search(r'main\(\["([\w-]+)", \*sys\.argv\[1:\]\]\)', job)
        assert sub, f"{words[1]} does not delegate to rosepo.cli.main([COMMAND, *sys.argv[1:]])"
        argv = [sub.group(1), *words[2:]]
    else:
        argv = words[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 0, f"rosepo's parser refuses {argv} (exit {e.code}; its message is above)"
        return
    if args.command == "bench":
        assert args.name in BENCHMARKS or args.name == "all", f"no benchmark {args.name!r}"
    if hasattr(args, "overrides"):
        _load(args.config, args.overrides)


@pytest.mark.parametrize("where,line,command", COMMANDS, ids=[f"{w}:{n}" for w, n, _ in COMMANDS])
def test_command_runs_as_written(where, line, command):
    check_command(command)


def test_the_docs_have_commands_to_check():
    """The extraction finds the commands (an empty list would pass every check above)."""
    readme = [c for w, _, c in COMMANDS if w == "README.md"]
    assert len(readme) >= 10 and any(c.startswith("python jobs/train.py") for c in readme)
    assert {w for w, _, _ in COMMANDS} >= {"README.md", "BENCHMARKS.md", "docs/alignment.md"}


def test_every_benchmark_has_a_section_with_its_command():
    text = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    ran = {c.split()[3] for w, _, c in COMMANDS if w == "BENCHMARKS.md" and c.startswith("python -m bench ")}
    assert sorted(set(BENCHMARKS) - ran) == []
    assert all(f"(`{name}`)" in text for name in BENCHMARKS)


def test_fenced_commands_joins_lines_and_reads_past_ray_job_submit():
    text = ("prose `rosepo run` is not a block\n```\n# comment\nrosepo run --config a.yaml \\\n"
            "    x=1   # trailing comment\nray job submit --working-dir . -- python jobs/train.py --config b.yaml\n"
            "make run\n```\nrosepo eval\n")
    assert fenced_commands(text) == [(4, "rosepo run --config a.yaml x=1 # trailing comment"),
                                     (6, "python jobs/train.py --config b.yaml")]


def test_check_command_refuses_what_does_not_run():
    check_command("rosepo run --config configs/ml100k-tiny.yaml align.beta=0.2")
    check_command("rosepo recommend --run runs/mine --history Fargo")  # runs/ is the user's
    check_command("rosepo run --config configs/ml100k-tiny.yaml $(python -m tools.small_movielens /tmp/s) name=x")
    bad = ["rosepo run --config configs/ml100k-tiny.yaml $(python -m tools.nope /tmp/s)",  # checked inside too
           "rosepo run --config configs/ml100k-tiny.yaml $(python -m tools.small_movielens /tmp/s) nme=x",
           "rosepo run --config configs/nope.yaml",  # a repository file that does not exist
           "rosepo run --config configs/ml100k-tiny.yaml align.bta=0.2",  # no such key
           "rosepo recomend --run runs/x",  # no such command
           "python -m bench nope",
           "python -m tools.nope cluster/config.yaml"]
    for command in bad:
        with pytest.raises((AssertionError, RosepoError)):
            check_command(command)


def test_relative_links_resolve():
    """Every relative Markdown link of the user documentation and the record names an existing
    file, and its #anchor a heading of that file (GitHub's anchors)."""
    broken = []
    for doc in [*USER_DOCS, RECORD]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.name}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert broken == []


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown file."""
    out, seen, fenced = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_is_a_short_guide():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


def test_user_documentation_names_no_issue_numbers():
    """Issue numbers belong to the experiment record (docs/record.md), not to what a user reads."""
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in USER_DOCS
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ISSUE_NUMBER.search(line)]
    assert found == []
