"""The preference losses against hand-computed values (float64): DPO's variants (sigmoid, cDPO, robust, hinge, IPO
length-normalised as TRL and summed), Bradley-Terry, the group advantages and the clipped policy-gradient loss,
completion-only log-probs and completion lengths."""

from __future__ import annotations

import math

import pytest
import torch

from mm_lightning.losses.preference import (
    bradley_terry_loss,
    completion_lengths,
    completion_logprobs,
    dpo_loss,
    group_advantages,
    policy_gradient_loss,
    token_entropy,
)

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
S = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731 (a scalar)
# Two pairs: log-ratios chosen pc - rc = (0.5, 0.0), rejected pr - rr = (-1.0, 1.0), so the summed margins
# h = (1.5, -1.0); beta 0.5 -> beta h = (0.75, -0.5), 1 / (2 beta) = 1
PC, PR, RC, RR = T(-1.0, -2.0), T(-3.0, -1.5), T(-1.5, -2.0), T(-2.0, -2.5)
BETA = 0.5
# completion tokens: chosen 4 and 5, rejected 2 and 2 -> per-token log-ratios chosen (0.5 / 4, 0 / 5) = (0.125, 0),
# rejected (-1 / 2, 1 / 2) = (-0.5, 0.5): length-normalised margins h_mean = (0.625, -0.5)
NC, NR = torch.tensor([4, 5]), torch.tensor([2, 2])


@pytest.mark.parametrize("loss_type, smoothing, expected", [
    # DPO: -log sigmoid(beta h) = log(1 + exp(-beta h)): log(1 + e^-0.75), log(1 + e^0.5)
    pytest.param("sigmoid", 0.0, (0.38687100611489994, 0.9740769841801067), id="sigmoid"),
    # cDPO: -(1 - e) log s(x) - e log s(-x) = -log s(x) + e x, x = beta h, e = 0.1: 0.386871 + 0.075, 0.974077 - 0.05
    # (TRL 1.16's sigmoid ignores label_smoothing and would give the sigmoid row's values)
    pytest.param("sigmoid", 0.1, (0.46187100611489995, 0.9240769841801066), id="cdpo"),
    # rDPO: (-(1 - e) log s(x) + e log s(-x)) / (1 - 2e): (0.9 * 0.386871 - 0.1 * 1.136871) / 0.8, ...
    pytest.param("robust", 0.1, (0.2931210061148999, 1.0365769841801067), id="robust"),
    # with e = 0 robust is plain DPO
    pytest.param("robust", 0.0, (0.38687100611489994, 0.9740769841801067), id="robust-e0"),
    # max(0, 1 - beta h): 1 - 0.75, 1 + 0.5
    pytest.param("hinge", 0.0, (0.25, 1.5), id="hinge"),
    # IPO as TRL: (h_mean - 1 / (2 beta))^2 = (0.625 - 1)^2, (-0.5 - 1)^2
    pytest.param("ipo", 0.0, (0.140625, 2.25), id="ipo"),
    # IPO on summed log-ratios: (h - 1 / (2 beta))^2 = (1.5 - 1)^2, (-1 - 1)^2
    pytest.param("ipo_sum", 0.0, (0.25, 4.0), id="ipo_sum"),
])
def test_dpo_loss_equals_its_formula(loss_type: str, smoothing: float, expected: tuple[float, float]) -> None:
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type=loss_type, label_smoothing=smoothing,
                                        chosen_lengths=NC, rejected_lengths=NR)
    torch.testing.assert_close(losses, T(*expected), rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen, T(0.25, 0.0), rtol=0, atol=1e-12)  # beta (pc - rc), summed for every type
    torch.testing.assert_close(rejected, T(-0.5, 0.5), rtol=0, atol=1e-12)  # beta (pr - rr)


def test_ipo_averages_each_log_ratio_over_its_own_completion_tokens_as_trl() -> None:
    """TRL 1.16: ``((lr_c / n_c - lr_r / n_r) - 1 / (2 beta))^2`` with ``n`` the completion tokens of each sequence,
    counted from the labels that select the summed log-probs."""
    # chosen rows: 2 prompt tokens, then 4 / 5 completion tokens (the first right-padded); rejected: 2 and 2
    chosen_labels = torch.tensor([[-100, -100, 3, 4, 5, 6, -100], [-100, -100, 3, 4, 5, 6, 7]])
    rejected_labels = torch.tensor([[-100, -100, 8, 9, -100, -100, -100], [-100, -100, -100, -100, 8, 9, -100]])
    n_c, n_r = completion_lengths(chosen_labels), completion_lengths(rejected_labels)
    assert n_c.tolist() == [4, 5] and n_r.tolist() == [2, 2]
    pc = PC.clone().requires_grad_()
    losses, _, _ = dpo_loss(pc, PR, RC, RR, beta=BETA, loss_type="ipo", chosen_lengths=n_c, rejected_lengths=n_r)
    torch.testing.assert_close(losses, T(0.140625, 2.25), rtol=0, atol=1e-12)
    losses.sum().backward()
    # d/dpc (h_mean - 1)^2 = 2 (h_mean - 1) / n_c: 2 (-0.375) / 4, 2 (-1.5) / 5
    torch.testing.assert_close(pc.grad, T(-0.1875, -0.6), rtol=0, atol=1e-12)


