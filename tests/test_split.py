"""recscale.ingest.split: every strategy against a brute-force expectation and conservation laws.

Datasets are written directly with the recscale.dataset helpers, so these tests depend on the
dataset contract only, not on the ingest pipeline.
"""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recscale.config import SplitConfig, config_from_dict
from recscale.dataset import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    USERS_SCHEMA,
    Manifest,
    open_dataset,
    read_parts,
    write_parquet_parts,
)
from recscale.errors import ConfigError, DatasetError, SplitNotFoundError
from recscale.ingest.split import make_split

Row = tuple[int, int, int | None, float]


def _table(rows: list[Row]) -> pa.Table:
    users, items, ts, values = zip(*rows, strict=True) if rows else ((), (), (), ())
    return pa.table(
        {
            "user_idx": pa.array(users, pa.int32()),
            "item_idx": pa.array(items, pa.int32()),
            "ts": pa.array(ts, pa.int64()),
            "value": pa.array(values, pa.float32()),
        },
        schema=INTERACTIONS_SCHEMA,
    )


def write_dataset(
    path: Path, rows: list[Row], *, given: dict[str, list[Row]] | None = None, files: int = 2
) -> Path:
    """A dataset directory holding ``rows`` (in ``files`` parts) and optionally a given split."""
    table = _table(rows)
    n_users = max(r[0] for r in rows) + 1
    n_items = max(r[1] for r in rows) + 1
    path.mkdir(parents=True)
    # several part files: the split must read a dataset the way ingest lays it out
    write_parquet_parts(
        table,
        path / "interactions",
        INTERACTIONS_SCHEMA,
        rows_per_file=max(1, -(-len(rows) // files)),
    )
    pq.write_table(
        pa.table(
            {
                "user_idx": pa.array(range(n_users), pa.int32()),
                "user_id": [f"u{i}" for i in range(n_users)],
            },
            schema=USERS_SCHEMA,
        ),
        path / "users.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "item_idx": pa.array(range(n_items), pa.int32()),
                "item_id": [f"i{i}" for i in range(n_items)],
            },
            schema=ITEMS_SCHEMA,
        ),
        path / "items.parquet",
    )
    Manifest(
        n_users=n_users,
        n_items=n_items,
        n_interactions=len(rows),
        n_rejected=0,
        n_input_rows=len(rows),
        columns={"user": "u", "item": "i", "time": "t", "value": None},
        value_kind="implicit",
    ).write(path)
    if given is not None:
        root = path / "splits" / "given"
        for part, part_rows in given.items():
            write_parquet_parts(_table(part_rows), root / part, INTERACTIONS_SCHEMA)
        (root / "split.json").write_text(json.dumps({"name": "given", "strategy": "given"}))
    return path


def rows_of(split, part: str) -> list[Row]:
    t = split.table(part)
    return list(
        zip(
            t.column("user_idx").to_pylist(),
            t.column("item_idx").to_pylist(),
            t.column("ts").to_pylist(),
            t.column("value").to_pylist(),
            strict=True,
        )
    )


def all_parts(split) -> dict[str, list[Row]]:
    return {p: rows_of(split, p) for p in ("train", "valid", "test") if split.has(p)}


def assert_conserved(parts: dict[str, list[Row]], rows: list[Row]) -> None:
    """train ∪ valid ∪ test == the dataset, as multisets of whole rows."""
    union = Counter()
    for part_rows in parts.values():
        union.update(part_rows)
    assert union == Counter(rows)
    assert sum(len(r) for r in parts.values()) == len(rows)


def random_rows(seed: int, n_users: int = 40, n_items: int = 30, with_ts: bool = True) -> list[Row]:
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    for u in range(n_users):
        n = int(rng.integers(1, 12))
        items = rng.integers(0, n_items, n)
        # few distinct times so that ties in ts (and repeated items) really occur
        times = rng.integers(0, 6, n)
        values = rng.integers(1, 3, n)
        for i, t, v in zip(items, times, values, strict=True):
            rows.append((u, int(i), int(t) if with_ts else None, float(v)))
    rows.append(rows[0])  # an exact duplicate row must survive as two rows
    return rows


@pytest.fixture
def rows() -> list[Row]:
    return random_rows(1)


