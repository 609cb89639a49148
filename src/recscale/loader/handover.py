"""Where the stream loader's windows live: reused blocks in the main process, and shared memory
that DataLoader workers write their windows into and the main process reads in place.

A worker that hands over a tensor the usual way pays twice: the DataLoader moves it into fresh
shared memory and passes a file descriptor for it (about 2 ms a message here, whatever its size),
and both processes then fault in every page of it (about 3 µs per 4 KiB of shared memory on
this machine, as much as the rest of the work on the rows in it). So each worker instead gets a
:class:`SharedWindows`: a few window-sized blocks of int64 in shared memory, mapped once by the
main process before the workers are forked and reused for every window, and its messages only
name the rows they carry (:class:`Piece`). The main process cuts batches as views of those
blocks, with no copy, and releases a message once every batch cut from it is dropped; a worker
rewrites a block once every message that used it is released.

A worker never waits for a release: when every block is still in use (the consumer keeps batches
for longer than a few windows), it writes the window into a fresh tensor sent the usual way, so
holding on to batches costs speed, never correctness.
"""

from __future__ import annotations

import collections
import mmap
import sys
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BlockPool", "Piece", "SharedWindows"]

# a block that no message of its reader uses any more
_FREE = -1
# a block a window is being written into or cut from
_WRITING = np.iinfo(np.int64).max


class BlockPool:
    """Blocks of ``size`` elements, each handed out again once nothing refers to it any more.

    The batches cut from a window are views of its block and hold it (through the tensors
    ``torch.from_numpy`` makes); so a block comes back once the consumer has dropped every
    batch of it, and a consumer that keeps batches keeps their memory, as with any allocation.
    Reuse spares a page fault per 4 KiB of fresh memory, which here costs about as much as the
    work done on the rows in it. At most ``keep`` blocks are kept for reuse.
    """

    def __init__(self, size: int, dtype: type[np.generic], keep: int = 4) -> None:
        self.size, self.dtype, self.keep = size, dtype, keep
        self.blocks: list[np.ndarray] = []

    def take(self) -> np.ndarray:
        for block in self.blocks:
            # referred to by the list, this loop and getrefcount's argument, and nothing else
            if sys.getrefcount(block) == 3:
                return block
        block = np.zeros(self.size, dtype=self.dtype)  # zeros: its pages are faulted in now
        if len(self.blocks) < self.keep:
            self.blocks.append(block)
        return block


@dataclass(frozen=True)
class Piece:
    """Rows ``start:stop`` of a window of ``rows`` rows, in block ``block`` of the reader.

    ``block`` is -1 for a window sent as a tensor of its own (``tensor``), when no shared block
    was free.
    """

    block: int
    rows: int
    start: int
    stop: int
    tensor: torch.Tensor | None = None


