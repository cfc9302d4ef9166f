"""What rosepo relies on in DeepSpeed beyond its public API, and the configs it ships."""

from __future__ import annotations

import importlib.resources

import pytest

from rosepo.config import SFTConfig
from rosepo.train import zero_config


def test_shm_comm_op_is_where_skip_shm_comm_build_marks_it():
    """`skip_shm_comm_build` writes into DeepSpeed's private ``ops.__compatible_ops__``; a DeepSpeed
    release that renames it (or the op) fails here, not as a silent 30-second compile per worker."""
    import deepspeed
    import deepspeed.ops

    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    assert isinstance(ops, dict) and zero_config.SHM_COMM_OP in ops, (
        f"DeepSpeed {deepspeed.__version__} has no ops.__compatible_ops__[{zero_config.SHM_COMM_OP!r}]: "
        "update rosepo.train.zero_config.skip_shm_comm_build")
    saved = ops[zero_config.SHM_COMM_OP]
    try:
        assert zero_config.skip_shm_comm_build() is True and ops[zero_config.SHM_COMM_OP] is False
    finally:
        ops[zero_config.SHM_COMM_OP] = saved


def test_deepspeed_templates_are_package_data():
    shipped = importlib.resources.files("rosepo.train") / "deepspeed"
    names = sorted(p.name for p in shipped.iterdir() if p.name.endswith(".json"))
    assert names == ["zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"]
    # The path configs used before the templates moved into the package still names them.
    old_path = SFTConfig(deepspeed_config="configs/deepspeed/zero3.json", zero_stage=3)
    old = zero_config.deepspeed_config(old_path, bf16=False)
    assert old["zero_optimization"]["stage3_prefetch_bucket_size"] == 50000000
    with pytest.raises(Exception, match="does not exist"):
        zero_config.deepspeed_config(SFTConfig(deepspeed_config="configs/deepspeed/zero9.json"), bf16=False)