@pytest.fixture
def ds_path(tmp_path: Path, rows: list[Row]) -> Path:
    return write_dataset(tmp_path / "ds", rows)


# --- leave-last --------------------------------------------------------------------------------


def expected_leave_last(rows: list[Row], k: int, valid: bool, min_history: int):
    """Brute force: sort each user's rows by (ts, item, value) and cut the tail."""
    by_user: dict[int, list[Row]] = {}
    for r in rows:
        by_user.setdefault(r[0], []).append(r)
    out: dict[str, Counter] = {"train": Counter(), "valid": Counter(), "test": Counter()}
    for user_rows in by_user.values():
        ordered = sorted(user_rows, key=lambda r: (-1 if r[2] is None else r[2], r[1], r[3]))
        if len(ordered) < min_history:
            out["train"].update(ordered)
            continue
        out["test"].update(ordered[len(ordered) - k :])
        rest = ordered[: max(0, len(ordered) - k)]
        if valid:
            out["valid"].update(rest[max(0, len(rest) - k) :])
            rest = rest[: max(0, len(rest) - k)]
        out["train"].update(rest)
    return out


@pytest.mark.parametrize(("k", "valid", "min_history"), [(1, True, 3), (2, True, 0), (1, False, 2)])
def test_leave_last_holds_out_each_users_latest_k(ds_path, rows, k, valid, min_history):
    split = make_split(ds_path, SplitConfig(k=k, valid=valid, min_history=min_history))
    parts = all_parts(split)
    assert_conserved(parts, rows)
    expected = expected_leave_last(rows, k, valid, min_history)
    assert Counter(parts["test"]) == expected["test"]
    assert Counter(parts["train"]) == expected["train"]
    if valid:
        assert Counter(parts["valid"]) == expected["valid"]
    else:
        assert not (split.path / "valid").exists()
    meta = split.meta
    assert meta["name"] == "leave-last"
    assert meta["strategy"] == "leave-last"
    assert meta["order"] == "time"
    assert meta["counts"] == {
        "train": len(parts["train"]),
        "valid": len(parts.get("valid", [])),
        "test": len(parts["test"]),
    }
    assert meta["params"]["k"] == k and meta["params"]["name"] == "leave-last"


def test_leave_last_known_answer(tmp_path):
    rows = [
        # user 0: times 5, 1, 9, 3 -> test (0,12,9), valid (0,10,5)
        (0, 10, 5, 1.0), (0, 11, 1, 1.0), (0, 12, 9, 1.0), (0, 13, 3, 1.0),
        # user 1: a tie at the latest time is broken by item index: item 4 is "later" than 2
        (1, 2, 7, 1.0), (1, 4, 7, 1.0), (1, 3, 1, 1.0),
        # user 2: two interactions < min_history 3: all in train
        (2, 1, 1, 1.0), (2, 2, 2, 1.0),
    ]  # fmt: skip
    split = make_split(write_dataset(tmp_path / "ds", rows), SplitConfig(k=1, min_history=3))
    assert rows_of(split, "test") == [(0, 12, 9, 1.0), (1, 4, 7, 1.0)]
    assert rows_of(split, "valid") == [(0, 10, 5, 1.0), (1, 2, 7, 1.0)]
    # output order: user, then time, then item
    assert rows_of(split, "train") == [
        (0, 11, 1, 1.0), (0, 13, 3, 1.0), (1, 3, 1, 1.0), (2, 1, 1, 1.0), (2, 2, 2, 1.0)
    ]  # fmt: skip
    assert split.meta["users"] == {"train": 3, "valid": 2, "test": 2}


def test_leave_last_without_timestamps_orders_by_seeded_random_key(tmp_path):
    rows = random_rows(2, with_ts=False)
    path = write_dataset(tmp_path / "ds", rows)
    a = make_split(path, SplitConfig(k=1, seed=7, name="a"))
    b = make_split(path, SplitConfig(k=1, seed=7, name="b"))
    c = make_split(path, SplitConfig(k=1, seed=8, name="c"))
    assert a.meta["order"] == "random" and a.meta["rows_without_ts"] == len(rows)
    pa_, pb, pc = all_parts(a), all_parts(b), all_parts(c)
    assert_conserved(pa_, rows)
    assert pa_ == pb
    assert pa_ != pc
    n_per_user = Counter(r[0] for r in rows)
    test_per_user = Counter(r[0] for r in pa_["test"])
    valid_per_user = Counter(r[0] for r in pa_["valid"])
    for user, n in n_per_user.items():
        assert test_per_user[user] == (1 if n >= 3 else 0)
        assert valid_per_user[user] == (1 if n >= 3 else 0)


