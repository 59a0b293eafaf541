"""Preference and policy-optimisation losses: the DPO family, Bradley-Terry, and the group-relative
policy-gradient loss (GRPO / RLOO). Pure functions on tensors; TRL's names, and TRL's formulas except
where a docstring says otherwise (:func:`dpo_loss` names, per variant, the paper and the TRL 1.16
behaviour it follows).

Notation: ``logp`` is a sequence's summed log-probability over its completion tokens (the prompt and
padding excluded: :func:`completion_logprobs`), ``n`` the number of those tokens
(:func:`completion_lengths`), ``_c`` / ``_r`` the chosen / rejected completion, ``ref`` the frozen
reference model, ``beta`` the DPO temperature (a KL-penalty strength).
Everything is computed in float32 or wider (inputs in lower precision are upcast), so a bf16
forward does not round the losses.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DPOLossType = Literal["sigmoid", "ipo", "ipo_sum", "hinge", "robust"]
DPO_LOSS_TYPES = ("sigmoid", "ipo", "ipo_sum", "hinge", "robust")
AdvantageKind = Literal["grpo", "rloo"]


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ---------------------------------------------------------------------------------------- log-probs
def completion_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labelled tokens, and their mask, both ``(B, L - 1)``.

    ``logits`` ``(B, L, V)`` of a causal LM and UNSHIFTED ``labels`` ``(B, L)`` (-100 where no loss):
    ``logp[b, t] = log_softmax(logits[b, t])[labels[b, t + 1]]``, ``mask[b, t] = labels[b, t + 1] != -100``
    (TRL's ``logits[:, :-1]`` / ``labels[:, 1:]``). ``logp`` is 0 where ``mask`` is False, so
    ``logp.sum(-1)`` is the sequence log-probability of its completion tokens alone.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = _wide(logits[:, :-1])
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(~mask, 0.0), mask


def completion_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Number of completion tokens ``(B,)`` of each row of UNSHIFTED ``labels`` ``(B, L)``: ``labels[:, 1:] != -100``,
    the very tokens whose log-probabilities :func:`completion_logprobs` sums (TRL's ``completion_mask.sum(1)``)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def token_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean entropy ``-sum_v p_v log p_v`` of the next-token distributions that predict labelled tokens (a scalar)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    logp = torch.log_softmax(_wide(logits[:, :-1]), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return (entropy * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------- DPO
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO losses ``(B,)`` and the implicit rewards of the chosen and rejected completions.

    With the summed log-ratio margin ``h = (logp_c - ref_c) - (logp_r - ref_r)``, label smoothing ``e``
    and the completion lengths ``n_c``, ``n_r`` (``chosen_lengths`` / ``rejected_lengths``, needed by
    ``ipo`` alone; :func:`completion_lengths`). "TRL" below is the loss code of TRL 1.16's
    ``DPOTrainer._compute_loss`` (``label_smoothing`` there is ``DPOConfig.label_smoothing``).

    - ``sigmoid``, ``e = 0``: DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7),
      ``-log sigmoid(beta h)``. TRL's ``loss_type="sigmoid"``, identical.
    - ``sigmoid``, ``e > 0``: conservative DPO, cDPO (Mitchell 2023, "A note on DPO with noisy
      preferences & relationship to IPO"): the DPO loss against labels flipped with probability ``e``,
      ``-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``. TRL applied this to ``sigmoid`` with
      ``label_smoothing > 0`` up to 0.28 (read in 0.24, 0.27, 0.28); in 0.29.1 and 1.x (1.16 included)
      TRL's ``sigmoid`` ignores ``label_smoothing`` and gives the plain DPO loss, so here, with ``e > 0``,
      the loss differs from TRL 1.16 on purpose: smoothing that was asked for is applied, not dropped.
    - ``robust``: robust DPO, rDPO (Chowdhury et al. 2024, "Provably Robust DPO"), an unbiased estimate
      of the clean DPO loss under label flips of rate ``e < 1/2``:
      ``(-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2 e)``. TRL's
      ``loss_type="robust"`` with its ``label_smoothing``, identical.
    - ``hinge``: the hinge loss on the reference-normalised likelihood ratio (SLiC, Zhao et al. 2023,
      "SLiC-HF"; in this normalised form RSO, Liu et al. 2023, "Statistical Rejection Sampling Improves
      Preference Optimization"), ``max(0, 1 - beta h)``. TRL's ``loss_type="hinge"``, identical.
    - ``ipo``: IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
      Preferences", eq. 17, ``beta`` its ``tau``) on log-ratios averaged over each completion's tokens:
      ``h_mean = (logp_c - ref_c) / n_c - (logp_r - ref_r) / n_r``, loss ``(h_mean - 1 / (2 beta))^2``
      (lengths clamped to >= 1). TRL's ``loss_type="ipo"``, identical: TRL normalises by length because
      the summed form makes the squared loss, and the meaning of ``beta``, scale with completion length,
      and states that the IPO authors confirmed the normalised form is the one their reported results use.
    - ``ipo_sum``: the same eq. 17 on the summed margin, ``(h - 1 / (2 beta))^2``, read literally from
      the paper's sequence-level log-probabilities. No TRL counterpart (every TRL read, 0.24 to 1.16,
      averages IPO's log-probabilities over the completion); kept only as an explicit option.

    Rewards (detached, TRL's ``rewards/chosen`` and ``rewards/rejected``, summed for every loss type, IPO
    included, as in TRL): ``beta (logp_c - ref_c)`` and ``beta (logp_r - ref_r)``. When the policy equals
    the reference, ``h = 0``: the ``sigmoid`` loss is ``ln 2`` and both rewards are 0.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to the sigmoid and robust losses, not {loss_type}")
    if loss_type == "ipo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("loss_type ipo averages the log-ratios over the completion tokens: pass chosen_lengths "
                         "and rejected_lengths (completion_lengths(labels)), or use loss_type ipo_sum")
    pc, pr, rc, rr = (_wide(x) for x in (policy_chosen_logps, policy_rejected_logps,
                                         reference_chosen_logps, reference_rejected_logps))
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    h = chosen_ratio - rejected_ratio
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo_sum":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        n_c = chosen_lengths.to(chosen_ratio.dtype).clamp(min=1)
        n_r = rejected_lengths.to(rejected_ratio.dtype).clamp(min=1)
        losses = (chosen_ratio / n_c - rejected_ratio / n_r - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ----------------------------------------------------------------------------------- Bradley-Terry
def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coefficient: float | None = None,
) -> torch.Tensor:
    """Per-example Bradley-Terry losses ``(B,)`` of a reward model (TRL's RewardTrainer).

    ``-log sigmoid(r_c - r_r - m) + lambda (r_c + r_r)^2``: ``m`` the optional ``margin`` (a scalar or
    one per pair; Llama 2's margin loss), ``lambda`` the optional ``center_coefficient`` that pulls
    the rewards towards 0 (Eisenstein et al. 2023), making them comparable across prompts. With
    ``r_c = r_r`` and neither option the loss is ``ln 2``.
    """
    rc, rr = _wide(chosen_rewards), _wide(rejected_rewards)
    diff = rc - rr
    if margin is not None:
        diff = diff - (margin if isinstance(margin, (int, float)) else _wide(margin))
    losses = -F.logsigmoid(diff)
    if center_coefficient:
        losses = losses + center_coefficient * (rc + rr) ** 2
    return losses


# ------------------------------------------------------------------------- group-relative policy loss
def group_advantages(
    rewards: torch.Tensor, group_size: int, kind: AdvantageKind = "grpo", scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Advantages ``(N,)`` of ``N = P * k`` rewards, ``k = group_size`` consecutive samples per prompt.

    - ``grpo`` (Shao et al. 2024): ``A_i = (r_i - mean_g r) / (std_g r + eps)`` with ``scale``, else
      ``r_i - mean_g r`` (Dr. GRPO); ``std`` is the unbiased sample standard deviation, as TRL's.
    - ``rloo`` (Ahmadian et al. 2024): the leave-one-out baseline, ``A_i = r_i - mean_{j != i} r_j =
      k / (k - 1) (r_i - mean_g r)``; never scaled.

    A group whose rewards are all equal gets advantages 0 (nothing to learn from it).
    """
    if group_size < 2:
        raise ValueError(f"group advantages need at least 2 samples per prompt, got group_size={group_size}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    if kind not in ("grpo", "rloo"):
        raise ValueError(f"advantage kind must be grpo or rloo, got {kind!r}")
    r = _wide(rewards).view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if kind == "rloo":
        return (centred * group_size / (group_size - 1)).reshape(-1)
    if scale:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def policy_gradient_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.04,
    normalize: Literal["sequence", "token"] = "sequence",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped group-relative policy-gradient loss with a KL penalty to the reference (GRPO, as TRL).

    Per completion token ``t`` of sequence ``i`` (``mask``), with ``rho = exp(logp - logp_old)``:

    ``l_{i,t} = -min(rho A_i, clip(rho, 1 - eps, 1 + eps_high) A_i) + kl_coef * KL_{i,t}``,

    ``KL_{i,t} = exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3 estimator of KL(pi || ref),
    >= 0, unbiased under samples from pi). ``normalize="sequence"`` averages over each sequence's
    tokens, then over sequences (GRPO); ``"token"`` over all tokens of the batch (DAPO). With
    ``logp_old = logp.detach()`` (one update per sampled batch) ``rho = 1`` and the gradient is the
    plain policy gradient ``-A_i grad logp``.

    Returns the loss and detached statistics: ``kl`` (mean per-sequence KL), ``clip_fraction``
    (share of tokens whose ratio was clipped) and ``ratio`` (mean ratio).
    """
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    if normalize not in ("sequence", "token"):
        raise ValueError(f"normalize must be sequence or token, got {normalize!r}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    logps, old_logps = _wide(logps), _wide(old_logps)
    m = mask.to(logps.dtype)
    adv = _wide(advantages).unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + high) * adv
    per_token = -torch.min(unclipped, clipped)
    stats: dict[str, torch.Tensor] = {}
    if reference_logps is not None:
        delta = _wide(reference_logps) - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_coef * kl
        stats["kl"] = ((kl * m).sum(1) / m.sum(1).clamp(min=1)).mean().detach()
    lengths = m.sum(1).clamp(min=1)
    if normalize == "sequence":
        loss = ((per_token * m).sum(1) / lengths).mean()
    else:
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    total = m.sum().clamp(min=1)
    stats["clip_fraction"] = (((clipped < unclipped).to(m.dtype) * m).sum() / total).detach()
    stats["ratio"] = ((ratio * m).sum() / total).detach()
    return loss, stats

