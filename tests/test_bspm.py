"""BSPM against its closed form: the filters as dense matrices, the RK4 step as a polynomial."""

from __future__ import annotations

import numpy as np
import pytest

from recscale.dataset import Interactions
from recscale.errors import ConfigError, ModelError
from recscale.models import create_model
from recscale.testing import interactions


def _interactions(dense: np.ndarray) -> Interactions:
    return interactions(*np.nonzero(dense), *dense.shape)


@pytest.fixture(scope="module")
def log() -> np.ndarray:
    rng = np.random.default_rng(5)
    dense = (rng.random((12, 10)) < 0.4).astype(np.float64)
    dense[np.arange(10), np.arange(10)] = 1.0  # every item has a user
    return dense


def _reference(dense: np.ndarray, history: np.ndarray, k: int, beta: float, t: float, solver: str):
    du, di = dense.sum(1), dense.sum(0)
    r = dense / np.sqrt(np.outer(np.maximum(du, 1), np.maximum(di, 1)))
    p = r.T @ r
    _, _, vt = np.linalg.svd(r)
    v = vt[:k].T
    ideal = np.diag(1 / np.sqrt(di)) @ v @ v.T @ np.diag(np.sqrt(di))
    y = history @ p + beta * history @ ideal
    hp = t * p
    if solver == "rk4":  # one RK4 step of dy/dt = -yP is y times the degree-4 Taylor polynomial
        step = np.eye(len(p)) - hp + hp @ hp / 2 - hp @ hp @ hp / 6 + hp @ hp @ hp @ hp / 24
    else:
        step = np.eye(len(p)) - hp
    return y @ step


@pytest.mark.parametrize(
    ("factors", "beta", "time", "solver"),
    [(3, 0.2, 2.5, "rk4"), (5, 0.5, 1.0, "euler"), (4, 0.0, 0.0, "rk4")],
)
def test_scores_equal_the_dense_closed_form(
    log: np.ndarray, factors: int, beta: float, time: float, solver: str
) -> None:
    params = {
        "factors": factors,
        "ideal_weight": beta,
        "sharpen_time": time,
        "solver": solver,
        "batch_users": 5,  # several batches
    }
    model = create_model("bspm", params, *log.shape)
    model.fit(_interactions(log))
    expected = _reference(log, log, factors, beta, time, solver)
    got = model.score(np.arange(log.shape[0])).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_observe_scores_the_new_history(log: np.ndarray) -> None:
    model = create_model("bspm", {"factors": 3}, *log.shape)
    model.fit(_interactions(log))
    history = log.copy()
    history[0] = 0.0
    history[0, [1, 7]] = 1.0
    model.observe(_interactions(history))
    expected = _reference(log, history, 3, 0.2, 2.5, "rk4")  # the graph is still the fitted one
    np.testing.assert_allclose(model.score(np.array([0]))[0].numpy(), expected[0], rtol=1e-4)


def test_unfitted_and_bad_parameters(log: np.ndarray) -> None:
    with pytest.raises(ModelError, match="bspm is not fitted"):
        create_model("bspm", {}, *log.shape).score(np.array([0]))
    with pytest.raises(ConfigError, match=r"solver 'midpoint' is unknown; expected one of"):
        create_model("bspm", {"solver": "midpoint"}, 4, 4)
    with pytest.raises(ConfigError, match=r"sharpen_time must be >= 0, got -1.0"):
        create_model("bspm", {"sharpen_time": -1.0}, 4, 4)
