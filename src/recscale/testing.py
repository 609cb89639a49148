"""Helpers shared by tests and by users who want a small dataset with a known right answer.

:func:`block_log` builds a log whose best recommendation is obvious (the one item of a user's
block it has not seen) and :func:`write_tiny_dataset` writes parts like it as a real dataset
directory, split included, through the dataset module's own writers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recscale.dataset import (
    INTERACTIONS_SCHEMA,
    USERS_SCHEMA,
    Dataset,
    Interactions,
    Manifest,
    open_dataset,
    read_parts,
    write_parquet_parts,
)

__all__ = [
    "assert_dataset_equal",
    "block_log",
    "interactions",
    "serve_in_thread",
    "write_tiny_dataset",
]

# what may differ between two ingests of the same sources: when and how fast, and by which engine
_RUN_KEYS = {"seconds", "rows_per_second", "created_at", "created_by"}


def interactions(
    users: np.ndarray | list[int],
    items: np.ndarray | list[int],
    n_users: int,
    n_items: int,
    values: np.ndarray | list[float] | None = None,
) -> Interactions:
    """:class:`Interactions` from parallel user/item lists (no timestamps, value 1 by default)."""
    users = np.asarray(users, dtype=np.int32)
    items = np.asarray(items, dtype=np.int32)
    value = np.ones(len(users), np.float32) if values is None else np.asarray(values, np.float32)
    return Interactions(users, items, np.full(len(users), -1, np.int64), value, n_users, n_items)


def block_log(
    n_groups: int = 4,
    users_per_group: int = 8,
    items_per_group: int = 6,
    *,
    valid: bool = False,
) -> dict[str, Interactions]:
    """A block-diagonal log with one held-out item per user (per part).

    User ``u`` belongs to group ``g = u // users_per_group`` and has interacted with every item
    of block ``g`` (items ``g * items_per_group ...``) except the held-out ones: its test item is
    ``g * items_per_group + u % items_per_group`` and, with ``valid``, its valid item is the next
    one in the block. Once its train items are excluded, the only item of its own block left is
    the held-out one, so any collaborative model should rank it first. Every held-out item stays
    in the train of the group's other users, so it can be learnt.
    """
    n_users = n_groups * users_per_group
    n_items = n_groups * items_per_group
    users = np.arange(n_users)
    group = users // users_per_group
    test_item = group * items_per_group + users % items_per_group
    valid_item = group * items_per_group + (users + 1) % items_per_group
    # every (user, item of its block) pair, then the held-out ones removed
    pair_users = np.repeat(users, items_per_group)
    pair_items = (group * items_per_group)[:, None] + np.arange(items_per_group)
    pair_items = pair_items.reshape(-1)
    held = pair_items == np.repeat(test_item, items_per_group)
    if valid:
        held |= pair_items == np.repeat(valid_item, items_per_group)
    parts = {
        "train": interactions(pair_users[~held], pair_items[~held], n_users, n_items),
        "test": interactions(users, test_item, n_users, n_items),
    }
    if valid:
        parts["valid"] = interactions(users, valid_item, n_users, n_items)
    return parts


def write_tiny_dataset(
    path: str | Path,
    parts: Mapping[str, Interactions],
    *,
    split: str = "given",
    titles: bool = True,
) -> Path:
    """Write ``parts`` (``train``, ``test`` and optionally ``valid``) as a dataset directory.

    All parts must share ``n_users``/``n_items``. Original ids are ``u<idx>`` and ``i<idx>``;
    with ``titles`` items get a ``title`` column ``"Item <idx>"``. The split is written as
    ``splits/<split>/`` with a ``split.json``. Returns the dataset path.
    """
    path = Path(path)
    first = next(iter(parts.values()))
    n_users, n_items = first.n_users, first.n_items
    if any(p.n_users != n_users or p.n_items != n_items for p in parts.values()):
        raise ValueError("all parts must have the same n_users and n_items")

    def table(x: Interactions) -> pa.Table:
        return pa.table(
            {
                "user_idx": pa.array(x.user_idx, pa.int32()),
                "item_idx": pa.array(x.item_idx, pa.int32()),
                "ts": pa.array(np.where(x.ts < 0, None, x.ts), pa.int64()),
                "value": pa.array(x.value, pa.float32()),
            },
            schema=INTERACTIONS_SCHEMA,
        )

    path.mkdir(parents=True, exist_ok=True)
    total = write_parquet_parts(
        pa.concat_tables([table(p) for p in parts.values()]),
        path / "interactions",
        INTERACTIONS_SCHEMA,
    )
    users = pa.table(
        {
            "user_idx": pa.array(np.arange(n_users), pa.int32()),
            "user_id": pa.array([f"u{i}" for i in range(n_users)], pa.string()),
        },
        schema=USERS_SCHEMA,
    )
    items_columns = {
        "item_idx": pa.array(np.arange(n_items), pa.int32()),
        "item_id": pa.array([f"i{i}" for i in range(n_items)], pa.string()),
    }
    if titles:
        items_columns["title"] = pa.array([f"Item {i}" for i in range(n_items)], pa.string())
    pq.write_table(users, path / "users.parquet")
    pq.write_table(pa.table(items_columns), path / "items.parquet")
    Manifest(
        n_users=n_users,
        n_items=n_items,
        n_interactions=total,
        n_rejected=0,
        n_input_rows=total,
        columns={"user": "user", "item": "item", "time": None, "value": None},
        value_kind="implicit",
        created_by="recscale.testing.write_tiny_dataset",
        created_at=Manifest.now(),
    ).write(path)
    split_dir = path / "splits" / split
    for name, part in parts.items():
        write_parquet_parts(table(part), split_dir / name, INTERACTIONS_SCHEMA)
    meta = {
        "name": split,
        "strategy": "given",
        "counts": {name: len(part) for name, part in parts.items()},
    }
    (split_dir / "split.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _same(what: str, a: Any, b: Any) -> None:
    if a != b:
        if isinstance(a, list) and isinstance(b, list):
            for i, (x, y) in enumerate(zip(a, b, strict=False)):
                if x != y:
                    raise AssertionError(f"{what}: first difference at row {i}: {x!r} != {y!r}")
            raise AssertionError(f"{what}: {len(a)} rows != {len(b)} rows")
        raise AssertionError(f"{what}: {a!r} != {b!r}")


def _table(what: str, a: pa.Table, b: pa.Table) -> None:
    if not a.schema.equals(b.schema):
        raise AssertionError(f"{what}: schema {a.schema} != {b.schema}")
    _same(what, a.to_pylist(), b.to_pylist())


def _without(d: Mapping[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def assert_dataset_equal(
    a: str | Path | Dataset, b: str | Path | Dataset, *, splits: bool = True
) -> None:
    """Fail with the first difference unless two datasets hold the same data.

    Compared: every interaction in file order (schema included), users and items with their
    features, rejected rows (file, line, raw text, reason, detail), the manifest and the quality
    report (all but times, speeds and the engine's name), and with ``splits`` every split's parts
    and ``split.json`` (all but ``created_at``). Two engines that ingest the same sources must
    pass it.
    """
    da = a if isinstance(a, Dataset) else open_dataset(a)
    db = b if isinstance(b, Dataset) else open_dataset(b)
    _table("interactions", da.interactions_table(), db.interactions_table())
    _table("users", da.users, db.users)
    _table("items", da.items, db.items)
    _table("rejected", read_parts(da.path / "rejected"), read_parts(db.path / "rejected"))
    ma, mb = dataclasses.asdict(da.manifest), dataclasses.asdict(db.manifest)
    ma["options"] = _without(ma.get("options", {}), {"engine"})
    mb["options"] = _without(mb.get("options", {}), {"engine"})
    _same("manifest", _without(ma, _RUN_KEYS), _without(mb, _RUN_KEYS))
    _same("quality.json", _without(da.quality, _RUN_KEYS), _without(db.quality, _RUN_KEYS))
    if not splits:
        return
    _same("splits", da.split_names(), db.split_names())
    for name in da.split_names():
        sa, sb = da.split(name), db.split(name)
        _same(
            f"split {name!r} split.json", _without(sa.meta, _RUN_KEYS), _without(sb.meta, _RUN_KEYS)
        )
        for part in ("train", "valid", "test"):
            _same(f"split {name!r} has {part}", sa.has(part), sb.has(part))
            if sa.has(part):
                _table(f"split {name!r} {part}", sa.table(part), sb.table(part))


@contextlib.contextmanager
def serve_in_thread(app: Any, *, timeout: float = 30.0) -> Iterator[str]:
    """Run an ASGI ``app`` under a real uvicorn server on a free loopback port, in a thread.

    Yields its base URL (``http://127.0.0.1:PORT``) once the server accepts connections, and
    stops it (waiting for in-flight requests) when the block ends.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