def test_rows_without_time_among_timed_ones_count_as_oldest(tmp_path):
    rows = [(0, 1, None, 1.0), (0, 2, 100, 1.0), (0, 3, 50, 1.0), (0, 4, None, 1.0)]
    split = make_split(write_dataset(tmp_path / "ds", rows), SplitConfig(min_history=1))
    assert rows_of(split, "test") == [(0, 2, 100, 1.0)]
    assert rows_of(split, "valid") == [(0, 3, 50, 1.0)]
    assert sorted(rows_of(split, "train"), key=str) == [(0, 1, None, 1.0), (0, 4, None, 1.0)]
    assert split.meta["order"] == "time" and split.meta["rows_without_ts"] == 2


# --- temporal ----------------------------------------------------------------------------------


def test_temporal_quantile_cutoffs_are_exact_boundaries(ds_path, rows):
    split = make_split(
        ds_path, SplitConfig(strategy="temporal", test_quantile=0.8, valid_quantile=0.6)
    )
    parts = all_parts(split)
    assert_conserved(parts, rows)
    test_cut, valid_cut = split.meta["test_cutoff"], split.meta["valid_cutoff"]
    ts = np.array([r[2] for r in rows])
    # quantile_disc returns a timestamp of the data itself
    assert test_cut in ts and valid_cut in ts and valid_cut <= test_cut
    assert Counter(parts["test"]) == Counter(r for r in rows if r[2] >= test_cut)
    assert Counter(parts["valid"]) == Counter(r for r in rows if valid_cut <= r[2] < test_cut)
    assert Counter(parts["train"]) == Counter(r for r in rows if r[2] < valid_cut)
    assert max(r[2] for r in parts["train"]) < min(r[2] for r in parts["valid"])
    assert max(r[2] for r in parts["valid"]) < min(r[2] for r in parts["test"])


def test_temporal_known_answer(tmp_path):
    # times 1..10, one per row; quantile_disc(0.9) = 9, quantile_disc(0.7) = 7
    rows = [(t % 3, t, t, 1.0) for t in range(1, 11)]
    split = make_split(
        write_dataset(tmp_path / "ds", rows),
        SplitConfig(strategy="temporal", test_quantile=0.9, valid_quantile=0.7),
    )
    assert split.meta["test_cutoff"] == 9 and split.meta["valid_cutoff"] == 7
    assert sorted(r[2] for r in rows_of(split, "test")) == [9, 10]
    assert sorted(r[2] for r in rows_of(split, "valid")) == [7, 8]
    assert sorted(r[2] for r in rows_of(split, "train")) == [1, 2, 3, 4, 5, 6]
    # users of test that never appear in train: none here (users 0, 1, 2 all have early rows)
    assert split.meta["test_users_without_train"] == 0


def test_temporal_explicit_cutoffs_and_no_valid(tmp_path):
    rows = [(0, t, t, 1.0) for t in range(1, 11)] + [(1, 0, 10, 1.0)]
    path = write_dataset(tmp_path / "ds", rows)
    split = make_split(path, SplitConfig(strategy="temporal", cutoff=8, valid_cutoff=5))
    assert sorted(r[2] for r in rows_of(split, "test")) == [8, 9, 10, 10]
    assert sorted(r[2] for r in rows_of(split, "valid")) == [5, 6, 7]
    assert split.meta["test_users_without_train"] == 1  # user 1 only has a row at t=10
    no_valid = make_split(path, SplitConfig(strategy="temporal", cutoff=8, valid=False, name="tv"))
    assert not no_valid.has("valid") and no_valid.meta["counts"]["valid"] == 0
    assert sorted(r[2] for r in rows_of(no_valid, "train")) == list(range(1, 8))