class SharedWindows:
    """Per reader, ``blocks`` shared int64 blocks of ``size`` elements and the scratch arrays of
    its shuffle (windows of ``rows`` rows), in one anonymous shared mapping made before the
    workers fork, and the plan of the epoch they read next (the workers stay up between
    epochs; :meth:`reset` sets it).

    The main process counts, per reader, the messages it has released in order
    (:attr:`released`, itself in shared memory); a worker marks each block with the number of
    messages that must be released before it is rewritten.
    """

    def __init__(self, readers: int, blocks: int, size: int, rows: int) -> None:
        self.readers, self.blocks, self.size, self.rows = readers, blocks, size, rows
        scratch = rows * 8 + max(rows - 1, 0) * 4
        self._block_bytes = size * 8
        self._reader_bytes = blocks * self._block_bytes + _align(scratch)
        self._maps = [_shared(self._reader_bytes) for _ in range(readers)]
        counters = np.frombuffer(_shared(8 * (readers * (2 + blocks) + 2)), dtype=np.int64)
        self.released = counters[:readers]
        # per reader and block: batches of an earlier epoch that still view it
        self._stale = counters[readers : readers * (1 + blocks)].reshape(readers, blocks)
        # epoch, rotation, then per reader the batches it has already handed out
        self._plan = counters[readers * (1 + blocks) :]
        # worker side: what each of its blocks waits for (see take)
        self._busy = np.full(blocks, _FREE, dtype=np.int64)
        # main side: per reader, (message number, [(block, array its batches view)]) not yet
        # released, and the (reader, block, array) of earlier epochs still viewed
        self._pending: list[collections.deque[tuple[int, list[tuple[int, np.ndarray]]]]] = [
            collections.deque() for _ in range(readers)
        ]
        self._old: list[tuple[int, int, np.ndarray]] = []

    # -- worker side -----------------------------------------------------------------------

    def scratch(self, reader: int) -> tuple[np.ndarray, np.ndarray]:
        """The reader's uint64 packing scratch and its uint32 array of swap positions."""
        at = self.blocks * self._block_bytes
        buf = self._maps[reader]
        packed = np.frombuffer(buf, np.uint64, self.rows, at)
        at += self.rows * 8
        return packed, np.frombuffer(buf, np.uint32, max(self.rows - 1, 0), at)

    def plan(self) -> tuple[int, int, list[int]]:
        """The epoch the workers read next: (epoch, rotation, batches each reader has done)."""
        epoch, rotation, *start = (int(v) for v in self._plan)
        return epoch, rotation, start

    def begin(self) -> None:
        """A worker starts an epoch: its messages count from 0 again (see :meth:`reset`)."""
        self._busy[:] = _FREE

    def take(self, reader: int) -> tuple[int, np.ndarray] | None:
        """A block of ``reader``'s that no unreleased message uses, marked as being written;
        None when there is none."""
        done = int(self.released[reader])
        stale = self._stale[reader]
        for b in range(self.blocks):
            if self._busy[b] != _WRITING and self._busy[b] <= done and not stale[b]:
                self._busy[b] = _WRITING
                return b, self.block(reader, b)
        return None

    def written(self, block: int, messages: int) -> None:
        """The last rows of ``block`` went into message ``messages - 1``: it is reused once that
        many messages are released."""
        self._busy[block] = messages

    def block(self, reader: int, block: int) -> np.ndarray:
        return np.frombuffer(self._maps[reader], np.int64, self.size, block * self._block_bytes)

    # -- main side -------------------------------------------------------------------------

    def window(self, reader: int, piece: Piece, width: int) -> np.ndarray:
        """A new array over the piece's window (``width * rows`` elements), for one message:
        its reference count tells when the batches cut from it are gone."""
        if piece.tensor is not None:
            return piece.tensor.numpy()
        at = piece.block * self._block_bytes
        return np.frombuffer(self._maps[reader], np.int64, width * piece.rows, at)

    def hold(self, reader: int, message: int, views: list[tuple[int, np.ndarray]]) -> None:
        """Message ``message`` of ``reader`` has batches viewing ``(block, array)`` pairs, each
        array made by :meth:`window` and referred to nowhere else."""
        self._pending[reader].append((message, views))

    def collect(self) -> None:
        """Release, per reader and in order, the messages whose batches are all dropped."""
        for reader, pending in enumerate(self._pending):
            released = None
            while pending:
                message, views = pending[0]
                # each array: its pair, this loop's name and getrefcount's argument
                if any(sys.getrefcount(a) > 3 for _, a in views):
                    break
                pending.popleft()
                released = message + 1
            if released is not None:
                self.released[reader] = released
        if self._old:
            kept = []
            for reader, block, array in self._old:
                # the tuple, this loop's name and getrefcount's argument
                if sys.getrefcount(array) > 3:
                    kept.append((reader, block, array))
                else:
                    self._stale[reader, block] -= 1
            self._old = kept

    def reset(self, epoch: int, rotation: int, start: list[int]) -> None:
        """A new epoch, before its workers start it: they read ``plan()``, number their
        messages from 0, and leave the blocks that batches of the last epoch still view
        untouched until those go."""
        self._plan[:] = [epoch, rotation, *start]
        self.collect()
        for reader, pending in enumerate(self._pending):
            for _, views in pending:
                for block, array in views:
                    self._old.append((reader, block, array))
                    self._stale[reader, block] += 1
            pending.clear()
        self.released[:] = 0


def _shared(size: int) -> mmap.mmap:
    """Anonymous shared memory, its pages faulted in now rather than in the first epoch."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, max(size, 1), flags=flags)


def _align(size: int, to: int = 4096) -> int:
    return -(-size // to) * to
