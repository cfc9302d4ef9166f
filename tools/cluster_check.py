"""Checks of a Ray cluster-launcher config (``cluster/config.yaml``): its security, and whether a
run config fits it (`check_run_fits`). ``python -m tools.cluster_check CLUSTER.yaml [RUN.yaml]``
prints the problems of both and exits 1 when there are any.

Anyone who can reach a Ray port (GCS 6379, dashboard and job API 8265, client server 10001,
the raylet, object-manager and worker ports) can run arbitrary code on every node. A `ray up`
config exposes them in three ways, and `check_cluster_security` refuses each:

- a security-group rule that opens anything but SSH (tcp 22) to outside addresses, or opens
  SSH to the whole internet (a ``/0`` range);
- ``ray start --head`` with a dashboard bound to anything but loopback;
- a ``ray start`` (head or worker) without ``RAY_AUTH_MODE=token``.

It reads the config only and never calls AWS, so what it cannot see it reports rather than
assumes safe: a node type with ``SecurityGroupIds`` keeps its rules outside the file. Nor can it
see the rule Ray itself adds when it *creates* the group (tcp 22 from 0.0.0.0/0); the runbook
in ``cluster/README.md`` creates the group beforehand for that reason.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import sys
from pathlib import Path
from typing import Iterator

#: Dashboard bind addresses that only the node itself can reach.
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
SSH_PORT = 22

_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SEPARATORS = frozenset({";", "&&", "||", "|", "&", "(", ")"})


def check_cluster_security(config: dict) -> list[str]:
    """Return the security problems of a `ray up` config, each naming the remedy; [] if none.

    ``config`` is the YAML as loaded (``yaml.safe_load``), before or after Ray fills in defaults.
    """
    problems: list[str] = []
    provider = config.get("provider") or {}
    rules = (provider.get("security_group") or {}).get("IpPermissions") or []
    for i, rule in enumerate(rules):
        problems += _rule_problems(rule, f"provider.security_group.IpPermissions[{i}]")
    for name, node_type in (config.get("available_node_types") or {}).items():
        if "SecurityGroupIds" in (node_type.get("node_config") or {}):
            problems.append(
                f"available_node_types.{name}.node_config sets SecurityGroupIds: those groups' "
                "rules live outside this file and were not checked; remove it and describe the "
                "rules in provider.security_group")
    problems += _start_problems(config.get("head_start_ray_commands") or [],
                                "head_start_ray_commands", head=True)
    problems += _start_problems(config.get("worker_start_ray_commands") or [],
                                "worker_start_ray_commands", head=False)
    return problems


def _rule_problems(rule: dict, where: str) -> list[str]:
    """Problems of one EC2 ingress rule. Rules whose only sources are security groups
    (``UserIdGroupPairs``) are traffic inside the cluster and always allowed."""
    cidrs = [r.get("CidrIp", "") for r in rule.get("IpRanges") or []]
    cidrs += [r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges") or []]
    prefix_lists = [r.get("PrefixListId", "") for r in rule.get("PrefixListIds") or []]
    if not cidrs and not prefix_lists:
        return []
    problems = []
    protocol = str(rule.get("IpProtocol", "")).lower()
    ssh_only = protocol in ("tcp", "6") and rule.get("FromPort") == SSH_PORT == rule.get("ToPort")
    if not ssh_only:
        problems.append(
            f"{where} opens {_ports(rule)} to {', '.join(cidrs + prefix_lists)}: only SSH "
            "(tcp 22) may be reachable from outside the cluster; reach the dashboard and job "
            "API through the SSH tunnel of `ray dashboard cluster/config.yaml`")
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            problems.append(f"{where}: {cidr!r} is not a CIDR range")
            continue
        if network.prefixlen == 0:
            problems.append(
                f"{where} is open to the whole internet ({cidr}): restrict it to your own "
                "address range, e.g. 198.51.100.7/32")
    return problems


def _ports(rule: dict) -> str:
    protocol = str(rule.get("IpProtocol", "")).lower()
    if protocol in ("-1", "all"):
        return "all ports"
    low, high = rule.get("FromPort"), rule.get("ToPort")
    return f"{protocol} port {low}" if low == high else f"{protocol} ports {low}-{high}"


def _start_problems(commands: list[str], key: str, *, head: bool) -> list[str]:
    """Problems of the ``ray start`` invocations in one start-command list."""
    problems = []
    starts = [start for command in commands for start in _ray_starts(command)]
    if head and not any("--head" in args for _, args in starts):
        problems.append(f"{key} has no `ray start --head`, so its flags cannot be checked")
    if not head and not starts:
        problems.append(f"{key} has no `ray start`, so its authentication cannot be checked")
    for env, args in starts:
        mode = env.get("RAY_AUTH_MODE")
        if mode != "token":
            problems.append(
                f"{key}: `ray start` runs with RAY_AUTH_MODE={mode or '(unset)'}; prefix it "
                "with RAY_AUTH_MODE=token so every Ray port demands the cluster's token")
        if "--head" in args:
            host = _flag(args, "--dashboard-host")
            if host not in LOOPBACK:
                problems.append(
                    f"{key}: the dashboard binds to {host or '(Ray default)'}; pass "
                    "--dashboard-host=127.0.0.1 explicitly and reach it through "
                    "`ray dashboard cluster/config.yaml`")
    return problems


def _ray_starts(command: str) -> Iterator[tuple[dict, list[str]]]:
    """Yield ``(environment, arguments)`` of each ``ray start`` in a shell command line.

    The environment holds variables exported earlier on the same line and those assigned as a
    prefix of the command. Each list item is a separate shell, so nothing carries across items.
    """
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    exported: dict[str, str] = {}
    segment: list[str] = []
    for token in [*lexer, ";"]:
        if token not in _SEPARATORS:
            segment.append(token)
            continue
        prefix = {}
        while segment and _ASSIGNMENT.match(segment[0]):
            name, value = segment.pop(0).split("=", 1)
            prefix[name] = value
        if segment[:1] == ["export"]:
            exported.update(a.split("=", 1) for a in segment[1:] if _ASSIGNMENT.match(a))
        elif len(segment) >= 2 and segment[0].rsplit("/", 1)[-1] == "ray" and segment[1] == "start":
            yield {**exported, **prefix}, segment[2:]
        segment = []


def _flag(args: list[str], name: str) -> str | None:
    """Value of ``--name=value`` or ``--name value`` in ``args``; None when absent."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


