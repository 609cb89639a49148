"""LightGCN's propagation against a dense reference built the way the paper writes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recscale.dataset import Interactions
from recscale.errors import ConfigError, ModelError
from recscale.models import create_model
from recscale.models.lightgcn import normalized_adjacency
from recscale.testing import interactions


def _random_graph(n_users: int = 7, n_items: int = 9, seed: int = 0) -> Interactions:
    rng = np.random.default_rng(seed)
    dense = rng.random((n_users, n_items)) < 0.35
    dense[0, 0] = True  # at least one edge
    dense[:, n_items - 1] = False  # an item nobody interacted with
    return interactions(*np.nonzero(dense), n_users, n_items)


def _dense_reference(train: Interactions, users: np.ndarray, items: np.ndarray, layers: int):
    """Â = D^-½ A D^-½ over the (users + items) square adjacency; mean of layers 0..K."""
    n_u, n_i = train.n_users, train.n_items
    a = np.zeros((n_u + n_i, n_u + n_i))
    a[train.user_idx, n_u + train.item_idx] = 1.0
    a[n_u + train.item_idx, train.user_idx] = 1.0
    degree = a.sum(axis=1)
    inv = np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0)
    a_hat = inv[:, None] * a * inv[None, :]
    e = np.vstack([users, items]).astype(np.float64)
    total = e.copy()
    for _ in range(layers):
        e = a_hat @ e
        total += e
    total /= layers + 1
    return total[:n_u], total[n_u:]


@pytest.mark.parametrize("layers", [0, 1, 3])
def test_propagation_equals_the_dense_reference(layers: int) -> None:
    train = _random_graph()
    model = create_model("lightgcn", {"dim": 5, "n_layers": layers}, 7, 9, seed=1)
    model.prepare(train)
    users, items = model.propagate()
    ref_u, ref_i = _dense_reference(
        train, model.user_emb.detach().numpy(), model.item_emb.detach().numpy(), layers
    )
    np.testing.assert_allclose(users.detach().numpy(), ref_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(items.detach().numpy(), ref_i, rtol=1e-5, atol=1e-6)


def test_gradients_equal_the_dense_reference() -> None:
    train = _random_graph(seed=3)
    model = create_model("lightgcn", {"dim": 4, "n_layers": 2}, 7, 9, seed=2)
    model.prepare(train)
    users, items = model.propagate()
    weights = torch.linspace(-1, 1, users.numel() + items.numel())
    (torch.cat([users.reshape(-1), items.reshape(-1)]) * weights).sum().backward()

    eu = model.user_emb.detach().clone().double().requires_grad_(True)
    ei = model.item_emb.detach().clone().double().requires_grad_(True)
    r = torch.from_numpy(normalized_adjacency(train).toarray()).double()
    u, i, su, si = eu, ei, eu, ei
    for _ in range(2):
        u, i = r @ i, r.T @ u
        su, si = su + u, si + i
    (torch.cat([(su / 3).reshape(-1), (si / 3).reshape(-1)]) * weights.double()).sum().backward()
    np.testing.assert_allclose(model.user_emb.grad.numpy(), eu.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.item_emb.grad.numpy(), ei.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_normalized_adjacency_values() -> None:
    train = _random_graph()
    r = normalized_adjacency(train).toarray()
    binary = np.zeros((7, 9))
    binary[train.user_idx, train.item_idx] = 1
    du, di = binary.sum(1), binary.sum(0)
    rows, cols = np.nonzero(binary)
    np.testing.assert_allclose(r[rows, cols], 1 / np.sqrt(du[rows] * di[cols]), rtol=1e-6)
    assert np.count_nonzero(r) == len(rows)
    assert not r[:, 8].any()  # the item nobody saw: no edge, no division by zero


def test_scores_need_a_graph() -> None:
    model = create_model("lightgcn", {"dim": 4}, 7, 9)
    with pytest.raises(ModelError, match="lightgcn has no graph"):
        model.score(np.array([0]))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"loss": "hinge"}, r"loss 'hinge' is unknown; expected one of 'bpr', 'softmax', 'ccl'"),
        ({"n_layers": -1}, r"n_layers must be >= 0, got -1"),
        ({"shared_negatives": -5}, r"shared_negatives must be >= 0, got -5"),
        ({"temperature": 0.0}, r"temperature must be > 0, got 0.0"),
    ],
)
def test_bad_hyper_parameters(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_model("lightgcn", params, 4, 4)


def test_shared_negatives_mask_the_rows_own_positive() -> None:
    """A row whose positive is among the shared negatives must not be pushed away from it."""
    train = _random_graph()
    model = create_model(
        "lightgcn",
        {"dim": 4, "loss": "softmax", "shared_negatives": 9, "reg": 0.0, "temperature": 0.5},
        7,
        9,
        seed=0,
    )
    model.prepare(train)
    batch = {
        "users": torch.tensor([0]),
        "pos": torch.tensor([0]),
        "neg": torch.tensor([[3]]),
    }
    torch.manual_seed(0)
    loss = model.batch_loss(batch)
    torch.manual_seed(0)
    shared = torch.randint(0, 9, (9,))
    with torch.no_grad():
        users, items = model.propagate()
        u = torch.nn.functional.normalize(users[0], dim=0)
        v = torch.nn.functional.normalize(items, dim=1)
        cos = v @ u
        negatives = torch.cat([cos[[3]], cos[shared[shared != 0]]])
        logits = torch.cat([cos[[0]], negatives]) / 0.5
        expected = torch.logsumexp(logits, 0) - logits[0]
    torch.testing.assert_close(loss.detach(), expected)
