"""Batches streamed from the Parquet row groups of a split part, in bounded memory.

An epoch is planned by pure functions of ``(seed, epoch, World)``; nothing else decides a batch:

1. **Row-group order.** The part's row groups are shuffled per epoch (``seed, epoch``) and read
   as one stream of ``N`` rows.
2. **Sharding.** The stream is cut into ``world_size`` contiguous ranges of ``ceil(N / W)`` rows
   (the last one is topped up from the start of the stream, so data-parallel ranks step in
   lockstep), and each range into ``num_workers`` contiguous sub-ranges, one per DataLoader
   worker (:func:`reader_range`, :func:`reader_spans`). Contiguous ranges mean a reader decodes
   only its own row groups, plus at most two it shares with a neighbour.
3. **Shuffle buffer.** A reader reads its range in windows of ``shuffle_buffer`` rows and emits
   each window in a seeded random order. With the row-group shuffle, a batch mixes rows from
   everywhere in the part while memory holds one window and one decoded row group.
4. **Batches.** Batch ``k`` of a reader is rows ``k * B .. (k + 1) * B`` of its shuffled stream.
   Negatives are drawn for a whole window at once, from a generator seeded with
   ``(seed, epoch, rank, worker, window)``.

The position is therefore just ``(epoch, batches handed out)``: from it
:func:`interleave_position` recovers how far each worker had got, and a resumed loader re-reads
only the window each worker stopped in. Batches are dicts of int64 tensors, ``users (B,)``,
``pos (B,)``, ``neg (B, n_negatives)``, the protocol of :class:`~recscale.loader.InMemoryLoader`.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recscale.errors import ConfigError, DatasetError
from recscale.loader.handover import BlockPool, Piece, SharedWindows
from recscale.loader.negatives import (
    NEGATIVE_SAMPLERS,
    Positives,
    popularity_cdf,
    sample_negatives,
)
from recscale.loader.position import EpochLoader
from recscale.loader.world import World

__all__ = [
    "ParquetStream",
    "RowGroups",
    "StreamLoader",
    "interleave_position",
    "reader_range",
    "reader_spans",
]

log = logging.getLogger("recscale.loader")

USER, ITEM = "user_idx", "item_idx"
BATCH_KEYS = ("users", "pos", "neg")
# rows a DataLoader worker hands over per message (see ParquetStream): each one costs the
# consumer about 0.3 ms in the DataLoader's queues, so a whole default window (a worker sends a
# window's messages at once anyway); it takes 6 shared blocks per reader rather than 4
CHUNK_ROWS = 1 << 20
# generator streams of one reader: window orders and batch negatives never share draws
_WINDOW_STREAM, _NEGATIVE_STREAM = 0, 1
# batches handed out between two checks for messages whose batches are all dropped
_COLLECT_EVERY = 8
# messages a worker may have sent before the consumer takes them (the DataLoader's
# prefetch_factor, named here because the shared blocks are counted from it)
_MESSAGES_AHEAD = 2


class _Window(NamedTuple):
    """A shuffled window of ``rows`` rows in ``values`` (users, positives, negatives), read from
    row ``first`` on; ``block`` is its shared block (-1: none, ``tensor`` holds it instead)."""

    values: np.ndarray
    rows: int
    first: int
    block: int
    tensor: torch.Tensor | None


class Workspace:
    """The main process's buffers for windows of up to ``rows`` rows, kept for every epoch: the
    pool of output blocks and the shuffle's scratch, their pages faulted in once."""

    def __init__(self, rows: int, width: int) -> None:
        self.rows = rows
        self.pool = BlockPool(width * rows, np.int64)
        for _ in range(2):  # a window's block and the last one's, whose batches are still out
            self.pool.blocks.append(np.zeros(width * rows, dtype=np.int64))
        self.scratch = np.zeros(rows, dtype=np.uint64)
        self.positions = np.zeros(max(rows - 1, 0), dtype=np.uint32)


