"""Security checks of a Ray cluster-launcher config (``cluster/config.yaml``).

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
