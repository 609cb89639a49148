"""recscale.evaluate: metric kernels, deterministic top-k and batched full ranking.

Every metric is checked against an independent brute force (a loop over users, a stable argsort of
the full score row with exclusions), plus a 3-user example whose answers are worked out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recscale.dataset import Interactions
from recscale.errors import ConfigError, ModelError
from recscale.evaluate import (
    by_user_activity,
    evaluate_model,
    format_metrics_table,
    hit_rate_at_k,
    item_popularity,
    ndcg_at_k,
    precision_at_k,
    ranking_metrics,
    recall_at_k,
    top_k,
)


class MatrixModel:
    """Scores from a fixed users × items matrix (a fresh tensor per call)."""

    def __init__(self, scores: np.ndarray) -> None:
        self.matrix = torch.as_tensor(scores, dtype=torch.float32)
        self.n_users, self.n_items = self.matrix.shape
        self.calls: list[int] = []

    def score(self, users: np.ndarray) -> torch.Tensor:
        self.calls.append(len(users))
        return self.matrix[torch.as_tensor(users)]


class SameForAll:
    """One score row for every user, returned as an ``expand`` view of the model's own tensor."""

    def __init__(self, row: np.ndarray, n_users: int) -> None:
        self.row = torch.as_tensor(row, dtype=torch.float32)
        self.n_users, self.n_items = n_users, len(row)

    def score(self, users: np.ndarray) -> torch.Tensor:
        return self.row.unsqueeze(0).expand(len(users), -1)


def interactions(pairs: list[tuple[int, int]], n_users: int, n_items: int) -> Interactions:
    users = np.array([p[0] for p in pairs], dtype=np.int32)
    items = np.array([p[1] for p in pairs], dtype=np.int32)
    return Interactions(
        user_idx=users,
        item_idx=items,
        ts=np.full(len(pairs), -1, np.int64),
        value=np.ones(len(pairs), np.float32),
        n_users=n_users,
        n_items=n_items,
    )


