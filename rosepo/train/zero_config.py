"""DeepSpeed for the training loop: the config templates shipped with the package, filled with
rosepo's training fields, and the one write into DeepSpeed's private state.

A template (``deepspeed_config``, or ``rosepo/train/deepspeed/zero{stage}.json``) gives everything
rosepo does not set (bucket sizes, offload device, ...); the batch sizes, clipping, precision,
ZeRO stage and offload always come from the rosepo config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rosepo.config import TrainConfig
from rosepo.errors import ConfigError

log = logging.getLogger(__name__)

#: The DeepSpeed config templates shipped with the package (``zero0.json`` ... ``zero3_offload.json``).
DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"
#: Where the templates lived before they became package data; a ``deepspeed_config`` naming one still works.
_OLD_DEEPSPEED_DIR = Path("configs") / "deepspeed"
#: The op `skip_shm_comm_build` marks incompatible in DeepSpeed's private ``ops.__compatible_ops__``,
#: and the DeepSpeed releases that layout was checked on.
SHM_COMM_OP = "deepspeed_shm_comm"
SHM_COMM_CHECKED = ("0.19.",)



def skip_shm_comm_build() -> bool:
    """Mark DeepSpeed's shared-memory comm op incompatible so ``deepspeed.initialize`` does not
    JIT-compile it (~31 s on 2 CPU cores; ZeRO here never uses it). True when it was marked.

    ``deepspeed.ops.__compatible_ops__`` is private (DeepSpeed 0.19: ``{op name: bool}``); when a
    release renames it or the op, nothing is written and the compile merely costs its time
    (tests/train/test_deepspeed.py fails on the DeepSpeed version that does it).
    """
    import deepspeed
    import deepspeed.ops

    version = getattr(deepspeed, "__version__", "?")
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if not version.startswith(SHM_COMM_CHECKED):
        log.debug("deepspeed %s: ops.__compatible_ops__ was checked on %s only", version, SHM_COMM_CHECKED)
    if not isinstance(ops, dict) or SHM_COMM_OP not in ops:
        log.warning("deepspeed %s has no ops.__compatible_ops__[%r]: its shared-memory op may be "
                    "compiled at initialize", version, SHM_COMM_OP)
        return False
    ops[SHM_COMM_OP] = False
    return True


def deepspeed_config(train_cfg: TrainConfig, *, bf16: bool) -> dict:
    """The DeepSpeed config: the template file with rosepo's training fields written over it."""
    path = Path(train_cfg.deepspeed_config) if train_cfg.deepspeed_config \
        else DEEPSPEED_DIR / f"zero{train_cfg.zero_stage}.json"
    if not path.is_file() and not path.is_absolute() and path.parent == _OLD_DEEPSPEED_DIR:
        path = DEEPSPEED_DIR / path.name  # configs/deepspeed/zeroN.json: now package data
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist; set deepspeed_config to a "
                          f"JSON file such as {DEEPSPEED_DIR / 'zero2.json'} or to \"\"")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if train_cfg.offload and train_cfg.zero_stage == 0:
        raise ConfigError("offload needs zero_stage 1, 2 or 3 (ZeRO-Offload partitions the optimizer)")
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two fields below
    ds["train_micro_batch_size_per_gpu"] = train_cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = train_cfg.grad_accum
    ds["gradient_clipping"] = train_cfg.max_grad_norm
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds["fp16"] = {"enabled": False}
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = train_cfg.zero_stage
    offload_keys = ["offload_optimizer"] + (["offload_param"] if train_cfg.zero_stage == 3 else [])
    for key in ("offload_optimizer", "offload_param"):
        section = zero.pop(key, None)
        if train_cfg.offload and key in offload_keys:
            section = {"device": "cpu", **(section or {})}
            section["pin_memory"] = bool(section.get("pin_memory", True) and train_cfg.use_gpu)
            zero[key] = section
    if train_cfg.offload:
        # The client optimizer is torch's AdamW (no compiled op); DeepSpeed would insist on
        # DeepSpeedCPUAdam, which compiles for ~50 s, unless told otherwise.
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds
