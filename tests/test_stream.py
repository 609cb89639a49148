"""The streaming Parquet loader: exactly-once sharding, deterministic order, exact resume,
vectorised negatives, memory bounded by the shuffle buffer."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recscale.config import TrainConfig
from recscale.errors import ConfigError, DatasetError, RunError
from recscale.loader import (
    RowGroups,
    StreamLoader,
    World,
    interleave_position,
    reader_spans,
    stream,
)
from recscale.loader.negatives import popularity_cdf, sample_negatives
from recscale.train import load_checkpoint, train

ITEMS_PER_USER = 50  # row r is (user r // 50, item r % 50): every row is a distinct pair
N_ITEMS = 200


def write_part(directory: Path, group_sizes: list[list[int]]) -> Path:
    """One Parquet file per inner list, one row group per size; rows numbered 0.. in order."""
    directory.mkdir(parents=True, exist_ok=True)
    row = 0
    for f, sizes in enumerate(group_sizes):
        with pq.ParquetWriter(
            directory / f"part-{f:05d}.parquet",
            pa.schema([("user_idx", pa.int32()), ("item_idx", pa.int32()), ("ts", pa.int64())]),
        ) as writer:
            for size in sizes:
                r = np.arange(row, row + size)
                writer.write_table(
                    pa.table(
                        {
                            "user_idx": pa.array(r // ITEMS_PER_USER, pa.int32()),
                            "item_idx": pa.array(r % ITEMS_PER_USER, pa.int32()),
                            "ts": pa.array(r, pa.int64()),
                        }
                    ),
                    row_group_size=max(size, 1),
                )
                row += size
    return directory


def rows_of(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [
        u * ITEMS_PER_USER + i
        for b in batches
        for u, i in zip(b["users"].tolist(), b["pos"].tolist(), strict=True)
    ]


def same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def part(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 1,000 rows in 3 files of uneven row groups, one of them empty
    return write_part(tmp_path_factory.mktemp("stream"), [[130, 70, 200], [0, 250], [350]])


# ---- the pure plan: every row exactly once, over ranks and workers, without processes ----


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    world_size=st.integers(1, 4),
    num_workers=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    epoch=st.integers(0, 5),
)
def test_spans_give_every_row_to_one_reader(
    rows: list[int], world_size: int, num_workers: int, seed: int, epoch: int
) -> None:
    sizes = np.asarray(rows)
    n = int(sizes.sum())
    first_row = np.cumsum(sizes) - sizes
    per_reader = []
    for rank in range(world_size):
        mine = []
        for worker in range(num_workers):
            spans = reader_spans(sizes, World(rank, world_size, worker, num_workers), seed, epoch)
            assert spans.shape[1] == 3 and (spans[:, 2] > spans[:, 1]).all()
            assert (spans[:, 2] <= sizes[spans[:, 0]]).all()
            mine += [int(first_row[g]) + r for g, a, b in spans for r in range(a, b)]
        per_reader.append(mine)
    per_rank = -(-n // world_size)
    assert all(len(share) == per_rank for share in per_reader)  # ranks step in lockstep
    seen = sorted(r for share in per_reader for r in share)
    if n % world_size == 0:
        assert seen == list(range(n))
    else:  # the top-up repeats fewer than world_size rows and misses none
        assert set(seen) == set(range(n)) and len(seen) - n < world_size


def test_spans_are_a_function_of_seed_and_epoch() -> None:
    sizes = np.asarray([5, 9, 3, 7, 11, 2])
    world = World(1, 2, 0, 2)
    assert np.array_equal(reader_spans(sizes, world, 3, 1), reader_spans(sizes, world, 3, 1))
    orders = {tuple(reader_spans(sizes, World(), 3, e)[:, 0]) for e in range(6)}
    assert len(orders) > 1  # the row-group order changes from epoch to epoch


@pytest.mark.parametrize(
    ("counts", "consumed", "per_chunk", "done", "nxt", "skip"),
    [
        ([3, 3], 0, 1, [0, 0], 0, 0),
        ([3, 3], 3, 1, [2, 1], 1, 0),
        ([3, 2, 3], 7, 1, [3, 2, 2], 2, 0),  # worker 1 ran out after round 1
        ([1, 4], 3, 1, [1, 2], 1, 0),
        ([2, 2], 4, 1, [2, 2], 0, 0),
        # chunks of 2: w0 [0, 1], w1 [0, 1], w0 [2, 3], w1 [2], w0 [4]
        ([5, 3], 5, 2, [2, 2], 0, 1),
        ([5, 3], 6, 2, [4, 2], 1, 0),
        ([5, 3], 7, 2, [4, 3], 0, 0),
    ],
)
def test_interleave_position(
    counts: list[int], consumed: int, per_chunk: int, done: list[int], nxt: int, skip: int
) -> None:
    got, who, left = interleave_position(counts, consumed, per_chunk)
    assert (got.tolist(), who, left) == (done, nxt, skip)


# ---- the loader over real files ----


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
# 64 rows, one batch a message: chunks shorter than a window, so workers rewrite their shared
# buffers, while list() keeps every batch; a batch that shared a buffer would be overwritten
@pytest.mark.parametrize("chunk_rows", [stream.CHUNK_ROWS, 64])
def test_every_row_once_per_epoch_across_ranks_and_workers(
    part: Path,
    num_workers: int,
    world_size: int,
    chunk_rows: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream, "CHUNK_ROWS", chunk_rows)
    loaders = [
        StreamLoader(
            part,
            n_items=N_ITEMS,
            batch_size=64,
            shuffle_buffer=150,
            num_workers=num_workers,
            seed=7,
            world=World(rank, world_size),
        )
        for rank in range(world_size)
    ]
    for epoch in range(2):
        shares = []
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == len(loader)
            assert loader.state_dict()["epoch"] == epoch + 1
            shares.append(rows_of(batches))
        assert sorted(r for s in shares for r in s) == list(range(1000)), epoch
        assert {len(s) for s in shares} == {1000 // world_size}


def test_batches_are_shuffled_across_row_groups(part: Path) -> None:
    loader = StreamLoader(part, n_items=N_ITEMS, batch_size=100, shuffle_buffer=400, seed=1)
    first = rows_of([next(iter(loader))])
    assert len(first) == 100
    # a shuffled batch of 100 from 400-row windows: rows from at least two row groups, not a run
    bounds = np.cumsum([0, 130, 70, 200, 250, 350])
    assert len(set(np.searchsorted(bounds, first, side="right"))) >= 2
    assert sorted(first) != list(range(min(first), min(first) + 100))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_order_is_deterministic_for_a_seed(part: Path, num_workers: int) -> None:
    def epoch(seed: int) -> list[dict[str, torch.Tensor]]:
        return list(
            StreamLoader(
                part,
                n_items=N_ITEMS,
                batch_size=64,
                shuffle_buffer=200,
                num_workers=num_workers,
                seed=seed,
            )
        )

    assert same_batches(epoch(3), epoch(3))
    assert rows_of(epoch(3)) != rows_of(epoch(4))


# 3 workers on a 2-core machine: torch warns it may be slow, which is beside the point here
@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("num_workers", [0, 2, 3])
@pytest.mark.parametrize("stop_at", [1, 6, 9, 16])
@pytest.mark.parametrize("batch_size", [64, 83])  # 83: 3 workers hand out 2, 3 and 3 batches
@pytest.mark.parametrize("chunk_rows", [stream.CHUNK_ROWS, 128])  # 128: two batches a message
def test_resume_mid_epoch_gives_the_same_batches(
    part: Path,
    num_workers: int,
    stop_at: int,
    batch_size: int,
    chunk_rows: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream, "CHUNK_ROWS", chunk_rows)

    def make() -> StreamLoader:
        return StreamLoader(
            part,
            n_items=N_ITEMS,
            batch_size=batch_size,
            n_negatives=3,
            shuffle_buffer=150,
            num_workers=num_workers,
            seed=11,
            world=World(1, 2),
        )

    reference = make()
    expected = [b for _ in range(3) for b in reference]  # three uninterrupted epochs
    killed = make()
    got = []
    while len(got) < stop_at:  # an epoch is 7 to 9 batches: later stops fall in epochs 2 and 3
        for batch in killed:
            got.append(batch)
            if len(got) == stop_at:
                break
    state = killed.state_dict()
    del killed
    resumed = make()
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.batch) == (state["epoch"], state["batch"]) != (0, 0)
    rest = []
    while resumed.epoch < 3:
        rest += list(resumed)
    assert same_batches(got + rest, expected)


def test_state_records_where_each_reader_reads_next(part: Path) -> None:
    loader = StreamLoader(
        part, n_items=N_ITEMS, batch_size=50, shuffle_buffer=100, num_workers=2, seed=0
    )
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["batch"], state["seed"]) == (0, 5, 0)
    # each worker hands over its 10 batches in one message: the first 5 are worker 0's
    # (250 rows: 50 into its third window), worker 1 has not started
    done = [p["window_rows_done"] for p in state["readers"]]
    assert done == [50, 0]
    spans = reader_spans(loader.groups.rows, World(0, 1, 0, 2), 0, 0)
    lengths = np.cumsum(spans[:, 2] - spans[:, 1])
    g = int(np.searchsorted(lengths, 200, side="right"))
    assert state["readers"][0]["row_group"] == int(loader.groups.group[spans[g, 0]])
    assert state["readers"][0]["file"] == int(loader.groups.file[spans[g, 0]])


def test_resume_with_another_set_up_is_refused(part: Path) -> None:
    state = StreamLoader(part, n_items=N_ITEMS, batch_size=64, num_workers=0).state_dict()
    other = StreamLoader(part, n_items=N_ITEMS, batch_size=64, num_workers=2)
    with pytest.raises(RunError, match=r"num_workers=0 \(now 2\)"):
        other.load_state_dict(state)


# ---- negatives ----


def test_negatives_are_never_positives(part: Path) -> None:
    loader = StreamLoader(part, n_items=N_ITEMS, batch_size=128, n_negatives=20, seed=2)
    for b in loader:
        neg = b["neg"].numpy()
        assert neg.shape == (len(b["users"]), 20) and neg.dtype == np.int64
        assert neg.min() >= 0 and neg.max() < N_ITEMS
        # each of the 20 users owns exactly items 0..49: a negative is never one of them
        assert (neg >= ITEMS_PER_USER).all()


def test_popularity_negatives_follow_counts(part: Path) -> None:
    loader = StreamLoader(
        part,
        n_items=N_ITEMS,
        batch_size=1000,
        n_negatives=200,
        negatives="popularity",
        popularity_exponent=1.0,
        reject_positives=False,
    )
    neg = next(iter(loader))["neg"].numpy().ravel()
    # items 0..49 each appear 20 times, the other 150 never: only they are drawn, evenly
    assert set(np.unique(neg).tolist()) == set(range(ITEMS_PER_USER))
    counts = np.bincount(neg, minlength=ITEMS_PER_USER)
    expected = len(neg) / ITEMS_PER_USER  # 4,000 each
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)


def test_popularity_cdf_and_draws_against_a_direct_count() -> None:
    counts = np.array([1, 0, 4, 9, 2])
    cdf = popularity_cdf(counts, exponent=0.5)
    weights = np.sqrt(counts) / np.sqrt(counts).sum()
    assert np.allclose(np.diff(np.concatenate([[0], cdf])), weights)
    draws = sample_negatives(
        np.zeros(200_000, dtype=np.int64), 1, 5, np.random.default_rng(0), cdf=cdf
    ).ravel()
    freq = np.bincount(draws, minlength=5) / len(draws)
    assert freq[1] == 0 and np.abs(freq - weights).max() < 0.005


def test_popularity_of_nothing_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="at least one item with a positive count"):
        popularity_cdf(np.zeros(3))


# ---- memory and bad input ----


def _peak_bytes(directory: Path, shuffle_buffer: int) -> int:
    loader = StreamLoader(
        directory,
        n_items=N_ITEMS,
        batch_size=256,
        shuffle_buffer=shuffle_buffer,
        reject_positives=False,
    )
    tracemalloc.start()
    try:
        for _ in loader:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_the_buffer_not_the_data(tmp_path: Path) -> None:
    small = write_part(tmp_path / "small", [[20_000] * 2])
    big = write_part(tmp_path / "big", [[20_000] * 20])  # 10× the rows, same row groups
    peak_small, peak_big = _peak_bytes(small, 10_000), _peak_bytes(big, 10_000)
    # numpy's allocations: the decoded row group and the window, about 16 bytes a row each
    assert peak_big < 1.5 * peak_small
    assert peak_big < 2_000_000  # the 400,000 rows would be 6.4 MB as int64 pairs
    assert _peak_bytes(big, 40_000) > 1.5 * peak_big  # the buffer is what it grows with


def test_missing_and_wrong_files_are_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no part-\*\.parquet files"):
        StreamLoader(tmp_path, n_items=3, batch_size=2)
    pq.write_table(pa.table({"user": [1]}), tmp_path / "part-00000.parquet")
    with pytest.raises(DatasetError, match="no column item_idx, user_idx"):
        StreamLoader(tmp_path, n_items=3, batch_size=2)
    with pytest.raises(DatasetError, match="unreadable Parquet"):
        RowGroups([tmp_path / "missing.parquet"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size, n_negatives and shuffle_buffer must be > 0"),
        ({"shuffle_buffer": 0}, "must be > 0, got 8, 1 and 0"),
        ({"num_workers": -1}, "num_workers must be >= 0, got -1"),
        ({"negatives": "hard"}, "negatives 'hard' is unknown; expected one of uniform, popularity"),
    ],
)
def test_bad_settings_are_config_errors(part: Path, kwargs: dict, message: str) -> None:
    settings_ = {"n_items": N_ITEMS, "batch_size": 8, **kwargs}
    with pytest.raises(ConfigError, match=message):
        StreamLoader(part, **settings_)


def test_item_out_of_range_is_a_dataset_error(part: Path) -> None:
    with pytest.raises(DatasetError, match=r"item_idx outside 0\.\.9"):
        StreamLoader(part, n_items=10, batch_size=8, negatives="popularity")


def test_public_surface_of_the_loader() -> None:
    import recscale.loader

    assert recscale.loader.__all__ == [
        "InMemoryLoader",
        "ParquetStream",
        "Positives",
        "RowGroups",
        "SequenceLoader",
        "StreamLoader",
        "World",
        "interleave_position",
        "is_positive",
        "last_items",
        "partition",
        "popularity_cdf",
        "positive_keys",
        "reader_range",
        "reader_spans",
        "sample_negatives",
    ]
    assert all(hasattr(recscale.loader, name) for name in recscale.loader.__all__)


# ---- training on streamed batches ----


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recscale.testing import block_log, write_tiny_dataset

    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "blocks", block_log(valid=True))


def _stream_config(**changes: object) -> TrainConfig:
    base = {
        "model": "mf-bpr",
        "split": "given",
        "epochs": 4,
        "batch_size": 48,
        "device": "cpu",
        "progress": False,
        "num_threads": 1,
        "validate_k": 5,
        "lr_schedule": "constant",
        "loader": "stream",
        "shuffle_buffer": 50,
    }
    return TrainConfig(**{**base, **changes})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_on_streamed_batches_resumes_to_the_same_model(
    blocks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_workers: int
) -> None:
    from recscale.models import MFBPR

    params = {"dim": 8, "lr": 0.05, "n_negatives": 2}
    config = _stream_config(num_workers=num_workers)
    straight = train(blocks, config, params, run_dir=tmp_path / "straight")
    last = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    assert last["loader"]["rows"] == 128 and last["loader"]["num_workers"] == num_workers
    # the block log is learnable: each user's held-out item ranks high after 4 epochs
    assert straight.fit_result is not None and straight.fit_result.best_metric > 0.3

    calls = {"n": 0}
    original = MFBPR.batch_loss

    def crashing(self: MFBPR, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 8:  # mid epoch 3: the last checkpoint is from epoch 2
            raise Crash
        return original(self, batch)

    monkeypatch.setattr(MFBPR, "batch_loss", crashing)
    with pytest.raises(Crash):
        train(blocks, config, params, run_dir=tmp_path / "crashed")
    monkeypatch.undo()
    resumed = train(blocks, config, params, run_dir=tmp_path / "crashed", resume=True)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_stream_loader_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="sampling = 'users' draws users at random"):
        TrainConfig(loader="stream", sampling="users")
    with pytest.raises(ConfigError, match="num_workers must be >= 0, got -2"):
        TrainConfig(num_workers=-2)
    with pytest.raises(ConfigError, match="shuffle_buffer"):
        TrainConfig(shuffle_buffer=0)


def test_sequence_models_refuse_the_stream_loader(blocks: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sasrec trains on whole user sequences"):
        train(
            blocks,
            _stream_config(model="sasrec"),
            {"dim": 8, "max_len": 4},
            run_dir=tmp_path / "run",
        )


# --- the workers' shared blocks (recscale.loader.handover) ----------------------------------


def copied(batches: object) -> list[dict[str, torch.Tensor]]:
    """Each batch cloned as it comes, so the loader may reuse its memory at once."""
    return [{k: v.clone() for k, v in b.items()} for b in batches]  # type: ignore[attr-defined]


@pytest.mark.parametrize("chunk_rows", [stream.CHUNK_ROWS, 128])
def test_batches_kept_by_the_consumer_are_never_overwritten(
    part: Path, monkeypatch: pytest.MonkeyPatch, chunk_rows: int
) -> None:
    # batches of 64, windows of 100 rows: many messages straddle windows, and with every batch
    # kept the workers run out of shared blocks and send windows as tensors of their own
    monkeypatch.setattr(stream, "CHUNK_ROWS", chunk_rows)
    settings = dict(n_items=N_ITEMS, batch_size=64, shuffle_buffer=100, num_workers=2, seed=4)
    expected = StreamLoader(part, **settings)
    epochs = [copied(expected), copied(expected)]
    loader = StreamLoader(part, **settings)
    kept_first = list(loader)  # held through the second epoch, whose workers reuse blocks
    kept_second = list(loader)
    assert same_batches(kept_first, epochs[0]) and same_batches(kept_second, epochs[1])
    assert sorted(rows_of(kept_first)) == list(range(1_000))


def test_dropped_batches_release_their_blocks(part: Path) -> None:
    loader = StreamLoader(part, n_items=N_ITEMS, batch_size=64, shuffle_buffer=500, num_workers=1)
    shared = loader._shared
    assert shared is not None
    batches = list(loader)
    shared.collect()
    assert int(shared.released[0]) == 0  # the epoch's one message: its batches are all kept
    del batches
    shared.collect()
    assert int(shared.released[0]) == 1
    held = next(iter(loader))
    shared.collect()
    assert int(shared.released[0]) == 0  # the new epoch's first message is still viewed
    del held
    shared.collect()
    assert int(shared.released[0]) == 1


def test_a_new_pass_ends_the_one_before(part: Path) -> None:
    loader = StreamLoader(part, n_items=N_ITEMS, batch_size=100, num_workers=2)
    first = iter(loader)
    head = next(first)
    rest = list(loader)  # goes on from the batch after ``head``, as a resumed epoch would
    with pytest.raises(StopIteration):
        next(first)
    assert sorted(rows_of([head, *rest])) == list(range(1_000))
