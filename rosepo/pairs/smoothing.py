"""The personalised smoothing factor ε of RosePO, from a preference oracle's scores.

    ε = clip(λ · (1 − σ((s_chosen − s_rejected) / τ)), 0, ε_max)

where s are the oracle's (SASRec's) scores of chosen and rejected for the user's history.
When the oracle is confident the user prefers chosen (large positive margin) σ → 1 and ε → 0:
the label is kept hard. When it doubts (margin ≤ 0) ε grows towards λ/2 and beyond, capped at
ε_max < 0.5: the label is softened, since the "rejected" item may well be one the user likes
(RosePO, Liao et al. 2024, §3.3). ε is monotone non-increasing in the margin.

Modes: ``personalized`` (above), ``constant`` (cDPO: the same ε for every pair), ``none`` (DPO).
With K rejected items the margin uses the rejected items' mean oracle score.
"""

from __future__ import annotations

import numpy as np


def personalized_eps(s_chosen: np.ndarray, s_rejected: np.ndarray, *, lam: float, tau: float,
                     eps_max: float) -> np.ndarray:
    """ε per pair from oracle scores (``s_rejected`` may be (N,) or (N, K): then its mean is used)."""
    if not 0 <= eps_max < 0.5:
        raise ValueError(f"eps_max must be in [0, 0.5), got {eps_max}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    s_chosen = np.asarray(s_chosen, dtype=np.float64)
    s_rejected = np.asarray(s_rejected, dtype=np.float64)
    if s_rejected.ndim == s_chosen.ndim + 1:
        s_rejected = s_rejected.mean(axis=-1)
    margin = (s_chosen - s_rejected) / tau
    sig = 0.5 * (1.0 + np.tanh(0.5 * margin))  # σ without overflow warnings
    return np.clip(lam * (1.0 - sig), 0.0, eps_max)


def smoothing_eps(mode: str, s_chosen: np.ndarray, s_rejected: np.ndarray, *, lam: float, tau: float,
                  eps_max: float, eps_constant: float) -> np.ndarray:
    """ε per pair for a mode: ``personalized``, ``constant`` (cDPO) or ``none`` (DPO)."""
    n = len(np.asarray(s_chosen))
    if mode == "personalized":
        return personalized_eps(s_chosen, s_rejected, lam=lam, tau=tau, eps_max=eps_max)
    if mode == "constant":
        return np.full(n, float(eps_constant))
    if mode == "none":
        return np.zeros(n)
    raise ValueError(f"unknown smoothing mode {mode!r}; expected personalized, constant or none")


def eps_summary(eps: np.ndarray) -> dict:
    """The ε distribution as the manifest reports it: mean, p10, p50, p90."""
    eps = np.asarray(eps, dtype=np.float64)
    if eps.size == 0:
        return {"mean": float("nan"), "p10": float("nan"), "p50": float("nan"), "p90": float("nan")}
    p10, p50, p90 = np.percentile(eps, [10, 50, 90])
    return {"mean": float(eps.mean()), "p10": float(p10), "p50": float(p50), "p90": float(p90)}
