"""EASE and ItemKNN against independent NumPy computations of their closed forms."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recscale.dataset import Interactions
from recscale.errors import ConfigError, ModelError
from recscale.models import EASE, EASEParams, ItemKNN, ItemKNNParams, Recommender
from recscale.models.ease import (
    binary_csr_mm,
    cooccurrence_blocks,
    ease_memory_bytes,
    ease_weights,
    parse_memory_size,
)
from recscale.models.itemknn import item_similarities


def _random_log(n_users: int, n_items: int, density: float, seed: int) -> Interactions:
    rng = np.random.default_rng(seed)
    users, items = np.nonzero(rng.random((n_users, n_items)) < density)
    return _interactions(users, items, n_users, n_items)


def _interactions(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> Interactions:
    return Interactions(
        user_idx=np.asarray(users, np.int32),
        item_idx=np.asarray(items, np.int32),
        ts=np.full(len(users), -1, np.int64),
        value=np.ones(len(users), np.float32),
        n_users=n_users,
        n_items=n_items,
    )


def _dense(log: Interactions) -> np.ndarray:
    x = np.zeros((log.n_users, log.n_items))
    x[log.user_idx, log.item_idx] = 1.0
    return x


def _ease_numpy(x: np.ndarray, l2: float) -> np.ndarray:
    """Steck's closed form in float64 through an explicit inverse."""
    p = np.linalg.inv(x.T @ x + l2 * np.eye(x.shape[1]))
    b = np.eye(x.shape[1]) - p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def _knn_numpy(x: np.ndarray, k: int, shrink: float, alpha: float) -> np.ndarray:
    """Every pair's similarity, then each row's k best by (similarity desc, column asc)."""
    counts = x.sum(axis=0)
    sims = (x.T @ x) / (counts[:, None] ** alpha * counts[None, :] ** (1.0 - alpha) + shrink)
    np.fill_diagonal(sims, 0.0)
    kept = np.zeros_like(sims)
    for i in range(len(sims)):
        ranked = sorted(
            (j for j in range(len(sims)) if sims[i, j] > 0), key=lambda j: (-sims[i, j], j)
        )
        kept[i, ranked[:k]] = sims[i, ranked[:k]]
    return kept


# ---- EASE ----


@pytest.mark.parametrize("l2", [0.5, 10.0, 500.0])
def test_ease_weights_equal_the_closed_form(l2: float) -> None:
    log = _random_log(80, 40, 0.15, seed=1)
    model = EASE(EASEParams(l2=l2), log.n_users, log.n_items)
    model.fit(log)
    expected = _ease_numpy(_dense(log), l2)
    weights = model.weights.numpy()
    assert weights.dtype == np.float32
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    assert np.all(np.diag(weights) == 0.0)
    # and scores are the users' rows times B
    np.testing.assert_allclose(
        model.score(np.arange(log.n_users)).numpy(), _dense(log) @ weights, rtol=1e-5, atol=1e-6
    )


def test_ease_torch_route_equals_the_lapack_route() -> None:
    """CUDA's route (torch.linalg) computed on the CPU gives the CPU's (LAPACK in place) B."""
    x = _random_log(60, 30, 0.2, seed=2).to_csr()
    lapack = ease_weights(x, 3.0, method="lapack")
    torch_route = ease_weights(x, 3.0, method="torch")
    torch.testing.assert_close(torch_route, lapack, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(torch.diagonal(torch_route)) == 0


@pytest.mark.parametrize("block_elements", [7, 24, 31, 10**6])
def test_ease_scores_in_blocks_of_b_equal_the_whole_product(
    monkeypatch: pytest.MonkeyPatch, block_elements: int
) -> None:
    """Scoring sums X @ B over blocks of B's rows (torch's kernel overflows past 2³¹ elements);
    any block size gives X @ B, empty users and blocks no history falls in included."""
    log = _random_log(40, 23, 0.15, seed=5)
    users = np.array([3, 0, 39, 3, 17, 8], np.int64)
    x = _dense(log)
    x[8] = 0.0  # a user without history scores zero everywhere
    keep = log.user_idx != 8
    log = _interactions(log.user_idx[keep], log.item_idx[keep], 40, 23)
    model = EASE(EASEParams(l2=5.0), 40, 23)
    model.fit(log, progress=False)
    monkeypatch.setattr("recscale.models.ease.DENSE_BLOCK_ELEMENTS", block_elements)
    expected = x[users] @ model.weights.double().numpy()
    np.testing.assert_allclose(model.score(users).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_products_with_more_than_2_31_dense_elements_are_in_bounds() -> None:
    """The case that crashed: a 54,542² B (Amazon Beauty's catalogue) times histories holding the
    first and the last item. Only the two rows the product reads are written, so the other 12 GB
    are never touched and take no memory."""
    n = 54_542
    dense = torch.empty(n, n)
    dense[0], dense[n - 1] = 0.0, 0.0
    dense[n - 1, n - 2] = 3.0
    out = binary_csr_mm(torch.tensor([0, 0, 2]), torch.tensor([0, n - 1]), dense)
    assert out.shape == (2, n)
    assert out[1, n - 2] == 3.0 and float(out.sum()) == 3.0


def test_ease_refuses_a_catalogue_larger_than_the_memory_limit() -> None:
    # 200,000² float32 is 149 GiB: the check comes before anything that size is allocated
    log = _interactions(np.array([0, 1]), np.array([5, 7]), 3, 200_000)
    model = EASE(EASEParams(memory_limit="1GB"), 3, 200_000)
    with pytest.raises(
        ModelError,
        match=r"^ease: 200,000 items need 149\.3 GiB for the dense item × item matrices, but only "
        r"0\.9 GiB are available \(memory_limit='1GB'\); use itemknn \(sparse, bounded memory\), "
        r"or drop rare items at ingest \(--min-item-interactions N, a k-core filter\)$",
    ):
        model.fit(log)
    assert model.weights is None


def test_ease_refuses_a_catalogue_larger_than_the_available_memory() -> None:
    # 10⁷ items would need 364 TiB: more than any machine that runs the tests has available
    n_items = 10_000_000
    log = _interactions(np.array([0]), np.array([3]), 2, n_items)
    model = EASE(EASEParams(), 2, n_items)
    with pytest.raises(ModelError, match=r"need 372529\.3 GiB .* \(available RAM\); use itemknn"):
        model.fit(log)


def test_ease_memory_figures() -> None:
    # one float32 matrix on the CPU (LAPACK in place), two on CUDA, plus 256 MiB of blocks
    assert ease_memory_bytes(40_981) == 4 * 40_981**2 + 2**28
    assert ease_memory_bytes(40_981, "cuda") == 8 * 40_981**2 + 2**28


@pytest.mark.parametrize(
    ("text", "size"),
    [("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("1.5 gb", 1_500_000_000), (4096, 4096)],
)
def test_memory_sizes(text: str | int, size: int) -> None:
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("bad", ["lots", "8 XB", "-1GB", 0, True])
def test_a_bad_memory_limit_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"model ease: memory_limit must be 'auto' or a size"):
        EASEParams(memory_limit=bad)  # type: ignore[arg-type]


def test_ease_bad_l2_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model ease: l2 must be > 0, got 0\.0"):
        EASEParams(l2=0.0)


def test_unfitted_ease_says_so() -> None:
    model = EASE(EASEParams(), 3, 4)
    with pytest.raises(ModelError, match="ease is not fitted"):
        model.score(np.array([0]))


# ---- ItemKNN ----


@pytest.mark.parametrize(
    ("k", "shrink", "alpha"), [(3, 0.0, 0.5), (5, 2.0, 0.5), (4, 1.0, 0.8), (100, 0.0, 0.5)]
)
def test_itemknn_similarities_equal_brute_force(k: int, shrink: float, alpha: float) -> None:
    # binary data this small has many tied similarities: the tie rule (lower item first) counts
    log = _random_log(50, 30, 0.2, seed=3)
    model = ItemKNN(ItemKNNParams(k=k, shrink=shrink, alpha=alpha), log.n_users, log.n_items)
    model.fit(log)
    got = model.similarities().toarray()
    expected = _knn_numpy(_dense(log), k, shrink, alpha)
    np.testing.assert_array_equal(got != 0, expected != 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert (np.count_nonzero(got, axis=1) <= k).all()
    np.testing.assert_allclose(
        model.score(np.arange(log.n_users)).numpy(), _dense(log) @ got, rtol=1e-5, atol=1e-6
    )


def test_itemknn_blocks_do_not_change_the_result() -> None:
    x = _random_log(40, 25, 0.25, seed=4).to_csr()
    whole = (x.T @ x).toarray()
    blocks = list(cooccurrence_blocks(x, max_entries=30))
    assert len(blocks) > 5
    assert [b[0] for b in blocks[1:]] == [b[1] for b in blocks[:-1]]  # consecutive, no gap
    np.testing.assert_array_equal(sp.vstack([b[2] for b in blocks]).toarray(), whole)
    np.testing.assert_array_equal(
        item_similarities(x, 5, 1.0).toarray(),
        _knn_numpy(x.toarray().astype(np.float64), 5, 1.0, 0.5).astype(np.float32),
    )


def test_itemknn_scatter_scores_equal_the_sparse_product() -> None:
    """The device-agnostic scorer (CUDA's) gives the CPU's scipy scores."""
    log = _random_log(40, 25, 0.25, seed=5)
    model = ItemKNN(ItemKNNParams(k=6), log.n_users, log.n_items)
    model.fit(log)
    users = np.array([3, 0, 3, 39, 17])
    torch.testing.assert_close(
        model._score_scatter(torch.from_numpy(users)), model.score(users), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("k", 0, r"model itemknn: k must be > 0, got 0"),
        ("shrink", -1.0, r"model itemknn: shrink must be >= 0, got -1\.0"),
        ("alpha", 1.5, r"model itemknn: alpha must be in \[0, 1\], got 1\.5"),
    ],
)
def test_itemknn_bad_params_are_config_errors(key: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ItemKNNParams(**{key: value})


# ---- both: scores follow the observed history ----


def _item_matrix(model: Recommender) -> np.ndarray:
    if isinstance(model, EASE):
        return model.weights.numpy()
    assert isinstance(model, ItemKNN)
    return model.similarities().toarray()


@pytest.mark.parametrize(
    "model_factory",
    [
        lambda n_users, n_items: EASE(EASEParams(l2=2.0), n_users, n_items),
        lambda n_users, n_items: ItemKNN(ItemKNNParams(k=8), n_users, n_items),
    ],
    ids=["ease", "itemknn"],
)
def test_observe_sets_the_history_scores_come_from(model_factory) -> None:  # type: ignore[no-untyped-def]
    train = _random_log(30, 20, 0.25, seed=6)
    model: Recommender = model_factory(train.n_users, train.n_items)
    model.fit(train)
    weights = _item_matrix(model)
    before = model.score(np.arange(train.n_users)).numpy()
    np.testing.assert_allclose(before, _dense(train) @ weights, rtol=1e-5, atol=1e-6)

    # user 4 is now seen with items 2 and 11 only, user 7 with nothing, the others as before
    keep = (train.user_idx != 4) & (train.user_idx != 7)
    users = np.concatenate([train.user_idx[keep], [4, 4]])
    items = np.concatenate([train.item_idx[keep], [2, 11]])
    history = _interactions(users, items, train.n_users, train.n_items)
    model.observe(history)
    after = model.score(np.array([4, 7, 0])).numpy()
    np.testing.assert_allclose(after[0], weights[2] + weights[11], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(after[1], np.zeros(train.n_items, np.float32))
    np.testing.assert_array_equal(after[2], before[0])
    # the fitted item matrix is untouched by what is observed
    np.testing.assert_array_equal(_item_matrix(model), weights)

    # a checkpoint carries the observed history: a loaded model scores the same
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    loaded: Recommender = model_factory(train.n_users, train.n_items)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(loaded.score(np.array([4, 7, 0])), model.score(np.array([4, 7, 0])))


@pytest.mark.parametrize("name", ["ease", "itemknn"])
def test_observe_on_other_sizes_is_a_model_error(name: str) -> None:
    model: Recommender = (
        EASE(EASEParams(), 5, 6) if name == "ease" else ItemKNN(ItemKNNParams(), 5, 6)
    )
    with pytest.raises(ModelError, match=r"built for 5 users × 6 items"):
        model.observe(_random_log(5, 7, 0.5, seed=0))


def test_a_mismatched_state_is_a_model_error() -> None:
    log = _random_log(10, 8, 0.4, seed=7)
    model = EASE(EASEParams(), log.n_users, log.n_items)
    model.fit(log)
    other = EASE(EASEParams(), log.n_users, log.n_items + 1)
    with pytest.raises(ModelError, match=r"ease: weights has shape \(8, 8\), expected \(9, 9\)"):
        other.load_state_dict(model.state_dict())