def test_ipo_is_length_invariant_and_ipo_sum_is_not() -> None:
    # each completion said k = 3 times over: summed log-probs and lengths triple, the per-token log-ratios do not
    k = 3
    tripled = (k * PC, k * PR, k * RC, k * RR)
    ipo = dpo_loss(*tripled, beta=BETA, loss_type="ipo", chosen_lengths=k * NC, rejected_lengths=k * NR)[0]
    torch.testing.assert_close(ipo, T(0.140625, 2.25), rtol=0, atol=1e-12)
    # summed: (3 * 1.5 - 1)^2, (3 * -1 - 1)^2
    ipo_sum = dpo_loss(*tripled, beta=BETA, loss_type="ipo_sum")[0]
    torch.testing.assert_close(ipo_sum, T(12.25, 16.0), rtol=0, atol=1e-12)
    # one token per completion: both forms agree
    ones = torch.ones(2)
    torch.testing.assert_close(dpo_loss(PC, PR, RC, RR, BETA, "ipo", chosen_lengths=ones, rejected_lengths=ones)[0],
                               dpo_loss(PC, PR, RC, RR, BETA, "ipo_sum")[0], rtol=0, atol=0)


def test_ipo_needs_the_completion_lengths() -> None:
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="ipo")
    with pytest.raises(ValueError, match="ipo_sum"):
        dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="ipo", chosen_lengths=NC)


def test_dpo_loss_at_the_reference_is_ln2_with_zero_rewards() -> None:
    logps_c, logps_r = T(-4.0, -0.5, -7.25), T(-3.0, -9.0, -0.1)
    losses, chosen, rejected = dpo_loss(logps_c, logps_r, logps_c.clone(), logps_r.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2.0), dtype=torch.float64), rtol=0, atol=1e-15)
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_dpo_rewards_are_detached_and_the_loss_is_not() -> None:
    pc = PC.clone().requires_grad_()
    losses, chosen, rejected = dpo_loss(pc, PR, RC, RR, beta=BETA)
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    # d/dpc of -log sigmoid(beta h) = -beta (1 - sigmoid(beta h))
    torch.testing.assert_close(pc.grad, -BETA * (1 - torch.sigmoid(BETA * T(1.5, -1.0))), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"loss_type": "kto"}, "loss_type"), ({"beta": 0.0}, "beta"), ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing applies"),
    ({"loss_type": "ipo", "label_smoothing": 0.1, "chosen_lengths": NC, "rejected_lengths": NR},
     "label_smoothing applies"),
    ({"loss_type": "ipo_sum", "label_smoothing": 0.1}, "label_smoothing applies"),
])
def test_dpo_loss_rejects_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dpo_loss(PC, PR, RC, RR, **kwargs)


@pytest.mark.parametrize("margin, centre, expected", [
    # -log sigmoid(r_c - r_r): diffs (1.5, -2.0)
    (None, None, (0.2014132779827524, 2.1269280110429727)),
    # -log sigmoid(r_c - r_r - 0.5)
    (0.5, None, (0.31326168751822286, 2.5788897342925496)),
    # + 0.1 (r_c + r_r)^2 = 0.1 * 2.5^2, 0.1 * 0^2
    (None, 0.1, (0.8264132779827524, 2.1269280110429727)),
])
def test_bradley_terry_loss_equals_its_formula(margin, centre, expected) -> None:
    chosen, rejected = T(2.0, -1.0), T(0.5, 1.0)
    losses = bradley_terry_loss(chosen, rejected, margin=margin, center_coefficient=centre)
    torch.testing.assert_close(losses, T(*expected), rtol=0, atol=1e-12)


def test_bradley_terry_per_pair_margin_and_ln2_at_equal_rewards() -> None:
    losses = bradley_terry_loss(T(2.0, -1.0), T(0.5, 1.0), margin=T(0.5, 0.0))
    torch.testing.assert_close(losses, T(0.31326168751822286, 2.1269280110429727), rtol=0, atol=1e-12)
    torch.testing.assert_close(bradley_terry_loss(T(3.0), T(3.0)), T(math.log(2.0)), rtol=0, atol=1e-15)


