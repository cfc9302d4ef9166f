"""The methods of ``rosepo compare`` as config values: which pairs each trains on and its
``align.*`` settings, the seeds and the number of alignment steps (pure functions of a config)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rosepo.config import METHOD_NAMES, RunConfig, apply_values

#: The strategies of RosePO's mix of rejected samples (RosePO §3.2).
MIX = ("self_hard", "semantic", "popularity")

#: Pair builds, as ``pairs.*`` values: ``mix`` holds one pair per strategy per sample, ``sdpo``
#: three random negatives per prompt. Both select the same samples (``pairs.seed``).
PAIR_BUILDS: dict[str, dict] = {
    "mix": {"pairs.mix": "all", "pairs.strategies": {s: 1.0 for s in (*MIX, "random")},
            "pairs.num_negatives": 1},
    "sdpo": {"pairs.mix": "all", "pairs.strategies": {"random": 1.0}, "pairs.num_negatives": 3},
}


@dataclass(frozen=True)
class Method:
    """A trained method: the pair build it trains on, its ``align.*`` values, what it is."""

    pairs: str
    align: dict = field(hash=False)
    text: str = ""


def _rosepo(strategies: tuple[str, ...], smoothing: str, text: str) -> Method:
    return Method("mix", {"align.loss": "rosepo", "align.smoothing": smoothing,
                          "align.strategies": list(strategies)}, text)


#: The trained methods, in table order.
METHODS: dict[str, Method] = {
    "dpo": Method("mix", {"align.loss": "dpo", "align.strategies": ["random"]},
                  "DPO: one random negative, ε = 0"),
    "cdpo": Method("mix", {"align.loss": "cdpo", "align.strategies": ["random"]},
                   "cDPO: one random negative, constant ε = align.eps_constant"),
    "sdpo": Method("sdpo", {"align.loss": "sdpo", "align.strategies": ["random"]},
                   "S-DPO: 3 random negatives, softmax (logsumexp) loss, ε = 0"),
    "rosepo": _rosepo(MIX, "personalized", "RosePO: self_hard + semantic + popularity negatives, personalised ε"),
    **{f"rosepo-{s}": _rosepo((s,), "personalized", f"RosePO with {s} negatives only, personalised ε")
       for s in MIX},
    "rosepo-no-smoothing": _rosepo(MIX, "none", "RosePO's negatives, ε = 0 (DPO loss)"),
    "rosepo-constant-eps": _rosepo(MIX, "constant", "RosePO's negatives, constant ε = align.eps_constant"),
}

if tuple(METHODS) != METHOD_NAMES:  # config checks compare.methods against METHOD_NAMES at load time
    raise RuntimeError(f"rosepo.config.METHOD_NAMES {METHOD_NAMES} must list METHODS {tuple(METHODS)} in order")


def selected_methods(cfg: RunConfig) -> list[str]:
    """The methods ``compare.methods`` names (all when empty), in `METHODS` order."""
    chosen = set(cfg.compare.methods) or set(METHODS)
    return [m for m in METHODS if m in chosen]


def seeds(cfg: RunConfig) -> list[int]:
    """The alignment seeds: ``align.seed``, ``align.seed + 1``, ... (``compare.seeds`` of them)."""
    return [cfg.align.seed + i for i in range(cfg.compare.seeds)]


def pairs_config(cfg: RunConfig, build: str) -> RunConfig:
    """``cfg`` with the ``pairs`` values of a pair build (`PAIR_BUILDS`)."""
    return apply_values(cfg, PAIR_BUILDS[build])


def cell_config(cfg: RunConfig, method: str, seed: int, steps: int) -> RunConfig:
    """The run config of one cell: ``cfg`` with the method's pair build and ``align.*`` values,
    ``align.seed = seed`` and ``align.max_steps = steps``. The in-training evaluation is cut to
    the held-out pairs before and after training (``align.eval_every = 0``,
    ``align.eval_rec_samples = 0``): it changes nothing in the training, the cell is evaluated
    on ``eval.split`` anyway, and on 2 cores it costs seconds per run."""
    m = METHODS[method]
    return apply_values(cfg, {**PAIR_BUILDS[m.pairs], **m.align, "align.seed": seed, "align.max_steps": steps,
                              "align.eval_every": 0, "align.eval_rec_samples": 0})


def align_steps(cfg: RunConfig, train_samples: int) -> int:
    """``compare.align_steps``, or when 0 one epoch over one pair per train sample."""
    a = cfg.align
    return cfg.compare.align_steps or max(1, math.ceil(train_samples / (a.num_workers * a.micro_batch_size
                                                                         * a.grad_accum)))