class RowGroups:
    """The row groups of a set of Parquet files: which file, which group, how many rows."""

    def __init__(self, files: Sequence[str | Path]) -> None:
        self.paths = [str(f) for f in files]
        if not self.paths:
            raise DatasetError("stream: no Parquet files to read")
        file_of, group_of, rows = [], [], []
        for f, path in enumerate(self.paths):
            try:
                meta = pq.ParquetFile(path).metadata
            except (pa.ArrowInvalid, OSError) as exc:
                raise DatasetError(f"{path}: unreadable Parquet: {exc}") from None
            names = set(meta.schema.names)
            missing = {USER, ITEM} - names
            if missing:
                raise DatasetError(
                    f"{path}: no column {', '.join(sorted(missing))}; "
                    "expected a split part of a recscale dataset"
                )
            for g in range(meta.num_row_groups):
                file_of.append(f)
                group_of.append(g)
                rows.append(meta.row_group(g).num_rows)
        self.file = np.asarray(file_of, dtype=np.int64)
        self.group = np.asarray(group_of, dtype=np.int64)
        self.rows = np.asarray(rows, dtype=np.int64)

    @classmethod
    def of_directory(cls, directory: str | Path) -> RowGroups:
        """Every ``part-*.parquet`` of a split part (e.g. ``splits/<name>/train``)."""
        files = sorted(Path(directory).glob("part-*.parquet"))
        if not files:
            raise DatasetError(f"{directory}: no part-*.parquet files")
        return cls(files)

    @property
    def total(self) -> int:
        return int(self.rows.sum())

    def __len__(self) -> int:
        return len(self.rows)