def test_group_advantages_grpo_and_rloo() -> None:
    rewards = T(1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0)  # two groups of 4
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2 all equal -> 0
    std = math.sqrt(1 / 3)
    torch.testing.assert_close(group_advantages(rewards, 4, "grpo", eps=0.0)[:4], T(0.5, -0.5, -0.5, 0.5) / std,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(group_advantages(rewards, 4, "grpo")[4:], T(0, 0, 0, 0), rtol=0, atol=0)
    torch.testing.assert_close(group_advantages(rewards, 4, "grpo", scale=False)[:4], T(0.5, -0.5, -0.5, 0.5),
                               rtol=0, atol=1e-12)
    # RLOO: r_i - mean of the other three: 1 - 1/3, 0 - 2/3, 0 - 2/3, 1 - 1/3
    torch.testing.assert_close(group_advantages(rewards, 4, "rloo")[:4], T(2 / 3, -2 / 3, -2 / 3, 2 / 3),
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_policy_gradient_loss_equals_its_formula() -> None:
    # one sequence of 3 tokens (the last is padding), advantage +1; another of 1 token, advantage -2
    logps = T(-1.0, -0.5, -9.0, -2.0, 0.0, 0.0).view(2, 3)
    old = T(-1.1, -1.0, -3.0, -1.0, 0.0, 0.0).view(2, 3)
    ref = T(-1.0, -0.7, 0.0, -2.5, 0.0, 0.0).view(2, 3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = T(1.0, -2.0)
    loss, stats = policy_gradient_loss(logps, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1)
    r = [math.exp(0.1), math.exp(0.5), math.exp(-1.0)]  # ratios of the masked tokens
    surrogate = [min(r[0] * 1, min(max(r[0], 0.8), 1.2) * 1), min(r[1] * 1, 1.2 * 1), min(r[2] * -2, 0.8 * -2)]
    kl = [math.exp(d) - d - 1 for d in (0.0, -0.2, -0.5)]  # ref - logp
    seq1 = ((-surrogate[0] + 0.1 * kl[0]) + (-surrogate[1] + 0.1 * kl[1])) / 2
    seq2 = -surrogate[2] + 0.1 * kl[2]
    torch.testing.assert_close(loss, S((seq1 + seq2) / 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(stats["kl"], S(((kl[0] + kl[1]) / 2 + kl[2]) / 2), rtol=0, atol=1e-12)
    # token 2 (ratio e^0.5 > 1.2, A > 0) and token 3 (ratio e^-1 < 0.8, A < 0) are clipped: 2 of 3
    torch.testing.assert_close(stats["clip_fraction"], S(2 / 3), rtol=0, atol=1e-12)
    token_loss, _ = policy_gradient_loss(logps, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1, normalize="token")
    torch.testing.assert_close(token_loss, S((2 * seq1 + seq2) / 3), rtol=0, atol=1e-12)


def test_policy_gradient_at_ratio_one_is_the_plain_policy_gradient() -> None:
    logps = T(-1.0, -2.0, -0.5, -3.0).view(2, 2).requires_grad_()
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, stats = policy_gradient_loss(logps, logps.detach(), None, T(1.0, -0.5), mask, kl_coef=0.0)
    loss.backward()
    # d/dlogp of -A exp(logp - sg(logp)) / (2 tokens * 2 sequences) = -A / 4
    torch.testing.assert_close(logps.grad, T(-0.25, -0.25, 0.125, 0.125).view(2, 2), rtol=0, atol=1e-12)
    assert "kl" not in stats and stats["ratio"] == 1


def test_completion_logprobs_count_labelled_tokens_only() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, -100, 4, 7, 2], [-100, -100, 5, 2, -100, -100]])  # row 2 right-padded
    logp, mask = completion_logprobs(logits, labels)
    lsm = torch.log_softmax(logits, -1)
    expected = [lsm[0, 2, 4] + lsm[0, 3, 7] + lsm[0, 4, 2], lsm[1, 1, 5] + lsm[1, 2, 2]]  # logits at t predict t + 1
    torch.testing.assert_close(logp.sum(1), torch.stack(expected), rtol=0, atol=1e-12)
    assert mask.sum().item() == 5
    changed = logits.clone()
    changed[0, :2] += 5.0  # what predicts prompt tokens
    changed[1, 3:] -= 3.0  # what predicts padding
    torch.testing.assert_close(completion_logprobs(changed, labels)[0].sum(1), logp.sum(1), rtol=0, atol=0)


def test_completion_lengths_count_the_tokens_whose_log_probs_are_summed() -> None:
    labels = torch.tensor([[-100, -100, -100, 4, 7, 2], [-100, -100, 5, 2, -100, -100], [3, 1, -100, -100, -100, -100]])
    logits = torch.zeros(3, 6, 11, dtype=torch.float64)
    lengths = completion_lengths(labels)
    assert lengths.tolist() == [3, 2, 1]  # row 3: a label at position 0 is never predicted, so never counted
    assert torch.equal(lengths, completion_logprobs(logits, labels)[1].sum(1))


def test_token_entropy_of_a_uniform_distribution_is_log_v() -> None:
    logits = torch.zeros(1, 4, 8, dtype=torch.float64)
    labels = torch.tensor([[-100, 1, 2, -100]])
    torch.testing.assert_close(token_entropy(logits, labels), S(math.log(8.0)), rtol=0, atol=1e-12)
