"""Preference losses as pure functions of per-sequence log-probabilities.

Every loss takes the summed log-probabilities of the chosen and rejected completions under the
policy and the frozen reference, and returns ``(loss, chosen_rewards, rejected_rewards)``, all
per example: no model, no reduction (the trainer weights and averages). Rewards are the implicit
DPO rewards ``beta * (policy - ref)``, detached, for logging (``rewards/chosen`` etc.).

Shapes: chosen log-probs are ``(B,)``; rejected are ``(B,)``, or ``(B, K)`` for the
multi-negative S-DPO; ``eps`` is a per-example tensor shaped like the chosen log-probs.

Non-finite inputs are not checked here (these are pure functions, also run by the benchmarks): a
NaN or infinite log-prob gives a NaN or infinite loss, and the training loop, which checks each
micro-batch's loss once before its backward (one host sync per micro-batch) and each step's
gradient norm, stops the run at the first such value, naming the step and the batch
(`rosepo.train.loop`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Names accepted by `preference_loss` (and by ``align.loss`` in the config).
LOSSES = ("rosepo", "dpo", "cdpo", "sdpo", "sdpo_smoothed", "ipo")

Rewarded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _rewards(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """Implicit reward ``beta * log(pi / pi_ref)``, detached: it is logged, never optimised."""
    return (beta * (policy - ref)).detach()


def _check_eps(eps: torch.Tensor, like: torch.Tensor) -> None:
    """Raise ValueError unless ``eps`` is a tensor shaped like ``like`` with values in [0, 0.5]."""
    if not isinstance(eps, torch.Tensor):
        raise ValueError(f"eps must be a per-example tensor, got {type(eps).__name__}; "
                         "use cdpo_loss for a constant eps")
    if eps.shape != like.shape:
        raise ValueError(f"eps has shape {tuple(eps.shape)} but the log-probs have "
                         f"{tuple(like.shape)}: give one eps per example")
    # Written as "not inside" so that NaN is rejected too.
    bad = ~((eps >= 0) & (eps <= 0.5))
    if bool(bad.any()):
        raise ValueError(f"eps must lie in [0, 0.5], got values {eps[bad][:5].tolist()}: "
                         "eps is the probability that a preference label is flipped")


def _smoothed_sigmoid_loss(logits: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
    """``-[(1 - eps) log sigma(z) + eps log sigma(-z)]``; ``-log sigma(z)`` when eps is None.

    The one place the label-smoothed Bradley-Terry likelihood is written: DPO, RosePO, cDPO and
    both S-DPO variants differ only in the logit ``z`` and in ``eps``. ``F.logsigmoid`` stays
    finite for |z| in the thousands, where ``log(sigmoid(z))`` underflows to ``-inf``.
    """
    loss = -F.logsigmoid(logits)
    if eps is None:
        return loss
    _check_eps(eps, logits)
    return (1 - eps) * loss - eps * F.logsigmoid(-logits)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> Rewarded:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7): ``-log sigma(beta * h)``.

    ``h = (pi_c - ref_c) - (pi_r - ref_r)`` is the margin of the policy's log-ratios.
    """
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return (_smoothed_sigmoid_loss(logits, None),
            _rewards(policy_chosen, ref_chosen, beta),
            _rewards(policy_rejected, ref_rejected, beta))


def rosepo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                eps: torch.Tensor, beta: float) -> Rewarded:
    """RosePO (Liao et al. 2024): DPO with a personalised, per-example smoothing factor.

    ``loss = -[(1 - eps) log sigma(beta h) + eps log sigma(-beta h)]``: the expected DPO loss
    when the label is flipped with probability ``eps``. ``eps`` must lie in [0, 0.5]. Its
    gradient in ``h`` is ``beta * (sigma(beta h) - (1 - eps))``, so training drives
    ``sigma(beta h)`` towards ``1 - eps`` instead of 1; at ``eps = 0.5`` the label carries no
    information (swapping chosen and rejected leaves the loss unchanged) and the gradient is
    zero only at ``h = 0``, e.g. where the policy still equals the reference.

    Raises:
        ValueError: eps is not a tensor shaped like the log-probs, or has values outside
            [0, 0.5].
    """
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return (_smoothed_sigmoid_loss(logits, eps),
            _rewards(policy_chosen, ref_chosen, beta),
            _rewards(policy_rejected, ref_rejected, beta))


def cdpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
              ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
              eps: float, beta: float) -> Rewarded:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): one constant eps.

    RosePO with the same ``eps`` for every example.

    Raises:
        ValueError: eps outside [0, 0.5].
    """
    return rosepo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                       torch.full_like(policy_chosen, float(eps)), beta)


def sdpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
              ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
              beta: float, eps: torch.Tensor | None = None) -> Rewarded:
    """Softmax DPO over K negatives (S-DPO, Chen et al. 2024, eq. 10).

    With ``h_x = pi_x - ref_x`` and ``L = log sum_k exp(beta (h_rk - h_c))``,
    ``loss = -log sigma(-L)``; with one negative, ``-L = beta h`` and this is DPO exactly.
    Given a per-example ``eps`` it is smoothed like RosePO:
    ``-[(1 - eps) log sigma(-L) + eps log sigma(L)]``. ``L`` is computed with
    ``torch.logsumexp`` so that large margins neither overflow nor underflow.

    Args:
        policy_chosen, ref_chosen: ``(B,)``.
        policy_rejected, ref_rejected: ``(B, K)``.
        eps: ``(B,)`` values in [0, 0.5], or None for the unsmoothed loss.

    Returns:
        ``(loss (B,), chosen_rewards (B,), rejected_rewards (B, K))``.

    Raises:
        ValueError: wrong shapes, or eps invalid (see `rosepo_loss`).
    """
    if policy_rejected.ndim != 2 or policy_rejected.shape != ref_rejected.shape \
            or policy_rejected.shape[0] != policy_chosen.shape[0] or policy_chosen.ndim != 1:
        raise ValueError(
            f"sdpo expects chosen log-probs (B,) and rejected (B, K); got policy_chosen "
            f"{tuple(policy_chosen.shape)}, policy_rejected {tuple(policy_rejected.shape)}, "
            f"ref_rejected {tuple(ref_rejected.shape)}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    lse = torch.logsumexp(beta * (rejected_ratio - chosen_ratio.unsqueeze(-1)), dim=-1)
    return (_smoothed_sigmoid_loss(-lse, eps),
            _rewards(policy_chosen, ref_chosen, beta),
            _rewards(policy_rejected, ref_rejected, beta))


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> Rewarded:
    """IPO (Azar et al. 2023, eq. 17) as TRL writes it: ``(h - 1 / (2 beta))^2``.

    ``h`` is the log-ratio margin, as in DPO. TRL averages the log-probs per token for IPO;
    here ``h`` uses the summed log-probs, like every other loss in this module, so that all
    losses see the same inputs (``beta`` therefore sets a target margin in summed nats).
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return ((margin - 1 / (2 * beta)) ** 2,
            _rewards(policy_chosen, ref_chosen, beta),
            _rewards(policy_rejected, ref_rejected, beta))


def preference_loss(name: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float,
                    eps: torch.Tensor | None = None, const_eps: float = 0.1) -> Rewarded:
    """Compute the loss called ``name`` (one of `LOSSES`) per example.

    ``eps`` (per example) is required by ``rosepo`` and ``sdpo_smoothed`` and ignored by the
    others; ``const_eps`` is cdpo's constant. Single-negative losses accept rejected log-probs
    shaped ``(B, 1)`` and squeeze them; ``sdpo`` accepts ``(B,)`` as ``K = 1``.

    Raises:
        ValueError: unknown name, missing eps, or K > 1 negatives for a single-negative loss.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    if name in ("rosepo", "sdpo_smoothed") and eps is None:
        raise ValueError(f"loss {name!r} needs a per-example eps tensor (pair column 'eps'); "
                         "use 'cdpo' for a constant eps or 'dpo' for none")
    if name in ("sdpo", "sdpo_smoothed"):
        if policy_rejected.ndim == 1:
            policy_rejected, ref_rejected = policy_rejected[:, None], ref_rejected[:, None]
        return sdpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta,
                         eps if name == "sdpo_smoothed" else None)
    if policy_rejected.ndim == 2:
        if policy_rejected.shape[-1] != 1:
            raise ValueError(f"loss {name!r} takes one rejected item per pair but got "
                             f"K={policy_rejected.shape[-1]}; use 'sdpo' or 'sdpo_smoothed' "
                             "for multiple negatives, or set pairs.num_negatives=1")
        policy_rejected, ref_rejected = policy_rejected.squeeze(-1), ref_rejected.squeeze(-1)
    args = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if name == "rosepo":
        return rosepo_loss(*args, eps, beta)
    if name == "cdpo":
        return cdpo_loss(*args, const_eps, beta)
    if name == "ipo":
        return ipo_loss(*args, beta)
    return dpo_loss(*args, beta)


def sft_regularizer(policy_chosen_logps: torch.Tensor,
                    chosen_token_counts: torch.Tensor) -> torch.Tensor:
    """Per-example NLL of the chosen completion, per token: ``-logp / count``.

    Averaged per token so that long titles do not outweigh short ones.

    Raises:
        ValueError: a token count is not positive (an empty completion has no NLL).
    """
    if bool((chosen_token_counts <= 0).any()):
        raise ValueError("chosen_token_counts must be positive: every chosen completion "
                         "needs at least one token")
    return -policy_chosen_logps / chosen_token_counts
