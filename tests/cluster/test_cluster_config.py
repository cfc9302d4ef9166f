"""cluster/config.yaml: valid for Ray's own launcher, closed to the network, pinned like the repo.

The config is checked twice against Ray's schema: through Ray's own `prepare_config` +
`validate_config` (what `ray up` runs before it touches AWS) and through jsonschema on the file
as written. Its security is checked by `tools.cluster_check.check_cluster_security`, which the
negative tests show refuses each way of exposing a Ray port.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from tools.cluster_check import check_cluster_security

ROOT = Path(__file__).resolve().parents[2]
CONFIG_PATH = ROOT / "cluster" / "config.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG_PATH.read_text(encoding="utf-8"))


def _pin(name: str) -> str:
    """Version pinned for ``name`` (extras allowed) in the repository's requirements.txt."""
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==(\S+)", line.strip())
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned in requirements.txt")


def _all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key) or []]


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# --- Ray's own validation -------------------------------------------------------------------

def test_ray_prepares_and_validates_the_config(config):
    """What `ray up` does before any AWS call: merge the AWS defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # raises on any schema or consistency error
    # Our lists replace Ray's defaults instead of being merged with them: no Ray default
    # (which binds the dashboard to 0.0.0.0) survives.
    assert prepared["head_start_ray_commands"] == config["head_start_ray_commands"]
    merged_head_setup = config["setup_commands"] + config["head_setup_commands"]
    assert prepared["head_setup_commands"] == merged_head_setup
    assert prepared["available_node_types"]["head"]["max_workers"] == 0
    assert check_cluster_security(prepared) == []


def test_config_as_written_matches_rays_json_schema(config):
    import jsonschema

    schema = _ray_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert [e.message for e in validator.iter_errors(config)] == []


def test_schema_catches_a_misspelt_security_group_key(config):
    """A typo must not silently drop the ingress rules: Ray's schema allows no extra keys."""
    import jsonschema

    bad = copy.deepcopy(config)
    bad["provider"]["security_group"]["IpPermission"] = bad["provider"]["security_group"].pop(
        "IpPermissions")
    with pytest.raises(jsonschema.ValidationError, match="IpPermission"):
        jsonschema.validate(bad, _ray_schema())


# --- security properties of the committed file ----------------------------------------------

def test_config_has_no_security_problems(config):
    assert check_cluster_security(config) == []


def test_only_ssh_is_open_and_not_to_the_world(config):
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in rules] == [("tcp", 22, 22)]
    cidrs = [ip["CidrIp"] for ip in rules[0]["IpRanges"]] + [
        ip["CidrIpv6"] for ip in rules[0].get("Ipv6Ranges", [])]
    assert cidrs and not {"0.0.0.0/0", "::/0"} & set(cidrs)
    node_types = config["available_node_types"].values()
    assert all("SecurityGroupIds" not in t["node_config"] for t in node_types)


def test_dashboard_on_loopback_and_token_auth_on_every_ray_start(config):
    head_start = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    worker_start = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert len(head_start) == 1 and len(worker_start) == 1
    assert "--dashboard-host=127.0.0.1" in head_start[0]
    assert "RAY_AUTH_MODE=token ray start --head" in head_start[0]
    assert "RAY_AUTH_MODE=token ray start --address=" in worker_start[0]
    # Every node gets the token that `ray start` with RAY_AUTH_MODE=token requires.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


# --- installation matches the repository ---------------------------------------------------

def test_setup_installs_like_the_makefile(config):
    """torch first (so pip never resolves another torch), then the pins, then the package."""
    setup = config["setup_commands"]
    torch_step = setup.index(f"pip install torch=={_pin('torch')}")
    assert _pin("torch") == "2.13.0"
    requirements_step = setup.index("cd ~/rosepo && pip install -r requirements.txt")
    package_step = setup.index("cd ~/rosepo && pip install -e .")
    assert torch_step < requirements_step < package_step
    assert config["file_mounts"]["~/rosepo"] == "."


def test_cluster_runs_the_ray_pinned_in_requirements(config):
    """Ray reaches the nodes through requirements.txt; nothing in the config pins another one,
    and the Ray whose schema validated the file above is that same version."""
    import ray

    pinned = _pin("ray")
    assert pinned == "2.60.0" == ray.__version__
    other_pins = {m.group(2) for cmd in _all_commands(config)
                  for m in re.finditer(r"\bray(\[[^\]]*\])?==([\w.]+)", cmd)}
    assert other_pins <= {pinned}
    assert "ray[default,train,data,tune]==2.60.0" in (ROOT / "requirements.txt").read_text()


def test_sync_leaves_out_the_virtualenv(config):
    """`file_mounts` of "." would upload the 1.8 GB .venv without the .gitignore filter."""
    assert ".gitignore" in config["rsync_filter"]
    assert ".venv/" in (ROOT / ".gitignore").read_text().splitlines()


# --- the checker refuses each way of exposing a port -----------------------------------------

def _open(config: dict, rule: dict) -> dict:
    bad = copy.deepcopy(config)
    bad["provider"]["security_group"]["IpPermissions"].append(rule)
    return bad


