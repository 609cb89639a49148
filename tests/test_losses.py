"""The shared losses against their formulas, computed independently in float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recscale.models import (
    bpr_loss,
    cosine_contrastive_loss,
    in_batch_softmax_loss,
    sampled_softmax_loss,
)

RNG = np.random.default_rng(7)
POS = RNG.normal(size=5)
NEG = RNG.normal(size=(5, 4))


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _log_softmax_first(logits: np.ndarray) -> np.ndarray:
    """-log softmax(row)[0] per row, by the textbook formula."""
    return -(logits[:, 0] - np.log(np.exp(logits).sum(axis=1)))


def test_bpr_is_the_mean_of_minus_log_sigmoid() -> None:
    expected = np.mean(-np.log(1 / (1 + np.exp(-(POS[:, None] - NEG)))))
    assert bpr_loss(_t(POS), _t(NEG)).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_sampled_softmax_is_cross_entropy_of_the_positive(temperature: float) -> None:
    logits = np.hstack([POS[:, None], NEG]) / temperature
    expected = _log_softmax_first(logits).mean()
    got = sampled_softmax_loss(_t(POS), _t(NEG), temperature=temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_log_q_correction_subtracts_the_log_proposal_probability() -> None:
    q_pos = RNG.uniform(0.01, 0.5, size=5)
    q_neg = RNG.uniform(0.01, 0.5, size=(5, 4))
    logits = np.hstack([POS[:, None] - np.log(q_pos)[:, None], NEG - np.log(q_neg)])
    expected = _log_softmax_first(logits).mean()
    got = sampled_softmax_loss(
        _t(POS), _t(NEG), log_q_pos=_t(np.log(q_pos)), log_q_neg=_t(np.log(q_neg))
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # a uniform proposal is a constant shift: no change at all
    flat = sampled_softmax_loss(
        _t(POS), _t(NEG), log_q_pos=torch.full((5,), -3.0), log_q_neg=torch.full((5, 4), -3.0)
    )
    assert flat.item() == pytest.approx(sampled_softmax_loss(_t(POS), _t(NEG)).item(), rel=1e-6)


def test_in_batch_softmax_masks_repeated_positives_and_corrects_by_log_q() -> None:
    query = RNG.normal(size=(4, 3))
    items = RNG.normal(size=(4, 3))
    ids = np.array([10, 11, 10, 12])  # rows 0 and 2 share their positive
    log_q = np.log(np.array([0.5, 0.25, 0.5, 0.25]))
    logits = query @ items.T / 0.5 - log_q[None, :]
    losses = []
    for i in range(4):
        keep = [j for j in range(4) if j == i or ids[j] != ids[i]]
        row = logits[i, keep]
        losses.append(-(logits[i, i] - np.log(np.exp(row).sum())))
    got = in_batch_softmax_loss(
        _t(query), _t(items), torch.tensor(ids), temperature=0.5, log_q=_t(log_q)
    )
    assert got.item() == pytest.approx(np.mean(losses), rel=1e-5)


def test_cosine_contrastive_loss_only_pushes_negatives_above_the_margin() -> None:
    pos = np.array([0.9, 0.2])
    neg = np.array([[0.95, 0.1, 0.85], [0.5, 0.79, 0.81]])
    margin, weight = 0.8, 2.0
    expected = np.mean((1 - pos) + weight * np.maximum(neg - margin, 0).mean(axis=1))
    got = cosine_contrastive_loss(_t(pos), _t(neg), margin=margin, negative_weight=weight)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the default weight is the number of negatives: the sum over them
    default = cosine_contrastive_loss(_t(pos), _t(neg), margin=margin)
    expected_sum = np.mean((1 - pos) + np.maximum(neg - margin, 0).sum(axis=1))
    assert default.item() == pytest.approx(expected_sum, rel=1e-5)
    # gradients reach only negatives above the margin
    neg_t = _t(neg).requires_grad_(True)
    cosine_contrastive_loss(_t(pos), neg_t, margin=margin).backward()
    np.testing.assert_array_equal(neg_t.grad.numpy() != 0, neg > margin)


def test_mf_with_a_cosine_loss_needs_plain_negatives_and_no_bias() -> None:
    from recscale.errors import ConfigError
    from recscale.models import create_model

    with pytest.raises(ConfigError, match=r"loss 'ccl' scores by cosine.*hard_negatives = false"):
        create_model("mf-bpr", {"loss": "ccl"}, 4, 4)
    with pytest.raises(ConfigError, match=r"loss 'hinge' is unknown"):
        create_model("mf-bpr", {"loss": "hinge"}, 4, 4)