#: Seconds a GPU node of an autoscaling cluster takes from launch to a placed Ray worker (boot,
#: setup commands, ``ray start``): about 10 minutes on AWS g5 nodes.
NODE_BOOT_S = 600


def check_run_fits(cluster: dict, run) -> list[str]:
    """Return why the run config ``run`` (a validated `rosepo.config.RunConfig`) would not start on
    the cluster of ``cluster`` (the launcher YAML as loaded), each naming the remedy; [] if it fits.

    Checked: the run joins the cluster (``ray_address: auto``); each stage's GPU workers or actors
    (one GPU and the stage's CPUs each) fit on the node types at their ``max_workers``; its storage,
    data and model paths lie on a filesystem the setup commands mount on every node; and, where GPU
    nodes start from zero (``min_workers: 0``), each training stage waits for them
    (``start_timeout_s`` >= `NODE_BOOT_S`).
    """
    problems = []
    if run.ray_address != "auto":
        problems.append(f"ray_address is {run.ray_address!r}: a job on the cluster joins it with ray_address: auto")
    nodes = [(name, t.get("resources") or {}, int(t.get("max_workers", 0)), int(t.get("min_workers", 0)))
             for name, t in (cluster.get("available_node_types") or {}).items()]
    cpus_of = {"oracle": 1.0, "sft": run.sft.cpus_per_worker, "align": run.align.cpus_per_worker,
               "pairs": 1.0, "eval": 1.0}
    for stage, gpus in run.gpu_demand().items():
        fit = sum(count * int(min(res.get("GPU", 0), res.get("CPU", 0) // cpus_of[stage]))
                  for _, res, count, _ in nodes)
        if gpus > fit:
            problems.append(f"{stage} needs {gpus} GPU workers (1 GPU and {cpus_of[stage]:g} CPUs each); the node "
                            f"types hold at most {fit}: lower its workers/actors or raise max_workers")
    mounts = _mount_points(cluster.get("setup_commands") or [])
    paths = {"storage": run.storage, "data.data_dir": run.data.data_dir, "model.name_or_path": run.model.name_or_path}
    for key, path in paths.items():
        if path.startswith("/") and not any(Path(path).is_relative_to(m) for m in mounts):
            problems.append(f"{key} {path} is not on a filesystem every node mounts ({', '.join(mounts) or 'none'}); "
                            "put it under the shared mount of setup_commands")
        elif key == "storage" and not path.startswith("/"):
            problems.append(f"storage {path!r} is relative: each node would write its own; use the shared mount")
    if any(res.get("GPU") and low == 0 for _, res, _, low in nodes):
        for stage in ("sft", "align"):
            timeout = getattr(run, stage).start_timeout_s
            if getattr(run, stage).use_gpu and timeout < NODE_BOOT_S:
                problems.append(f"{stage}.start_timeout_s is {timeout:g} s; GPU nodes start from zero and take about "
                                f"{NODE_BOOT_S} s to boot: set it to {NODE_BOOT_S * 2} or more")
    return problems


def _mount_points(commands: list[str]) -> list[str]:
    """The mount points of the ``mount`` commands in the setup commands (the last argument of each)."""
    points = []
    for command in commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        segment: list[str] = []
        for token in [*lexer, ";"]:
            if token not in _SEPARATORS:
                segment.append(token)
                continue
            words = segment[1:] if segment[:1] == ["sudo"] else segment
            if words[:1] == ["mount"] and len(words) > 2:
                points.append(words[-1])
            segment = []
    return points


def main(argv: list[str]) -> int:
    """Print the security problems of a cluster config and, given a run config, why it does not fit."""
    import yaml

    if not 1 <= len(argv) <= 2:
        print("usage: python -m tools.cluster_check CLUSTER.yaml [RUN.yaml]", file=sys.stderr)
        return 2
    cluster = yaml.safe_load(Path(argv[0]).read_text(encoding="utf-8"))
    problems = check_cluster_security(cluster)
    if len(argv) == 2:
        from rosepo.config import load_config

        problems += check_run_fits(cluster, load_config(argv[1]))
    for p in problems:
        print(f"- {p}")
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