def brute_force(
    scores: np.ndarray,
    target: Interactions,
    excludes: list[Interactions],
    ks: tuple[int, ...],
    popularity: np.ndarray | None,
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """The definitions, one user at a time, with a stable full sort of each score row."""
    n_users, n_items = scores.shape
    relevant = [set() for _ in range(n_users)]
    for u, i in zip(target.user_idx, target.item_idx, strict=True):
        relevant[u].add(int(i))
    excluded = [set() for _ in range(n_users)]
    for e in excludes:
        for u, i in zip(e.user_idx, e.item_idx, strict=True):
            excluded[u].add(int(i))
    totals = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg", "hr", "precision")}
    totals["mrr"] = 0.0
    covered = {k: set() for k in ks}
    pop_sum = dict.fromkeys(ks, 0.0)
    pop_n = dict.fromkeys(ks, 0)
    evaluated = 0
    for u in range(n_users):
        rel = relevant[u] - excluded[u]
        if not rel or (users is not None and u not in set(users.tolist())):
            continue
        evaluated += 1
        s = scores[u].astype(np.float32).copy()
        s[list(excluded[u])] = -np.inf
        order = np.lexsort((np.arange(n_items), -s))  # score desc, then index asc
        for k in ks:
            top = order[:k]
            hits = [int(i) in rel for i in top]
            totals[f"recall@{k}"] += sum(hits) / len(rel)
            totals[f"precision@{k}"] += sum(hits) / k
            totals[f"hr@{k}"] += float(any(hits))
            dcg = sum(h / math.log2(pos + 2) for pos, h in enumerate(hits))
            idcg = sum(1 / math.log2(pos + 2) for pos in range(min(len(rel), k)))
            totals[f"ndcg@{k}"] += dcg / idcg
            for i in top:
                if s[i] > -np.inf:
                    covered[k].add(int(i))
                    if popularity is not None:
                        pop_sum[k] += popularity[i]
                        pop_n[k] += 1
        best = max(s[i] for i in rel)
        totals["mrr"] += 1 / (1 + int(np.sum(s > best)))
    out = {name: value / evaluated for name, value in totals.items()}
    for k in ks:
        out[f"coverage@{k}"] = len(covered[k]) / n_items
        if popularity is not None:
            out[f"popularity@{k}"] = pop_sum[k] / pop_n[k]
    out["users"] = evaluated
    return out


def random_case(seed: int, n_users: int = 23, n_items: int = 17, ties: bool = False):
    rng = np.random.default_rng(seed)
    scores = (
        rng.integers(0, 4, (n_users, n_items)).astype(np.float32)
        if ties
        else rng.standard_normal((n_users, n_items)).astype(np.float32)
    )
    train, valid, test = [], [], []
    for u in range(n_users):
        items = rng.permutation(n_items)
        n_train = int(rng.integers(0, 12))
        train += [(u, int(i)) for i in items[:n_train]]
        valid += [(u, int(i)) for i in items[n_train : n_train + int(rng.integers(0, 2))]]
        # test may repeat a training item: such a target is dropped, not counted as unreachable
        chosen = rng.choice(n_items, size=int(rng.integers(0, 5)), replace=False)
        test += [(u, int(i)) for i in chosen]
    test.append(test[0])  # a duplicated target counts once (binary relevance)
    mk = lambda pairs: interactions(pairs, n_users, n_items)  # noqa: E731
    return scores, mk(train), mk(valid), mk(test)


def assert_metrics_equal(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


# --- batched full ranking against brute force ----------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_metric_matches_brute_force(seed, ties):
    scores, train, valid, test = random_case(seed, ties=ties)
    ks = (1, 3, 5, 17)  # 17 = the whole catalogue: slots holding excluded items recommend nothing
    model = MatrixModel(scores)
    got = evaluate_model(model, test, [train, valid], ks=ks, batch_users=7)
    want = brute_force(scores, test, [train, valid], ks, item_popularity(train))
    assert_metrics_equal(got, want)
    assert got["users"] > 7 and model.calls[0] == 7  # several batches really ran


def test_a_user_subset_and_explicit_popularity(tmp_path):
    scores, train, _, test = random_case(4)
    subset = np.array([0, 3, 5, 8, 13, 21, 22])
    popularity = np.arange(17, dtype=np.int64) ** 2
    got = evaluate_model(
        MatrixModel(scores), test, train, ks=(2, 4), batch_users=3, users=subset,
        item_popularity=popularity,
    )  # fmt: skip
    assert_metrics_equal(got, brute_force(scores, test, [train], (2, 4), popularity, subset))


def test_hand_computed_three_users():
    scores = np.array(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # user 0
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # user 1
            [0.5, 0.5, 0.5, 0.5, 0.3, 0.5],  # user 2: ties, resolved by item index
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # user 3: no target, not evaluated
        ]
    )
    train = interactions([(0, 0), (1, 5), (1, 4), (3, 0), (3, 1)], 4, 6)
    test = interactions([(0, 2), (0, 5), (1, 3), (2, 4)], 4, 6)
    got = evaluate_model(MatrixModel(scores), test, train, ks=(1, 3), batch_users=2)
    # user 0 ranks 1,2,3,4,5 (0 excluded): top3 [1,2,3], one hit at position 2 of 2 relevant
    # user 1 ranks 3,2,1,0 (4,5 excluded): its one relevant item is first
    # user 2 ranks 0,1,2,3,5,4: no hit in the top 3; 5 items score strictly above item 4
    ndcg3_u0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))  # 0.38685280723454163
    expected = {
        "recall@1": (0 + 1 + 0) / 3,
        "ndcg@1": (0 + 1 + 0) / 3,
        "hr@1": (0 + 1 + 0) / 3,
        "precision@1": (0 + 1 + 0) / 3,
        "coverage@1": 3 / 6,  # {1, 3, 0}
        "popularity@1": (1 + 0 + 2) / 3,  # train counts: item0 2, item1 1, item4 1, item5 1
        "recall@3": (1 / 2 + 1 + 0) / 3,
        "ndcg@3": (ndcg3_u0 + 1 + 0) / 3,
        "hr@3": (1 + 1 + 0) / 3,
        "precision@3": (1 / 3 + 1 / 3 + 0) / 3,
        "coverage@3": 4 / 6,  # {0, 1, 2, 3}
        "popularity@3": (1 + 0 + 0 + 0 + 0 + 1 + 2 + 1 + 0) / 9,
        "mrr": (1 / 2 + 1 / 1 + 1 / 6) / 3,
        "users": 3,
    }
    assert_metrics_equal(got, expected)
    assert got["ndcg@3"] == pytest.approx(0.46228426907818054, rel=1e-15)
    assert got["mrr"] == pytest.approx(5 / 9, rel=1e-15)