def reader_range(n_rows: int, world: World) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of the epoch's stream that ``world``'s reader reads.

    Rank ``r`` reads ``[r * P, (r + 1) * P)`` with ``P = ceil(n_rows / world_size)``; positions
    past ``n_rows`` wrap to the start (fewer than ``world_size`` rows, all on the last rank).
    Its workers split that range into contiguous pieces whose sizes differ by at most one.
    """
    per_rank = -(-n_rows // world.world_size)
    start = world.rank * per_rank
    k = world.num_workers
    return start + per_rank * world.worker // k, start + per_rank * (world.worker + 1) // k


def reader_spans(rows: np.ndarray, world: World, seed: int, epoch: int) -> np.ndarray:
    """What ``world``'s reader reads in ``epoch``: ``(n, 3)`` int64 rows ``(group, start, stop)``.

    ``group`` indexes ``rows`` (the row counts of the row groups); ``start:stop`` is the slice of
    that group, in reading order. Over all readers of a world every row appears exactly once
    when ``world_size`` divides the row count (else the top-up repeats fewer than
    ``world_size`` rows).
    """
    rows = np.asarray(rows, dtype=np.int64)
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    sizes = rows[order]
    ends = np.cumsum(sizes)
    starts = ends - sizes
    n = int(ends[-1]) if len(ends) else 0
    lo, hi = reader_range(n, world)
    pieces = []
    while lo < hi:  # once, or more when the range wraps past the end of the stream
        base = lo // n * n
        a, b = lo - base, min(hi - base, n)
        first = np.searchsorted(ends, a, side="right")
        last = np.searchsorted(starts, b, side="left")
        g = np.arange(first, last)
        s, e = np.maximum(starts[g], a) - starts[g], np.minimum(ends[g], b) - starts[g]
        keep = e > s  # empty row groups hold nothing to read
        pieces.append(np.stack([order[g][keep], s[keep], e[keep]], axis=1))
        lo = base + b
    if not pieces:
        return np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(pieces).astype(np.int64)


def interleave_position(
    counts: Sequence[int], consumed: int, per_chunk: int = 1
) -> tuple[np.ndarray, int, int]:
    """Where each worker stands after ``consumed`` batches of an epoch.

    Worker ``w`` hands out its ``counts[w]`` batches in chunks of ``per_chunk`` (its last chunk
    may hold fewer). A DataLoader over an ``IterableDataset`` takes one chunk from each worker in
    turn and skips workers that have run out, so the chunks come in lexicographic order of
    ``(round, worker)``. Returns the batches each worker had handed out in whole chunks, the
    worker whose chunk comes next, and how many batches of that chunk were already consumed.
    """
    counts = np.asarray(counts, dtype=np.int64)
    done = np.zeros_like(counts)
    left = int(consumed)
    if left >= counts.sum():
        return counts.copy(), 0, 0
    rounds = int(-(-counts.max() // per_chunk))
    for _ in range(rounds):
        for w in range(len(counts)):
            size = int(min(per_chunk, counts[w] - done[w]))
            if size <= 0:
                continue
            if left < size:
                return done, w, left
            left -= size
            done[w] += size
    raise AssertionError("unreachable: consumed < total batches")


class ParquetStream(IterableDataset):
    """The batches of one epoch, for a DataLoader with ``batch_size=None`` (or iterated directly).

    Built by :class:`StreamLoader`, which gives each epoch its own instance: ``start[w]`` is the
    number of batches worker ``w`` has already handed out this epoch and ``rotation`` the worker
    that hands out the next one (DataLoader worker ``i`` plays worker ``(i + rotation) % K``, so
    a resumed epoch continues in the order an uninterrupted one would).

    It yields *chunks* of ``per_chunk`` consecutive batches as one dict of tensors (``users``,
    ``pos``, ``neg``) and the ``reader`` that made them, which :class:`StreamLoader` cuts back
    into batches: a DataLoader pays a fixed cost per object it passes from a worker (about 2 ms
    here, whatever its size), so one object per batch would cap a worker at a few hundred
    batches per second. A worker's chunks name rows of its shared blocks (:class:`Piece`), which
    :class:`StreamLoader` cuts into views; in the main process they are the tensors themselves.
    """

    def __init__(
        self,
        groups: RowGroups,
        *,
        n_items: int,
        batch_size: int,
        n_negatives: int,
        shuffle_buffer: int,
        seed: int,
        epoch: int,
        world: World,
        num_workers: int,
        positives: Positives | None,
        cdf: np.ndarray | None,
        start: Sequence[int],
        rotation: int,
        per_chunk: int = 1,
        shared: SharedWindows | None = None,
        workspace: Workspace | None = None,
    ) -> None:
        super().__init__()
        self.groups = groups
        self.n_items = n_items
        self.batch_size = batch_size
        self.n_negatives = n_negatives
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = epoch
        self.world = world
        self.num_workers = num_workers
        self.positives = positives
        self.cdf = cdf
        self.start = list(start)
        self.rotation = rotation
        self.per_chunk = per_chunk
        self.shared = shared
        self.workspace = workspace
        self._files: dict[int, pq.ParquetFile] = {}
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def reader_world(self) -> World:
        """The World of whoever iterates: a DataLoader worker, or the main process."""
        info = get_worker_info()
        worker = 0 if info is None else info.id
        return self.world.with_worker((worker + self.rotation) % self.num_workers, self.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        in_worker = self.shared is not None and get_worker_info() is not None
        if in_worker:
            # a persistent worker: the epoch it reads now is the one the consumer planned
            self.epoch, self.rotation, self.start = self.shared.plan()
            self.shared.begin()
        world = self.reader_world()
        spans = reader_spans(self.groups.rows, world, self.seed, self.epoch)
        skip = self.start[world.worker] * self.batch_size
        size = self.per_chunk * self.batch_size
        windows = self._windows(spans, world, skip)
        if in_worker:
            yield from self._messages(windows, world.worker, size)
            return
        k = self.n_negatives
        columns = (
            (
                w.values[w.first : w.rows],
                w.values[w.rows + w.first : 2 * w.rows],
                w.values[2 * w.rows + w.first * k : (2 + k) * w.rows],
            )
            for w in windows
        )
        for chunk in _cut_batches(columns, size, k):
            yield {**chunk, "reader": world.worker}

    def _messages(self, windows: Iterator[_Window], reader: int, size: int) -> Iterator[dict]:
        """A worker's messages: the :class:`Piece` s of ``size`` rows of its windows each."""
        assert self.shared is not None
        pieces: list[Piece] = []
        held = 0
        sent = 0
        # blocks whose last rows are in the message being filled
        finished: list[int] = []
        for w in windows:
            at = w.first
            while at < w.rows:
                take = min(size - held, w.rows - at)
                pieces.append(Piece(w.block, w.rows, at, at + take, w.tensor))
                held += take
                at += take
                if at == w.rows and w.block >= 0:
                    finished.append(w.block)
                if held == size:
                    yield {"reader": reader, "message": sent, "pieces": pieces}
                    sent += 1
                    for block in finished:
                        self.shared.written(block, sent)
                    pieces, held, finished = [], 0, []
        if pieces:
            yield {"reader": reader, "message": sent, "pieces": pieces}

    def _windows(self, spans: np.ndarray, world: World, skip: int) -> Iterator[_Window]:
        """The reader's rows from position ``skip`` on, one shuffled window at a time.

        Another thread decodes window ``j + 1``'s rows while this one shuffles window ``j`` and
        draws its negatives; all of it releases the GIL.

        Each window is written as int64, users then positives then negatives, into a block the
        batches cut from it are views of: in the main process one from the loader's
        :class:`BlockPool`, in a DataLoader worker one of its :class:`SharedWindows` blocks (or
        a fresh tensor when none is free).
        """
        from recscale.loader.kernels import shuffle_pairs

        lengths = spans[:, 2] - spans[:, 1]
        span_end = np.cumsum(lengths)
        span_start = span_end - lengths
        total = int(span_end[-1]) if len(span_end) else 0
        window = self.shuffle_buffer
        first, stop = skip // window, -(-total // window)
        if first >= stop:
            return
        rows = min(window, total)
        width = 2 + self.n_negatives
        in_worker = get_worker_info() is not None
        shared = self.shared if in_worker else None
        if shared is not None:
            scratch, positions = shared.scratch(world.worker)
        elif self.workspace is not None and self.workspace.rows >= rows:
            scratch, positions = self.workspace.scratch, self.workspace.positions
        else:
            scratch = np.empty(rows, dtype=np.uint64)
            positions = np.empty(max(rows - 1, 0), dtype=np.uint32)
        pool = (
            self.workspace.pool
            if self.workspace is not None and self.workspace.pool.size >= width * rows
            else BlockPool(width * rows, np.int64)
        )

        def prepare(j: int) -> tuple[np.ndarray, np.ndarray]:
            lo, hi = j * window, min((j + 1) * window, total)
            users, items = [], []
            for s in np.flatnonzero((span_start < hi) & (span_end > lo)):
                group, a, _ = spans[s]
                # the part of span s inside the window, as offsets into its row group
                begin = a + max(lo - span_start[s], 0)
                end = a + min(hi, span_end[s]) - span_start[s]
                u, i = self._row_group(int(group))
                users.append(u[begin:end])
                items.append(i[begin:end])
            return _join(users), _join(items)

        # a thread to read ahead only where a core is left for it: with a reader per core, a
        # second thread per reader only makes them take turns
        threads = 1 if _cores() > self.num_workers else 0
        with ThreadPoolExecutor(threads or 1, thread_name_prefix="recscale-stream") as ahead_pool:
            ahead = ahead_pool.submit(prepare, first) if threads else None
            for j in range(first, stop):
                users, items = ahead.result() if ahead else prepare(j)
                if threads and j + 1 < stop:
                    ahead = ahead_pool.submit(prepare, j + 1)
                n = len(users)
                block, tensor = -1, None
                taken = shared.take(world.worker) if shared is not None else None
                if taken is not None:
                    block, values = taken
                elif in_worker:  # no shared block free: a tensor sent the usual way
                    tensor = torch.empty(width * rows, dtype=torch.int64)
                    values = tensor.numpy()
                else:
                    values = pool.take()
                out_users, out_pos = values[:n], values[n : 2 * n]
                out_neg = values[2 * n : width * n].reshape(n, self.n_negatives)
                shuffled = (users, items, positions[: max(n - 1, 0)], out_users, out_pos, scratch)
                order_seed = self._seed(world, _WINDOW_STREAM, j)
                seed = self._seed(world, _NEGATIVE_STREAM, j)
                if self.positives is None and self.cdf is None:
                    uniform = (seed, self.n_items, out_neg)
                    shuffle_pairs(*shuffled, uniform, order_seed=order_seed)
                else:
                    shuffle_pairs(*shuffled, order_seed=order_seed)
                    out_neg[:] = sample_negatives(
                        out_users,
                        self.n_negatives,
                        self.n_items,
                        np.random.default_rng(seed),
                        self.positives,
                        self.cdf,
                        dtype=np.int64,
                    )
                # a resumed reader: the first window's draws are redone, then skipped
                start = skip - j * window if j == first else 0
                yield _Window(values[: width * n], n, start, block, tensor)

    def _seed(self, world: World, stream: int, window: int) -> int:
        key = [self.seed, self.epoch, world.rank, world.worker, stream, window]
        return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])

    def _row_group(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        """Users and items of one row group; the last one decoded is kept (spans share groups)."""
        if self._cached is not None and self._cached[0] == group:
            return self._cached[1], self._cached[2]
        f = int(self.groups.file[group])
        if f not in self._files:
            self._files[f] = pq.ParquetFile(self.groups.paths[f])
        table = self._files[f].read_row_group(
            int(self.groups.group[group]), columns=[USER, ITEM], use_threads=False
        )
        users, items = (_array(table.column(name)) for name in (USER, ITEM))
        self._cached = (group, users, items)
        return users, items

    def __getstate__(self) -> dict[str, Any]:
        # open files and the decoded row group stay with the process that opened them
        state = self.__dict__.copy()
        state["_files"], state["_cached"] = {}, None
        return state


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _array(column: pa.ChunkedArray) -> np.ndarray:
    """An int32 column as a read-only array over Arrow's own buffer, without a copy."""
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return array.to_numpy(zero_copy_only=True)


def _join(pieces: list[np.ndarray]) -> np.ndarray:
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _cut_message(
    message: dict[str, Any], shared: SharedWindows, size: int, k: int
) -> tuple[collections.deque[dict[str, torch.Tensor]], list[tuple[int, np.ndarray]]]:
    """A worker's message cut into batches, and the (block, array) pairs they view."""
    reader = message["reader"]
    views, columns = [], []
    for piece in message["pieces"]:
        values = shared.window(reader, piece, 2 + k)
        if piece.block >= 0:
            views.append((piece.block, values))
        r, a, b = piece.rows, piece.start, piece.stop
        columns.append((values[a:b], values[r + a : r + b], values[2 * r + a * k : 2 * r + b * k]))
    return collections.deque(_cut_batches(columns, size, k)), views


def _cut_batches(
    columns: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], size: int, k: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``size`` rows cut in order from pieces of (users, positives, flat negatives):
    views of the pieces, except where a batch straddles two (the last may hold fewer rows).

    A piece's whole batches are cut by one ``split`` per column, which costs the consumer
    about 3 µs a batch against 5 for three ``from_numpy`` of NumPy slices.
    """
    held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    n_held = 0
    for users, pos, neg in columns:
        n, at = len(users), 0
        if n_held:  # the batch begun in the last piece
            take = min(size - n_held, n)
            held.append((users[:take], pos[:take], neg[: take * k]))
            n_held += take
            at = take
            if n_held == size:
                yield _batch(held, k)
                held, n_held = [], 0
        whole = (n - at) // size * size
        if whole:
            stop = at + whole
            cut = (
                torch.from_numpy(users[at:stop]).split(size),
                torch.from_numpy(pos[at:stop]).split(size),
                torch.from_numpy(neg[at * k : stop * k]).view(-1, k).split(size),
            )
            for u, p, g in zip(*cut, strict=True):
                yield {"users": u, "pos": p, "neg": g}
            # the piece's tensors go now: a block is reused once nothing views it
            del cut, u, p, g
            at = stop
        if at < n:
            held.append((users[at:], pos[at:], neg[at * k :]))
            n_held += n - at
    if held:
        yield _batch(held, k)


def _batch(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int
) -> dict[str, torch.Tensor]:
    if len(parts) == 1:
        users, pos, neg = parts[0]
    else:
        users, pos, neg = (np.concatenate(column) for column in zip(*parts, strict=True))
    return {
        "users": torch.from_numpy(users),
        "pos": torch.from_numpy(pos),
        "neg": torch.from_numpy(neg.reshape(-1, k)),
    }


class StreamLoader(EpochLoader):
    """Training batches streamed from a split part's Parquet files (see the module docstring).

    ``batch_size`` is what this rank takes per step. ``negatives`` is ``"uniform"`` or
    ``"popularity"`` (∝ count ** ``popularity_exponent``, counted in one pass over the items).
    ``reject_positives`` redraws negatives the user has interacted with; it holds the part's
    sorted (user, item) keys, 8 bytes per row, the one thing here that grows with the data.
    ``num_workers`` DataLoader worker processes read and batch in parallel; ``pin_memory`` pins
    the batches for a fast copy to CUDA.
    """

    def __init__(
        self,
        source: str | Path | RowGroups,
        *,
        n_items: int,
        batch_size: int,
        n_negatives: int = 1,
        negatives: str = "uniform",
        popularity_exponent: float = 0.75,
        shuffle_buffer: int = 1_000_000,
        num_workers: int = 0,
        seed: int = 0,
        reject_positives: bool = True,
        world: World | None = None,
        pin_memory: bool = False,
    ) -> None:
        if batch_size <= 0 or n_negatives <= 0 or shuffle_buffer <= 0:
            raise ConfigError(
                "stream loader: batch_size, n_negatives and shuffle_buffer must be > 0, got "
                f"{batch_size}, {n_negatives} and {shuffle_buffer}"
            )
        if num_workers < 0:
            raise ConfigError(f"stream loader: num_workers must be >= 0, got {num_workers}")
        if negatives not in NEGATIVE_SAMPLERS:
            raise ConfigError(
                f"stream loader: negatives {negatives!r} is unknown; expected one of "
                + ", ".join(NEGATIVE_SAMPLERS)
            )
        self.groups = source if isinstance(source, RowGroups) else RowGroups.of_directory(source)
        self.n_items = n_items
        self.batch_size = batch_size
        self.n_negatives = n_negatives
        self.negatives = negatives
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.seed = seed
        self.reject_positives = reject_positives
        self.world = World(world.rank, world.world_size) if world else World()
        self.pin_memory = pin_memory
        self.cdf = (
            popularity_cdf(self._item_counts(), popularity_exponent)
            if negatives == "popularity"
            else None
        )
        from recscale.loader.kernels import compile_kernels

        compile_kernels()
        t0 = time.perf_counter()
        self.positives = self._positives() if reject_positives else None
        if self.positives is not None:
            # the one structure that grows with the log: say what it costs
            log.info(
                "stream loader: %s known (user, item) pairs held for rejecting positives "
                "(%.0f MiB, built in %.1f s); reject_positives = false does without",
                f"{len(self.positives):,}",
                (self.positives.keys.nbytes + self.positives.start.nbytes) / 2**20,
                time.perf_counter() - t0,
            )
        self._workspace: Workspace | None = None
        self._shared: SharedWindows | None = None
        self._workers: DataLoader | None = None
        self._active: weakref.ref[Iterator[dict[str, torch.Tensor]]] | None = None
        rows = min(shuffle_buffer, max(int(self.reader_rows().max()), 1))
        width = 2 + n_negatives
        if num_workers:
            chunk_rows = self.per_chunk * batch_size
            # the blocks of a window being written, of the messages queued and of the batches
            # still out (see recscale.loader.handover)
            blocks = 2 + -(-(_MESSAGES_AHEAD + 2) * chunk_rows // rows)
            self._shared = SharedWindows(self.readers, blocks, width * rows, rows)
        else:
            self._workspace = Workspace(rows, width)
        self.epoch = 0
        self.batch = 0

    # where each reader reads next follows from (epoch, batch): it is recorded, not checked
    POSITION_KEYS = ("epoch", "batch", "readers")

    @property
    def readers(self) -> int:
        """Readers on this rank: its DataLoader workers, or the main process alone."""
        return max(self.num_workers, 1)

    @property
    def rows_per_epoch(self) -> int:
        return -(-self.groups.total // self.world.world_size)

    def reader_rows(self) -> np.ndarray:
        """Rows each of this rank's readers reads per epoch."""
        sizes = []
        for w in range(self.readers):
            lo, hi = reader_range(self.groups.total, self.world.with_worker(w, self.readers))
            sizes.append(hi - lo)
        return np.asarray(sizes, dtype=np.int64)

    def worker_batches(self) -> np.ndarray:
        """Batches each of this rank's readers hands out per epoch."""
        return -(-self.reader_rows() // self.batch_size)

    def __len__(self) -> int:
        return int(self.worker_batches().sum())

    @property
    def per_chunk(self) -> int:
        """Batches a worker hands over at once (about ``CHUNK_ROWS`` rows); 1 without workers."""
        return max(1, CHUNK_ROWS // self.batch_size) if self.num_workers else 1

    def position(self) -> tuple[np.ndarray, int, int]:
        """:func:`interleave_position` of the batches handed out so far this epoch."""
        return interleave_position(self.worker_batches(), self.batch, self.per_chunk)

    def stream(self, position: tuple[np.ndarray, int, int] | None = None) -> ParquetStream:
        """The IterableDataset of the rest of the current epoch, chunk by chunk."""
        start, rotation, _ = position or self.position()
        return ParquetStream(
            self.groups,
            n_items=self.n_items,
            batch_size=self.batch_size,
            n_negatives=self.n_negatives,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            epoch=self.epoch,
            world=self.world,
            num_workers=self.readers,
            positives=self.positives,
            cdf=self.cdf,
            start=start.tolist(),
            rotation=rotation,
            per_chunk=self.per_chunk,
            shared=self._shared,
            workspace=self._workspace,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # one pass at a time: the buffers and the workers are the loader's, not the pass's
        # (held weakly: a pass that its consumer drops is closed then, not by the cycle GC,
        # which would finalise the workers' queues in any order and leave them hanging)
        active = self._active() if self._active is not None else None
        if active is not None:
            active.close()
        passing = self._pass()
        self._active = weakref.ref(passing)
        return passing

    def _pass(self) -> Iterator[dict[str, torch.Tensor]]:
        position = self.position()
        skip = position[2]
        if self._shared is not None:
            start, rotation, _ = position
            self._shared.reset(self.epoch, rotation, start.tolist())
            if self._workers is None:
                # fork: the workers inherit the shared blocks mapped here; persistent: they
                # map them once and read every epoch from the plan in shared memory
                self._workers = DataLoader(
                    self.stream(position),
                    batch_size=None,
                    num_workers=self.num_workers,
                    multiprocessing_context="fork",
                    persistent_workers=True,
                    prefetch_factor=_MESSAGES_AHEAD,
                )
            batches = self._from_workers(iter(self._workers), self._shared)
        else:
            batches = ({key: chunk[key] for key in BATCH_KEYS} for chunk in self.stream(position))
        for batch in batches:
            if skip:  # consumed before the state this epoch resumed from
                skip -= 1
                continue
            self.batch += 1
            if self.pin_memory:
                batch = {key: value.pin_memory() for key, value in batch.items()}
            yield batch
        self.epoch += 1
        self.batch = 0

    def _from_workers(
        self, messages: Iterator[dict[str, Any]], shared: SharedWindows
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of the workers' messages, views of their shared blocks wherever a batch
        lies inside one window (a batch across two windows is joined by a copy)."""
        for message in messages:
            reader = message["reader"]
            cut, views = _cut_message(message, shared, self.batch_size, self.n_negatives)
            shared.hold(reader, message["message"], views)
            del views
            while cut:
                batch = cut.popleft()
                yield batch
                del batch
                # the refcount checks cost more than cutting the batch; a block is released at
                # most _COLLECT_EVERY batches late
                if len(cut) % _COLLECT_EVERY == 0:
                    shared.collect()

    def state_dict(self) -> dict[str, Any]:
        start, nxt, skip = self.position()
        start[nxt] += skip
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "batch": self.batch,
            "rows": self.groups.total,
            "row_groups": len(self.groups),
            "batch_size": self.batch_size,
            "world_size": self.world.world_size,
            "num_workers": self.num_workers,
            "shuffle_buffer": self.shuffle_buffer,
            "negatives": self.negatives,
            "readers": self._reader_positions(start),
        }

    def _reader_positions(self, start: np.ndarray) -> list[dict[str, int]]:
        """Per reader: the file, row group and offset its current shuffle window starts at."""
        positions = []
        for w in range(self.readers):
            world = self.world.with_worker(w, self.readers)
            spans = reader_spans(self.groups.rows, world, self.seed, self.epoch)
            offset = int(start[w]) * self.batch_size
            window = offset // self.shuffle_buffer * self.shuffle_buffer
            lengths = spans[:, 2] - spans[:, 1]
            ends = np.cumsum(lengths)
            s = int(np.searchsorted(ends, window, side="right"))
            if s == len(spans):
                positions.append({"worker": w, "file": -1, "row_group": -1, "offset": 0})
                continue
            group = int(spans[s, 0])
            positions.append(
                {
                    "worker": w,
                    "file": int(self.groups.file[group]),
                    "row_group": int(self.groups.group[group]),
                    "offset": int(spans[s, 1] + window - (ends[s] - lengths[s])),
                    "window_rows_done": offset - window,
                }
            )
        return positions

    def _columns(self, columns: list[str]) -> Iterator[pa.Table]:
        for path in self.groups.paths:
            f = pq.ParquetFile(path)
            for g in range(f.metadata.num_row_groups):
                yield f.read_row_group(g, columns=columns)

    def _item_counts(self) -> np.ndarray:
        counts = np.zeros(self.n_items, dtype=np.int64)
        for table in self._columns([ITEM]):
            items = table.column(ITEM).to_numpy()
            if len(items) and (items.min() < 0 or items.max() >= self.n_items):
                raise DatasetError(
                    f"stream loader: item_idx outside 0..{self.n_items - 1} in {self.groups.paths}"
                )
            counts += np.bincount(items, minlength=self.n_items)
        return counts

    def _positives(self) -> Positives:
        # filled row group by row group and sorted in place: one array of 8 bytes per row
        keys = np.empty(self.groups.total, dtype=np.int64)
        at = 0
        for table in self._columns([USER, ITEM]):
            n = table.num_rows
            keys[at : at + n] = table.column(USER).to_numpy().astype(
                np.int64
            ) * self.n_items + table.column(ITEM).to_numpy().astype(np.int64)
            at += n
        keys.sort()
        if len(keys) > 1:
            keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
        return Positives(keys, self.n_items)