def test_temporal_refuses_rows_without_time(tmp_path):
    rows = [(0, 1, 5, 1.0), (0, 2, None, 1.0), (1, 1, None, 1.0)]
    path = write_dataset(tmp_path / "ds", rows)
    with pytest.raises(
        DatasetError, match=r"2 of 3 interactions have no timestamp.*'leave-last'.*'random'"
    ):
        make_split(path, SplitConfig(strategy="temporal"))
    assert not (path / "splits" / "temporal").exists()


def test_temporal_valid_cutoff_after_test_cutoff_is_a_config_error(tmp_path):
    path = write_dataset(tmp_path / "ds", [(0, t, t, 1.0) for t in range(1, 11)])
    with pytest.raises(
        ConfigError,
        match=r"valid cutoff \(7, from valid_quantile\) is after the test cutoff \(3, from cutoff\)",
    ):
        make_split(path, SplitConfig(strategy="temporal", cutoff=3, valid_quantile=0.7))
    with pytest.raises(ConfigError, match=r"valid_cutoff \(5\) must not be after cutoff \(3\)"):
        SplitConfig(strategy="temporal", cutoff=3, valid_cutoff=5)


# --- random ------------------------------------------------------------------------------------


def _round_half_up(x: Fraction) -> int:
    return int(x + Fraction(1, 2))  # floor for positive x


@pytest.mark.parametrize(("test_fraction", "valid_fraction"), [(0.2, 0.1), (0.5, 0.3)])
def test_random_takes_a_per_user_fraction(ds_path, rows, test_fraction, valid_fraction):
    cfg = SplitConfig(
        strategy="random", test_fraction=test_fraction, valid_fraction=valid_fraction, seed=3
    )
    parts = all_parts(make_split(ds_path, cfg))
    assert_conserved(parts, rows)
    tf, vf = Fraction(str(test_fraction)), Fraction(str(valid_fraction))
    n_per_user = Counter(r[0] for r in rows)
    test_n = Counter(r[0] for r in parts["test"])
    valid_n = Counter(r[0] for r in parts["valid"])
    for user, n in n_per_user.items():
        n_test = _round_half_up(n * tf)
        assert test_n[user] == n_test, user
        assert valid_n[user] == _round_half_up((n - n_test) * vf), user


def test_random_is_deterministic_for_a_seed_and_independent_of_threads(ds_path, rows):
    a = make_split(ds_path, SplitConfig(strategy="random", seed=11, name="a", threads=1))
    b = make_split(ds_path, SplitConfig(strategy="random", seed=11, name="b", threads=2))
    c = make_split(ds_path, SplitConfig(strategy="random", seed=12, name="c"))
    for part in ("train", "valid", "test"):
        files_a = sorted((a.path / part).glob("part-*.parquet"))
        files_b = sorted((b.path / part).glob("part-*.parquet"))
        assert [f.name for f in files_a] == [f.name for f in files_b]
        for fa, fb in zip(files_a, files_b, strict=True):
            assert fa.read_bytes() == fb.read_bytes()
    assert all_parts(a) != all_parts(c)
    assert_conserved(all_parts(c), rows)


def test_random_without_valid_writes_no_valid_part(ds_path, rows):
    split = make_split(ds_path, SplitConfig(strategy="random", valid=False))
    assert not (split.path / "valid").exists()
    assert not split.has("valid")
    assert split.meta["counts"]["valid"] == 0
    assert "valid" not in split.meta["users"]
    assert_conserved(all_parts(split), rows)


# --- given -------------------------------------------------------------------------------------