def test_exclusion_really_excludes():
    scores, train, _, test = random_case(5)
    cheat = scores.copy()
    cheat[train.user_idx, train.item_idx] = 1e9  # a model that scores its training items highest
    honest = evaluate_model(MatrixModel(scores), test, train, ks=(3, 5), batch_users=4)
    cheating = evaluate_model(MatrixModel(cheat), test, train, ks=(3, 5), batch_users=4)
    assert_metrics_equal(cheating, honest)
    unmasked = evaluate_model(MatrixModel(cheat), test, ks=(3, 5), batch_users=4)
    assert unmasked["recall@3"] < honest["recall@3"]
    assert "popularity@3" not in unmasked  # no exclude and no item_popularity: nothing to count


def test_a_model_returning_views_is_not_modified():
    row = np.array([3.0, 1.0, 2.0, 0.0, 5.0], dtype=np.float32)
    model = SameForAll(row, 4)
    train = interactions([(0, 4), (1, 0), (2, 4), (2, 0)], 4, 5)
    test = interactions([(0, 0), (1, 2), (2, 1), (3, 3)], 4, 5)
    got = evaluate_model(model, test, train, ks=(1, 2), batch_users=3)
    assert torch.equal(model.row, torch.from_numpy(row))  # masking did not write into the model
    want = brute_force(np.tile(row, (4, 1)), test, [train], (1, 2), item_popularity(train))
    assert_metrics_equal(got, want)


def test_no_user_to_evaluate_gives_nan_averages():
    model = MatrixModel(np.zeros((2, 3), np.float32))
    got = evaluate_model(model, interactions([(0, 1)], 2, 3), interactions([(0, 1)], 2, 3), ks=(1,))
    assert got["users"] == 0
    assert math.isnan(got["recall@1"]) and math.isnan(got["mrr"])


# --- by segment ----------------------------------------------------------------------------------


def test_by_user_activity_partitions_the_users():
    scores, train, valid, test = random_case(6, n_users=60, n_items=20)
    model = MatrixModel(scores)
    overall = evaluate_model(model, test, [train, valid], ks=(5,), batch_users=7)
    buckets = by_user_activity(model, test, [train, valid], ks=(5,), batch_users=7)
    counts = np.bincount(train.user_idx, minlength=60)
    assert sum(b["users"] for b in buckets.values()) == overall["users"]
    for name in ("recall@5", "ndcg@5", "mrr"):
        weighted = sum(b[name] * b["users"] for b in buckets.values()) / overall["users"]
        assert weighted == pytest.approx(overall[name], rel=1e-12)
    # each bucket equals evaluate_model restricted to its users
    first_label, first = next(iter(buckets.items()))
    lo, _, hi = first_label.removeprefix("activity ").partition("-")
    members = np.flatnonzero((counts >= int(lo)) & (counts <= int(hi or lo)))
    assert_metrics_equal(first, evaluate_model(model, test, [train, valid], ks=(5,), users=members))
    assert 2 <= len(buckets) <= 4


# --- kernels -------------------------------------------------------------------------------------


def test_metric_kernels_known_answers_numpy_and_torch():
    hits = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=bool)
    n_rel = np.array([2, 5, 1])
    d = [1 / math.log2(i + 2) for i in range(4)]
    np.testing.assert_allclose(recall_at_k(hits, n_rel, 3), [2 / 2, 0 / 5, 0])
    np.testing.assert_allclose(precision_at_k(hits, 4), [2 / 4, 1 / 4, 0])
    np.testing.assert_allclose(hit_rate_at_k(hits, 1), [1, 0, 0])
    np.testing.assert_allclose(
        ndcg_at_k(hits, n_rel, 4), [(d[0] + d[2]) / (d[0] + d[1]), d[3] / sum(d), 0.0]
    )
    as_torch = ranking_metrics(torch.from_numpy(hits), torch.from_numpy(n_rel), (2, 4))
    as_numpy = ranking_metrics(hits, n_rel, (2, 4))
    assert set(as_torch) == {
        f"{m}@{k}" for m in ("recall", "ndcg", "hr", "precision") for k in (2, 4)
    }
    for name, values in as_numpy.items():
        assert isinstance(values, np.ndarray) and isinstance(as_torch[name], torch.Tensor)
        np.testing.assert_allclose(as_torch[name].numpy(), values)
    # a user without relevant items scores 0, not NaN
    assert recall_at_k(hits[:1], np.array([0]), 2)[0] == 0.0
    assert ndcg_at_k(hits[:1], np.array([0]), 2)[0] == 0.0
    with pytest.raises(ValueError, match="k must be between 1 and the 4 ranked positions, got 5"):
        recall_at_k(hits, n_rel, 5)


