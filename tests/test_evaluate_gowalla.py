"""Full-ranking evaluation at real scale: most-popular on Gowalla's LightGCN split.

29,858 users × 40,981 items, 810,128 training and 217,242 test interactions. The protocol is
LightGCN's, so the figures are comparable with that literature's MostPop rows.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from recscale.dataset import Interactions
from recscale.evaluate import by_user_activity, evaluate_model, item_popularity

DATA = Path(
    os.environ.get("RECSCALE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
GOWALLA = DATA / "gowalla"
N_USERS, N_ITEMS = 29_858, 40_981

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (GOWALLA / "train.txt.gz").exists(), reason=f"RECSCALE_DATA has no {GOWALLA}"
    ),
]


def load(name: str) -> Interactions:
    """A LightGCN text file (``user item item ...`` per line) as interactions."""
    users, items = [], []
    with gzip.open(GOWALLA / name, "rt") as fh:
        for line in fh:
            ids = np.array(line.split(), dtype=np.int32)
            if len(ids) > 1:
                users.append(np.full(len(ids) - 1, ids[0], np.int32))
                items.append(ids[1:])
    u, i = np.concatenate(users), np.concatenate(items)
    return Interactions(u, i, np.full(len(u), -1), np.ones(len(u), np.float32), N_USERS, N_ITEMS)


class MostPopular:
    n_users, n_items = N_USERS, N_ITEMS

    def __init__(self, train: Interactions) -> None:
        self.counts = torch.from_numpy(item_popularity(train).astype(np.float32))

    def score(self, users: np.ndarray) -> torch.Tensor:
        return self.counts.unsqueeze(0).expand(len(users), -1)


@pytest.fixture(scope="module")
def gowalla() -> tuple[Interactions, Interactions]:
    return load("train.txt.gz"), load("test.txt.gz")


def brute_force_popular(train: Interactions, test: Interactions, users: np.ndarray, k: int):
    """Per user: walk the global popularity order (ties by index), skipping training items."""
    counts = item_popularity(train)
    order = np.lexsort((np.arange(N_ITEMS), -counts))
    train_csr, test_csr = train.to_csr(), test.to_csr()
    recall = ndcg = 0.0
    for u in users:
        seen = train_csr.indices[train_csr.indptr[u] : train_csr.indptr[u + 1]]
        rel = set(test_csr.indices[test_csr.indptr[u] : test_csr.indptr[u + 1]].tolist())
        head = order[: k + len(seen)]  # k unseen items are always within k + |seen|
        top = head[~np.isin(head, seen)][:k]
        hits = [int(i) in rel for i in top]
        recall += sum(hits) / len(rel)
        idcg = sum(1 / math.log2(p + 2) for p in range(min(len(rel), k)))
        ndcg += sum(h / math.log2(p + 2) for p, h in enumerate(hits)) / idcg
    return recall / len(users), ndcg / len(users)


def test_most_popular_on_gowalla(gowalla):
    train, test = gowalla
    assert (len(train), len(test)) == (810_128, 217_242)
    model = MostPopular(train)
    got = evaluate_model(model, test, train, ks=(20,), batch_users=2048)
    assert got["users"] == N_USERS
    # the MostPop row commonly reported for this split: Recall@20 0.0416, NDCG@20 0.0317
    assert round(got["recall@20"], 4) == 0.0416
    assert round(got["ndcg@20"], 4) == 0.0317
    # and exactly the brute force on a sample of users
    sample = np.sort(np.random.default_rng(0).choice(N_USERS, 1500, replace=False))
    part = evaluate_model(model, test, train, ks=(20,), users=sample, batch_users=333)
    recall, ndcg = brute_force_popular(train, test, sample, 20)
    assert part["recall@20"] == pytest.approx(recall, rel=1e-12)
    assert part["ndcg@20"] == pytest.approx(ndcg, rel=1e-12)
    # segments add back up to the whole
    buckets = by_user_activity(model, test, train, ks=(20,), batch_users=2048)
    assert sum(b["users"] for b in buckets.values()) == N_USERS
    weighted = sum(b["recall@20"] * b["users"] for b in buckets.values()) / N_USERS
    assert weighted == pytest.approx(got["recall@20"], rel=1e-12)