@pytest.fixture
def given_path(tmp_path: Path) -> tuple[Path, dict[str, list[Row]]]:
    rng = np.random.default_rng(5)
    train: list[Row] = []
    test: list[Row] = []
    for u in range(25):
        items = rng.choice(40, size=int(rng.integers(2, 15)), replace=False)
        n_test = max(1, len(items) // 5)
        test += [(u, int(i), None, 1.0) for i in items[:n_test]]
        train += [(u, int(i), None, 1.0) for i in items[n_test:]]
    given = {"train": train, "test": test}
    return write_dataset(tmp_path / "ds", train + test, given=given), given


def test_given_copies_test_and_carves_valid_from_train(given_path):
    path, given = given_path
    split = make_split(path, SplitConfig(strategy="given", name="lgcn", valid_fraction=0.2, seed=4))
    parts = all_parts(split)
    assert Counter(parts["test"]) == Counter(given["test"])
    assert_conserved({"train": parts["train"], "valid": parts["valid"]}, given["train"])
    n_train = Counter(r[0] for r in given["train"])
    valid_n = Counter(r[0] for r in parts["valid"])
    for user, n in n_train.items():
        assert valid_n[user] == _round_half_up(n * Fraction(1, 5))
    assert split.meta["valid_from"] == "train" and split.meta["source"] == "splits/given"
    # the given split itself is untouched
    assert Counter(rows_of(open_dataset(path).split("given"), "train")) == Counter(given["train"])
    again = make_split(
        path, SplitConfig(strategy="given", name="lgcn2", valid_fraction=0.2, seed=4)
    )
    assert all_parts(again) == parts


def test_given_without_valid_is_an_exact_copy(given_path):
    path, given = given_path
    split = make_split(path, SplitConfig(strategy="given", name="copy", valid=False))
    assert not split.has("valid")
    assert Counter(rows_of(split, "train")) == Counter(given["train"])
    assert Counter(rows_of(split, "test")) == Counter(given["test"])


def test_given_rewrites_itself_atomically_and_idempotently(given_path):
    path, given = given_path
    first = make_split(path, SplitConfig(strategy="given", name="given", seed=1))
    parts = all_parts(first)
    assert Counter(parts["test"]) == Counter(given["test"])
    assert_conserved({"train": parts["train"], "valid": parts["valid"]}, given["train"])
    # the valid part now exists in `given`, so a second run keeps it rather than carving again
    second = make_split(path, SplitConfig(strategy="given", name="given", seed=2))
    assert all_parts(second) == parts and second.meta["valid_from"] == "given"
    leftovers = [p.name for p in (path / "splits").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_given_missing_explains_what_it_needs(ds_path):
    with pytest.raises(SplitNotFoundError, match=r"has no split 'given'.*LightGCN.*'leave-last'"):
        make_split(ds_path, SplitConfig(strategy="given", name="x"))


# --- errors and atomicity ----------------------------------------------------------------------


def test_missing_dataset_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match=str(missing)):
        make_split(missing)


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"strategy 'bogus' is unknown; expected one of 'leave-last'"
    ):
        SplitConfig(strategy="bogus")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"strategy: got 'bogus'"):
        config_from_dict(SplitConfig, {"strategy": "bogus"})


@pytest.mark.parametrize("name", ["../escape", "", ".hidden", "a/b"])
def test_bad_split_name_is_a_config_error(ds_path, name):
    with pytest.raises(ConfigError, match="is not a valid split name"):
        make_split(ds_path, SplitConfig(name=name))


def test_bad_engine_and_memory_limit_are_config_errors(ds_path):
    with pytest.raises(
        ConfigError, match="engine 'flink' is unknown; expected one of 'duckdb', 'spark'"
    ):
        make_split(ds_path, engine="flink")
    with pytest.raises(ConfigError, match="memory_limit 'lots' is not a memory size"):
        make_split(ds_path, SplitConfig(memory_limit="lots"))


def test_a_failure_leaves_the_existing_split_untouched(ds_path, monkeypatch):
    import recscale.ingest.split as split_module

    before = make_split(ds_path, SplitConfig(name="s"))
    snapshot = {p: p.read_bytes() for p in before.path.rglob("*") if p.is_file()}
    real = split_module.write_parquet_parts

    def fail_on_test(batches, directory, schema, **kw):
        if Path(directory).name == "test":
            raise OSError("disk full")
        return real(batches, directory, schema, **kw)

    monkeypatch.setattr(split_module, "write_parquet_parts", fail_on_test)
    with pytest.raises(OSError, match="disk full"):
        make_split(ds_path, SplitConfig(name="s", strategy="random"))
    after = {p: p.read_bytes() for p in before.path.rglob("*") if p.is_file()}
    assert after == snapshot
    assert [p.name for p in (ds_path / "splits").iterdir()] == ["s"]


def test_split_files_use_the_dataset_schema(ds_path):
    split = make_split(ds_path)
    for part in ("train", "valid", "test"):
        assert read_parts(split.path / part).schema == INTERACTIONS_SCHEMA