@pytest.mark.parametrize("seed", range(4))
def test_top_k_equals_a_stable_sort(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, (40, 25)).astype(np.float32)  # ties everywhere
    scores[rng.random((40, 25)) < 0.3] = -np.inf  # and rows with few finite scores
    for k in (1, 4, 10, 25):
        values, indices = top_k(torch.from_numpy(scores), k)
        order = np.stack([np.lexsort((np.arange(25), -row))[:k] for row in scores])
        np.testing.assert_array_equal(indices.numpy(), order)
        np.testing.assert_array_equal(values.numpy(), np.take_along_axis(scores, order, 1))


# --- table ---------------------------------------------------------------------------------------


def test_format_metrics_table_exact():
    rows = [
        ("popularity", {"recall@10": 0.05, "ndcg@10": 0.031, "popularity@10": 812.25, "mrr": 0.1, "users": 100}),
        ("mf-bpr", {"recall@10": 0.1234567, "ndcg@10": float("nan"), "users": 100}),
    ]  # fmt: skip
    assert format_metrics_table(rows, ks=(10,)) == (
        "model       recall@10  ndcg@10  popularity@10     mrr  users\n"
        "----------  ---------  -------  -------------  ------  -----\n"
        "popularity     0.0500   0.0310          812.2  0.1000    100\n"
        "mf-bpr         0.1235        -              -       -    100\n"
    )


def test_public_surface():
    import recscale.evaluate as ev

    assert sorted(ev.__all__) == [
        "Scorer", "by_user_activity", "dcg_discounts", "evaluate_model", "format_metrics_table",
        "hit_rate_at_k", "item_popularity", "ndcg_at_k", "precision_at_k", "ranking_metrics",
        "recall_at_k", "reciprocal_rank", "top_k",
    ]  # fmt: skip
    assert all(hasattr(ev, name) for name in ev.__all__)


# --- errors --------------------------------------------------------------------------------------


def test_bad_inputs_are_named():
    scores, train, _, test = random_case(7)
    model = MatrixModel(scores)
    with pytest.raises(
        ConfigError, match=r"ks must be cut-offs between 1 and the 17 items, got \[10, 20\]"
    ):
        evaluate_model(model, test, train, ks=(10, 20))
    with pytest.raises(ModelError, match="the model scores 17 items but target is over 30 items"):
        evaluate_model(model, interactions([(0, 1)], 23, 30), ks=(5,))
    with pytest.raises(
        ModelError, match=r"target has user index 30, but the model knows users 0\.\.22"
    ):
        evaluate_model(model, interactions([(30, 1)], 31, 17), ks=(5,))
    with pytest.raises(ConfigError, match=r"user index 99 is out of range 0\.\.22"):
        evaluate_model(model, test, train, ks=(5,), users=np.array([1, 99]))
    with pytest.raises(ConfigError, match="item_popularity must have one count per item"):
        evaluate_model(model, test, train, ks=(5,), item_popularity=np.ones(3))
    nan_scores = scores.copy()
    nan_scores[test.user_idx[0], :] = np.nan  # NaN on excluded items alone would be masked
    with pytest.raises(ModelError, match="NaN scores"):
        evaluate_model(MatrixModel(nan_scores), test, train, ks=(5,))

    class Wrong:
        n_users, n_items = 23, 17

        def score(self, users):
            return torch.zeros(len(users), 16)

    with pytest.raises(ModelError, match=r"returned shape \(\d+, 16\) for \d+ users; expected"):
        evaluate_model(Wrong(), test, train, ks=(5,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    scores, train, valid, test = random_case(8, n_users=300, n_items=120, ties=True)
    cpu = evaluate_model(MatrixModel(scores), test, [train, valid], ks=(5, 20), batch_users=64)
    gpu = evaluate_model(
        MatrixModel(scores), test, [train, valid], ks=(5, 20), batch_users=64, device="cuda"
    )
    assert_metrics_equal(gpu, cpu)


def test_evaluate_imports_no_training_or_model_code():
    """Training imports evaluation for validation; the reverse would be a cycle."""
    import subprocess
    import sys

    code = (
        "import sys, recscale.evaluate; "
        "print(sorted(m for m in sys.modules if m.startswith(('recscale.train', 'recscale.models',"
        " 'recscale.ingest', 'recscale.loader'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
