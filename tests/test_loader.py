"""The in-memory loader: every row once per epoch, true negatives, exact resume, sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recscale.errors import ConfigError, RunError
from recscale.loader import (
    InMemoryLoader,
    World,
    is_positive,
    partition,
    positive_keys,
    sample_negatives,
)
from recscale.testing import block_log, interactions

TRAIN = block_log()["train"]  # 32 users × 24 items, 160 rows, each user 5 of its block's 6 items


def _pairs(users: np.ndarray, items: np.ndarray) -> list[tuple[int, int]]:
    return sorted(zip(users.tolist(), items.tolist(), strict=True))


def _epoch(loader: InMemoryLoader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def test_every_row_exactly_once_per_epoch() -> None:
    loader = InMemoryLoader(TRAIN, batch_size=48, n_negatives=3, seed=1)
    assert len(loader) == 4  # 160 rows: 48 + 48 + 48 + 16
    for epoch in range(2):
        batches = _epoch(loader)
        assert [len(b["users"]) for b in batches] == [48, 48, 48, 16]
        users = torch.cat([b["users"] for b in batches]).numpy()
        pos = torch.cat([b["pos"] for b in batches]).numpy()
        assert _pairs(users, pos) == _pairs(TRAIN.user_idx, TRAIN.item_idx), epoch
        assert loader.state_dict()["epoch"] == epoch + 1


def test_batches_are_int64_with_negatives_per_row() -> None:
    batch = next(iter(InMemoryLoader(TRAIN, batch_size=10, n_negatives=7, seed=0)))
    assert batch["users"].dtype == batch["pos"].dtype == batch["neg"].dtype == torch.int64
    assert batch["users"].shape == (10,) and batch["neg"].shape == (10, 7)


def test_negatives_are_never_positives_when_rejecting() -> None:
    seen = set(zip(TRAIN.user_idx.tolist(), TRAIN.item_idx.tolist(), strict=True))
    loader = InMemoryLoader(TRAIN, batch_size=64, n_negatives=20, seed=5)
    for _ in range(3):
        for b in loader:
            neg = b["neg"].numpy()
            assert neg.min() >= 0 and neg.max() < TRAIN.n_items
            for u, row in zip(b["users"].tolist(), neg.tolist(), strict=True):
                assert not any((u, i) in seen for i in row)


def test_without_rejection_negatives_may_be_positives() -> None:
    # each user has 5 of 24 items, so about 21% of uniform draws are positives
    seen = set(zip(TRAIN.user_idx.tolist(), TRAIN.item_idx.tolist(), strict=True))
    loader = InMemoryLoader(TRAIN, batch_size=160, n_negatives=10, seed=0, reject_positives=False)
    b = next(iter(loader))
    hits = sum(
        (u, i) in seen
        for u, row in zip(b["users"].tolist(), b["neg"].tolist(), strict=True)
        for i in row
    )
    assert 200 < hits < 480  # 1600 draws: 5/24 of them expected (333)


def test_rejection_finds_the_only_negative() -> None:
    # user 0 has every item but item 4: every negative it gets must be 4
    keys = positive_keys(np.zeros(4, np.int64), np.arange(4), 5)
    neg = sample_negatives(np.zeros(200, np.int64), 3, 5, np.random.default_rng(0), keys)
    assert (neg == 4).all()


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 12)), max_size=60),
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 12)), min_size=1, max_size=60),
)
def test_is_positive_matches_a_set(
    pairs: list[tuple[int, int]], queries: list[tuple[int, int]]
) -> None:
    users = np.array([p[0] for p in pairs], np.int64)
    items = np.array([p[1] for p in pairs], np.int64)
    keys = positive_keys(users, items, 13)
    qu = np.array([q[0] for q in queries])
    qi = np.array([q[1] for q in queries])
    expected = [q in set(pairs) for q in queries]
    assert is_positive(qu, qi, keys).tolist() == expected


def test_same_seed_same_batches_and_epochs_differ() -> None:
    a = _epoch(InMemoryLoader(TRAIN, batch_size=32, n_negatives=2, seed=7))
    b = _epoch(InMemoryLoader(TRAIN, batch_size=32, n_negatives=2, seed=7))
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in ("users", "pos", "neg"))
    loader = InMemoryLoader(TRAIN, batch_size=160, seed=7)
    (first,), (second,) = _epoch(loader), _epoch(loader)
    assert not torch.equal(first["users"], second["users"])
    assert _pairs(first["users"].numpy(), first["pos"].numpy()) == _pairs(
        second["users"].numpy(), second["pos"].numpy()
    )


@pytest.mark.parametrize("sampling", ["interactions", "users"])
def test_resume_mid_epoch_continues_exactly(sampling: str) -> None:
    def make() -> InMemoryLoader:
        return InMemoryLoader(TRAIN, batch_size=24, n_negatives=3, seed=11, sampling=sampling)

    straight = make()
    expected = _epoch(straight) + _epoch(straight)

    crashed = make()
    got = _epoch(crashed)
    it = iter(crashed)
    got += [next(it), next(it), next(it)]
    state = crashed.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 3

    resumed = make()
    resumed.load_state_dict(state)
    got += _epoch(resumed)
    assert len(got) == len(expected) == 14
    for x, y in zip(got, expected, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in ("users", "pos", "neg"))
    assert resumed.state_dict()["epoch"] == 2 and resumed.state_dict()["batch"] == 0


def test_state_from_another_set_up_is_refused() -> None:
    state = InMemoryLoader(TRAIN, batch_size=24, seed=1).state_dict()
    other = InMemoryLoader(TRAIN, batch_size=32, seed=2)
    with pytest.raises(RunError, match=r"seed=1 \(now 2\), batch_size=24 \(now 32\)"):
        other.load_state_dict(state)


def test_bad_sizes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="batch_size and n_negatives must be > 0, got 0 and 1"):
        InMemoryLoader(TRAIN, batch_size=0)


@pytest.mark.parametrize("n", [0, 1, 7, 12, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_partition_gives_every_row_to_a_rank(n: int, world_size: int) -> None:
    order = np.random.default_rng(n).permutation(n)
    shares = [partition(order, World(r, world_size)) for r in range(world_size)]
    per_rank = -(-n // world_size)
    assert all(share.shape == (per_rank,) for share in shares)
    together = np.concatenate(shares)
    assert set(together.tolist()) == set(order.tolist())
    if n % world_size == 0:  # then exactly once
        assert sorted(together.tolist()) == sorted(order.tolist())
    else:  # padding repeats fewer than world_size rows, from the start of the order
        assert len(together) - n == per_rank * world_size - n < world_size


def test_ranks_read_disjoint_rows_of_one_epoch() -> None:
    loaders = [InMemoryLoader(TRAIN, batch_size=16, seed=3, world=World(r, 4)) for r in range(4)]
    assert {len(lo) for lo in loaders} == {3}  # 40 rows per rank
    rows = [torch.cat([b["users"] * 100 + b["pos"] for b in lo]).tolist() for lo in loaders]
    assert sorted(r for share in rows for r in share) == sorted(
        (TRAIN.user_idx * 100 + TRAIN.item_idx).tolist()
    )


def test_world_from_env_and_validation() -> None:
    assert World.from_env({}) == World(0, 1)
    assert World.from_env({"RANK": "2", "WORLD_SIZE": "4"}) == World(2, 4)
    with pytest.raises(ConfigError, match=r"rank must be in 0\.\.world_size-1"):
        World(4, 4)
    with pytest.raises(ConfigError, match="RANK='x'"):
        World.from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_duplicate_rows_are_kept() -> None:
    dup = interactions([0, 0, 1], [2, 2, 3], 2, 5)
    batch = next(iter(InMemoryLoader(dup, batch_size=10, seed=0)))
    assert _pairs(batch["users"].numpy(), batch["pos"].numpy()) == [(0, 2), (0, 2), (1, 3)]
    assert not np.isin(batch["neg"].numpy()[:2], [2]).any()


def test_user_sampling_weighs_every_user_the_same() -> None:
    # user 0 has 1 item, user 1 has 9, user 2 none: by rows user 0 is 10%, by users 50%
    log = interactions([0] + [1] * 9, [0, *range(1, 10)], 3, 20)
    seen = set(zip(log.user_idx.tolist(), log.item_idx.tolist(), strict=True))
    by_rows = InMemoryLoader(log, batch_size=4, seed=0, sampling="interactions")
    by_users = InMemoryLoader(log, batch_size=4, seed=0, sampling="users")
    assert len(by_users) == len(by_rows) == 3  # the same 10 draws per epoch
    assert sorted(torch.cat([b["users"] for b in by_rows]).tolist()) == [0] + [1] * 9
    users, pos = [], []
    for _ in range(300):
        for b in by_users:
            users += b["users"].tolist()
            pos += b["pos"].tolist()
    assert len(users) == 3000 and 2 not in users
    assert 0.45 < users.count(0) / len(users) < 0.55
    assert set(zip(users, pos, strict=True)) == seen  # only true pairs, and all of them


def test_unknown_sampling_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="sampling 'popular' is unknown; expected one of"):
        InMemoryLoader(TRAIN, batch_size=8, sampling="popular")


def test_positives_search_inside_each_users_slice() -> None:
    # users of very different degrees (1 to 600 items) and queries for unknown users
    rng = np.random.default_rng(4)
    users = np.repeat(np.arange(6), [1, 600, 3, 0, 250, 40])
    items = np.concatenate([rng.choice(1000, n, replace=False) for n in [1, 600, 3, 0, 250, 40]])
    positives = positive_keys(users, items, 1000)
    assert positives.steps == 10  # ceil(log2(600 + 1))
    qu, qi = rng.integers(0, 9, 20_000), rng.integers(0, 1000, 20_000)
    truth = set(zip(users.tolist(), items.tolist(), strict=True))
    expected = [(u, i) in truth for u, i in zip(qu.tolist(), qi.tolist(), strict=True)]
    assert is_positive(qu, qi, positives).tolist() == expected
    assert is_positive(users, items, positives).all()