def _replace_start(config: dict, key: str, old: str, new: str) -> dict:
    bad = copy.deepcopy(config)
    bad[key] = [c.replace(old, new) for c in bad[key]]
    return bad


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: _open(c, {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265,
                         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}),
     ["opens tcp port 8265 to 0.0.0.0/0", "whole internet (0.0.0.0/0)"]),
    (lambda c: _open(c, {"IpProtocol": "tcp", "FromPort": 6379, "ToPort": 6379,
                         "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}),
     ["opens tcp port 6379 to ::/0", "whole internet (::/0)"]),
    # A narrow range is still refused for a Ray port: only SSH may face outside.
    (lambda c: _open(c, {"IpProtocol": "tcp", "FromPort": 10001, "ToPort": 10001,
                         "IpRanges": [{"CidrIp": "198.51.100.7/32"}]}),
     ["opens tcp port 10001 to 198.51.100.7/32"]),
    (lambda c: _open(c, {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}),
     ["opens all ports to 10.0.0.0/8"]),
    (lambda c: _open(c, {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}),
     ["whole internet (0.0.0.0/0)"]),
    (lambda c: _replace_start(c, "head_start_ray_commands", "--dashboard-host=127.0.0.1",
                              "--dashboard-host=0.0.0.0"),
     ["dashboard binds to 0.0.0.0"]),
    (lambda c: _replace_start(c, "head_start_ray_commands", " --dashboard-host=127.0.0.1", ""),
     ["dashboard binds to (Ray default)"]),
    (lambda c: _replace_start(c, "head_start_ray_commands", "RAY_AUTH_MODE=token",
                              "RAY_AUTH_MODE=disabled"),
     ["head_start_ray_commands: `ray start` runs with RAY_AUTH_MODE=disabled"]),
    (lambda c: _replace_start(c, "worker_start_ray_commands", "RAY_AUTH_MODE=token ", ""),
     ["worker_start_ray_commands: `ray start` runs with RAY_AUTH_MODE=(unset)"]),
    (lambda c: {**c, "worker_start_ray_commands": ["ray stop"]},
     ["worker_start_ray_commands has no `ray start`"]),
], ids=["dashboard-world", "gcs-ipv6-world", "client-port-narrow", "all-ports", "ssh-world",
        "dashboard-0.0.0.0", "dashboard-implicit", "auth-disabled", "worker-auth-unset",
        "worker-no-start"])
def test_checker_refuses_exposed_configs(config, mutate, expected):
    problems = check_cluster_security(mutate(config))
    assert len(problems) == len(expected), problems
    for fragment, problem in zip(expected, problems):
        assert fragment in problem


def test_checker_refuses_rules_kept_outside_the_file(config):
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["node_config"]["SecurityGroupIds"] = ["sg-0abc"]
    [problem] = check_cluster_security(bad)
    assert problem.startswith("available_node_types.gpu_worker.node_config sets SecurityGroupIds")


@pytest.mark.parametrize("command", [
    "export RAY_AUTH_MODE=token; ray start --head --dashboard-host 127.0.0.1",
    "ulimit -n 65536 && RAY_AUTH_MODE=token ~/venv/bin/ray start --head --dashboard-host=localhost",
])
def test_checker_reads_other_spellings_of_a_safe_start(config, command):
    """Exported or prefixed variables, `--flag value` or `--flag=value`, a path to `ray`."""
    assert check_cluster_security({**config, "head_start_ray_commands": [command]}) == []


def test_an_export_does_not_leak_into_the_next_command(config):
    """Each start-command list item runs in its own shell."""
    head = ["export RAY_AUTH_MODE=token", "ray start --head --dashboard-host=127.0.0.1"]
    [problem] = check_cluster_security({**config, "head_start_ray_commands": head})
    assert "RAY_AUTH_MODE=(unset)" in problem


# --- a run config against the cluster -------------------------------------------------------

def test_the_7b_config_fits_the_cluster_as_written(config):
    """configs/llama-7b-lora.yaml on cluster/config.yaml: it joins the cluster, its 8 GPU workers fit
    two of the four 4-GPU nodes, its paths lie on the EFS mount every node's setup makes, and its
    training stages wait for GPU nodes booting from zero."""
    from rosepo.config import load_config
    from tools.cluster_check import check_run_fits, main

    run = load_config(ROOT / "configs" / "llama-7b-lora.yaml")
    assert check_run_fits(config, run) == []
    assert main([str(CONFIG_PATH), str(ROOT / "configs" / "llama-7b-lora.yaml")]) == 0


@pytest.mark.parametrize(("overrides", "expected"), [
    (["sft.num_workers=17"], "sft needs 17 GPU workers"),
    (["storage=/tmp/runs"], "storage /tmp/runs is not on a filesystem every node mounts (/mnt/rosepo)"),
    (["align.start_timeout_s=60"], "align.start_timeout_s is 60 s; GPU nodes start from zero"),
    (["ray_address=''"], "ray_address is ''"),
    (["eval.num_actors=40"], "eval needs 40 GPU workers"),
])
def test_run_configs_that_would_not_start_are_refused_naming_why(config, overrides, expected):
    from rosepo.config import load_config
    from tools.cluster_check import check_run_fits

    problems = check_run_fits(config, load_config(ROOT / "configs" / "llama-7b-lora.yaml", overrides))
    assert any(expected in p for p in problems), problems
