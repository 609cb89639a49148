"""The stream loader's per-row work on a shuffle window, compiled by numba.

- :func:`swap_positions` draws the swap partners of a Fisher–Yates shuffle, and
  :func:`shuffle_pairs` applies them to a window's (user, item) pairs packed into one 64-bit word
  each, so every swap moves both columns with one load and one store, and no gather by a random
  index follows.
- :func:`uniform_draws` fills a buffer with uniform negatives.

The loader has :func:`shuffle_pairs` do all three in three passes over the window: the partners
are drawn while the pairs are packed, the swaps write each row out as it reaches its final place,
and the negatives are drawn last. The draws of both drawing passes run in blocks without a
branch, which LLVM vectorises; the few blocks holding a value Lemire's test may reject are
drawn again one by one. The two other functions draw the same values alone, the plain way, and
the tests hold the three to them.

Why not ``torch.randperm`` and two ``index_select``: on a 1M-row window both wait on a cache
miss at every row (the permutation is built by random swaps, and the gathers read at random);
together they cost four to five times what decoding the window does. Drawing the partners first
and swapping in a second pass lets the CPU run ahead on the loads, which it cannot do while a
draw's rejection test sits between them.

The random source is SplitMix64 (Steele, Lea and Flood, 2014; the seeding generator of
xoshiro) used as a counter-based stream: value ``i`` of a seed is ``mix(seed + (i + 1) * γ)``,
so a kernel computes its draws inline, with no generator state and no buffer of raw words.
NumPy's PCG64 costs about 2.3 ns a word here through numba's calls into it, which made the
draws cost a third of the window's work; SplitMix64 costs under 1 ns and passes BigCrush.

Every draw is exact: a uniform 32-bit value (half of a 64-bit word) times the bound, with
Lemire's rejection of the few low parts that would favour some results, redrawn from a second
stream of the same seed. So every order of a window is equally likely, and draws are a pure
function of the seed. All kernels write into buffers they are given (fresh memory costs a page
fault per 4 KiB) and release the GIL, so they overlap the decoding of the next window in another
thread.
"""

from __future__ import annotations

import platform

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["MAX_BOUND", "compile_kernels", "shuffle_pairs", "swap_positions", "uniform_draws"]

# results are drawn from 32-bit values
MAX_BOUND = 1 << 32

_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
_TWO32 = np.uint64(1 << 32)
# SplitMix64's increment (2**64 / golden ratio) and its finaliser's multipliers
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# the stream of redraws after a rejection: the seed's words from 2**63 on, far past any window
_REDRAWS = np.uint64(1 << 63)
# how many swaps ahead a swap's rows are fetched (see _prefetch)
_PREFETCH_AHEAD = 64
# draws per block of the vectorised draws (see _pack_drawing_partners)
_BLOCK = 1024
# x86-64 stores the shuffled rows with movnti (see _store_streaming); elsewhere, plain stores
_STREAMING = platform.machine().lower() in ("x86_64", "amd64")
if _STREAMING:
    # numba's JIT reads inline assembly only once LLVM's parser for it is set up
    llvm.initialize_native_asmparser()


@intrinsic
def _prefetch(typingctx, array, index):  # pragma: no cover - compiled
    """A hint to bring ``array[index]``'s cache line in for writing (LLVM's ``llvm.prefetch``).

    The CPU's own look-ahead keeps a dozen of the swaps' random loads in flight; once another
    process competes for the cache most of them miss it, and the swaps cost as much as decoding
    the window. Fetched 64 swaps ahead, they cost half as much with two workers as unfetched
    (5 ms per million rows against 11), and a tenth less than fetched 32 ahead.
    """

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, [args[1]])
        if getattr(pointer.type, "is_opaque", False):
            name = "llvm.prefetch.p0"
        else:  # LLVM before opaque pointers
            pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
            name = "llvm.prefetch.p0i8"
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [pointer.type, i32, i32, i32]), name
        )
        # for writing, kept in every cache level, data (not instructions)
        builder.call(function, [pointer, i32(1), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@intrinsic
def _store_streaming(typingctx, array, index, value):  # pragma: no cover - compiled
    """``array[index] = value``, written past the cache on x86-64 (``movnti``).

    The shuffled rows go to blocks far larger than the cache, so a plain store first reads
    each line from memory, only to overwrite it, and pushes out the lines the swaps still need.
    With two workers this took a tenth of the shuffle (about 1 ms per million rows). numba
    drops LLVM's ``!nontemporal`` marks, hence the instruction itself. The stores are weakly
    ordered: :func:`_fence_streaming` must follow them before the rows are handed over.
    """

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, [args[1]])
        stored = context.cast(builder, args[2], signature.args[2], array_type.dtype)
        width = array_type.dtype.bitwidth
        if _STREAMING and width in (32, 64):
            store = ir.InlineAsm(
                ir.FunctionType(ir.VoidType(), [pointer.type, stored.type]),
                f"movnti{'l' if width == 32 else 'q'} $1, ($0)",
                "r,r,~{memory}",
                side_effect=True,
            )
            builder.call(store, [pointer, stored])
        else:
            builder.store(stored, pointer)
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


@intrinsic
def _fence_streaming(typingctx):  # pragma: no cover - compiled
    """Every streaming store so far made visible before any later one (``sfence``)."""

    def codegen(context, builder, signature, args):
        if _STREAMING:
            fence = ir.InlineAsm(
                ir.FunctionType(ir.VoidType(), []), "sfence", "~{memory}", side_effect=True
            )
            builder.call(fence, [])
        return context.get_dummy_value()

    return types.void(), codegen


@njit(inline="always", cache=True)
def _word(seed, i):  # pragma: no cover - compiled
    """Word ``i`` of ``seed``'s stream: SplitMix64's output for counter ``i + 1``."""
    z = seed + (i + np.uint64(1)) * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(inline="always", cache=True)
def _below(seed, x, bound, redraw):  # pragma: no cover - compiled
    """``x`` (a uniform 32-bit value) turned into a uniform integer in ``0 .. bound - 1``.

    ``redraw`` counts the seed's redraws so far (a one-element array): a rejected value is
    replaced by the next word of the redraw stream.
    """
    m = x * bound
    if (m & _LOW32) < bound:
        floor = (_TWO32 - bound) % bound
        while (m & _LOW32) < floor:
            w = _word(seed, _REDRAWS + redraw[0])
            redraw[0] += np.uint64(1)
            m = (w >> _SHIFT) * bound
    return m >> _SHIFT


@njit(inline="always", cache=True)
def _draw_partners(seed, h, n, out, redraw):  # pragma: no cover - compiled
    """Swap partners ``2h`` and ``2h + 1`` of ``n`` rows into ``out``, from word ``h``.

    Two a word, without a branch on which half: a third faster than one a word.
    """
    w = _word(seed, np.uint64(h))
    s = 2 * h
    out[s] = np.uint32(_below(seed, w & _LOW32, np.uint64(n - s), redraw))
    out[s + 1] = np.uint32(_below(seed, w >> _SHIFT, np.uint64(n - s - 1), redraw))


@njit(inline="always", cache=True)
def _draw_last_partner(seed, n, out, redraw):  # pragma: no cover - compiled
    """The last of an odd number of partners, from the low half of its word."""
    s = out.size - 1
    w = _word(seed, np.uint64(s >> 1))
    out[s] = np.uint32(_below(seed, w & _LOW32, np.uint64(n - s), redraw))


@njit(inline="always", cache=True)
def _draw_uniform(seed, h, bound, out, redraw):  # pragma: no cover - compiled
    """Uniform draws ``2h`` and ``2h + 1`` below ``bound`` into ``out``, from word ``h``."""
    w = _word(seed, np.uint64(h))
    out[2 * h] = _below(seed, w & _LOW32, bound, redraw)
    out[2 * h + 1] = _below(seed, w >> _SHIFT, bound, redraw)


@njit(inline="always", cache=True)
def _draw_last_uniform(seed, bound, out, redraw):  # pragma: no cover - compiled
    """The last of an odd number of uniform draws, from the low half of its word."""
    w = _word(seed, np.uint64(out.size >> 1))
    out[out.size - 1] = _below(seed, w & _LOW32, bound, redraw)


@njit(inline="always", cache=True)
def _pack(users, items, j):  # pragma: no cover - compiled
    return (np.uint64(np.uint32(users[j])) << _SHIFT) | np.uint64(np.uint32(items[j]))


@njit(nogil=True, cache=True)
def _swap_positions(seed, out):  # pragma: no cover - compiled
    n = out.size + 1
    redraw = np.zeros(1, np.uint64)
    for h in range(out.size >> 1):
        _draw_partners(seed, h, n, out, redraw)
    if out.size & 1:
        _draw_last_partner(seed, n, out, redraw)


@njit(nogil=True, cache=True)
def _uniform_draws(seed, high, out):  # pragma: no cover - compiled
    bound = np.uint64(high)
    redraw = np.zeros(1, np.uint64)
    for h in range(out.size >> 1):
        _draw_uniform(seed, h, bound, out, redraw)
    if out.size & 1:
        _draw_last_uniform(seed, bound, out, redraw)


@njit(nogil=True, cache=True)
def _pack_drawing_partners(seed, users, items, pos, packed):  # pragma: no cover - compiled
    """Packs the pairs and draws the partners exactly as _swap_positions does.

    Each block's draws are first made without their rejection test, only counting the values
    that may need it (a few per million): a loop without a branch, which LLVM turns into vector
    code (it does so for a loop over a block's own slices counted from 0, not for a range
    within the whole arrays). Blocks with any such value are then drawn again one by one, in
    order, so the redraws come in the order _swap_positions takes them.
    """
    n = users.size
    pairs = pos.size >> 1
    full = pairs // _BLOCK
    suspects = np.zeros(full, np.int64)
    for b in range(full):
        h0 = b * _BLOCK
        s0 = 2 * h0
        p, q = pos[s0 : s0 + 2 * _BLOCK], packed[s0 : s0 + 2 * _BLOCK]
        u, v = users[s0 : s0 + 2 * _BLOCK], items[s0 : s0 + 2 * _BLOCK]
        count = 0
        for t in range(_BLOCK):
            w = _word(seed, np.uint64(h0 + t))
            low = np.uint64(n - s0 - 2 * t)
            high = low - np.uint64(1)
            m0, m1 = (w & _LOW32) * low, (w >> _SHIFT) * high
            p[2 * t], p[2 * t + 1] = np.uint32(m0 >> _SHIFT), np.uint32(m1 >> _SHIFT)
            count += ((m0 & _LOW32) < low) + ((m1 & _LOW32) < high)
            q[2 * t], q[2 * t + 1] = _pack(u, v, 2 * t), _pack(u, v, 2 * t + 1)
        suspects[b] = count
    redraw = np.zeros(1, np.uint64)
    for b in range(full):
        if suspects[b]:
            for h in range(b * _BLOCK, (b + 1) * _BLOCK):
                _draw_partners(seed, h, n, pos, redraw)
    for h in range(full * _BLOCK, pairs):
        _draw_partners(seed, h, n, pos, redraw)
    if pos.size & 1:
        _draw_last_partner(seed, n, pos, redraw)
    for j in range(2 * full * _BLOCK, n):
        packed[j] = _pack(users, items, j)


@njit(nogil=True, cache=True)
def _fill_uniform(seed, high, out):  # pragma: no cover - compiled
    """_uniform_draws's values, drawn as _pack_drawing_partners draws the partners."""
    bound = np.uint64(high)
    pairs = out.size >> 1
    full = pairs // _BLOCK
    suspects = np.zeros(full, np.int64)
    for b in range(full):
        h0 = b * _BLOCK
        o = out[2 * h0 : 2 * (h0 + _BLOCK)]
        count = 0
        for t in range(_BLOCK):
            w = _word(seed, np.uint64(h0 + t))
            m0, m1 = (w & _LOW32) * bound, (w >> _SHIFT) * bound
            o[2 * t], o[2 * t + 1] = m0 >> _SHIFT, m1 >> _SHIFT
            count += ((m0 & _LOW32) < bound) + ((m1 & _LOW32) < bound)
        suspects[b] = count
    redraw = np.zeros(1, np.uint64)
    for b in range(full + 1):
        if b == full or suspects[b]:  # the last, partial block is drawn one by one
            for h in range(b * _BLOCK, min((b + 1) * _BLOCK, pairs)):
                _draw_uniform(seed, h, bound, out, redraw)
    if out.size & 1:
        _draw_last_uniform(seed, bound, out, redraw)


@njit(nogil=True, cache=True)
def _shuffle_pairs(
    users, items, pos, packed, out_users, out_items, order_seed, draw, seed, high, out_neg
):  # pragma: no cover - compiled
    n = users.size
    if draw:
        _pack_drawing_partners(order_seed, users, items, pos, packed)
    else:
        for j in range(n):
            packed[j] = _pack(users, items, j)
    # swap s puts row n - 1 - s in its final place: it is written out there and then, rather
    # than swapped back into the scratch and read again in a pass of its own
    for s in range(n - 1):
        # the last swaps fetch the last partner again: cheaper than a branch
        _prefetch(packed, pos[min(s + _PREFETCH_AHEAD, n - 2)])
        i = n - 1 - s
        k = pos[s]
        v = packed[k]
        packed[k] = packed[i]
        _store_streaming(out_users, i, np.int32(np.uint32(v >> _SHIFT)))
        _store_streaming(out_items, i, np.int32(np.uint32(v & _LOW32)))
    if n:
        v = packed[0]
        _store_streaming(out_users, 0, np.int32(np.uint32(v >> _SHIFT)))
        _store_streaming(out_items, 0, np.int32(np.uint32(v & _LOW32)))
    _fence_streaming()
    if out_neg.size:
        _fill_uniform(seed, high, out_neg)


def swap_positions(seed: int, out: np.ndarray) -> np.ndarray:
    """Swap partners of a uniform shuffle of ``len(out) + 1`` rows, drawn into uint32 ``out``.

    Entry ``s`` is the partner of row ``n - 1 - s``, uniform on ``0 .. n - 1 - s``.
    """
    if out.dtype != np.uint32 or out.ndim != 1:
        raise TypeError(f"swap_positions: out must be 1-d uint32, got {out.dtype} {out.shape}")
    if len(out) + 1 > MAX_BOUND:
        raise ValueError(f"swap_positions: {len(out) + 1:,} rows; at most {MAX_BOUND:,}")
    _swap_positions(_seed_word(seed), out)
    return out


def uniform_draws(seed: int, high: int, out: np.ndarray) -> np.ndarray:
    """``out`` (int32 or int64, any shape, contiguous) filled with uniform draws of ``0 .. high - 1``."""
    _check_bound("uniform_draws", high, out.dtype)
    _uniform_draws(_seed_word(seed), high, out.reshape(-1))
    return out


def shuffle_pairs(
    users: np.ndarray,
    items: np.ndarray,
    positions: np.ndarray,
    out_users: np.ndarray,
    out_items: np.ndarray,
    scratch: np.ndarray,
    negatives: tuple[int, int, np.ndarray] | None = None,
    order_seed: int | None = None,
) -> None:
    """Write int32 ``users`` and ``items`` into ``out_*`` in the order :func:`swap_positions` drew.

    ``scratch`` is a uint64 buffer of at least ``len(users)``; the outputs (int32 or int64) must
    not overlap the inputs. ``negatives`` = ``(seed, high, out)``, with ``out`` of ``len(users)``
    rows, fills ``out`` in the same pass, exactly as ``uniform_draws(seed, high, out)`` would.
    With ``order_seed``, ``positions`` is written rather than read: the partners
    ``swap_positions(order_seed, positions)`` would draw, drawn in the pass that packs the pairs.
    """
    n = len(users)
    if len(items) != n or len(positions) != max(n - 1, 0):
        raise ValueError(
            f"shuffle_pairs: {n} users, {len(items)} items and {len(positions)} positions"
        )
    if len(out_users) != n or len(out_items) != n or len(scratch) < n:
        raise ValueError(
            f"shuffle_pairs: {n} rows into outputs of {len(out_users)} and {len(out_items)} "
            f"with {len(scratch)} of scratch"
        )
    if order_seed is not None and positions.dtype != np.uint32:
        raise TypeError(
            f"shuffle_pairs: positions must be uint32 to draw into, got {positions.dtype}"
        )
    if negatives is None:
        seed, high, out_neg = 0, 1, np.empty(0, out_users.dtype)
    else:
        seed, high, out_neg = negatives
        _check_bound("shuffle_pairs", high, out_neg.dtype)
        if len(out_neg) != n or not out_neg.flags.c_contiguous:
            raise ValueError(
                f"shuffle_pairs: negatives must be {n} contiguous rows, got {out_neg.shape}"
            )
    # one compiled variant for Arrow's read-only buffers and for arrays joined from them
    _shuffle_pairs(
        _read_only(users),
        _read_only(items),
        positions,
        scratch[:n],
        out_users,
        out_items,
        _seed_word(order_seed or 0),
        order_seed is not None,
        _seed_word(seed),
        high,
        out_neg.reshape(-1),
    )


def compile_kernels() -> None:
    """Compile (or load from numba's cache) every variant the stream loader runs.

    Called before DataLoader workers start, so that forked workers inherit the machine code
    instead of each loading it again at the start of every epoch.
    """
    rows = _read_only(np.arange(3, dtype=np.int32))
    positions = swap_positions(0, np.empty(2, dtype=np.uint32))
    for dtype in (np.int32, np.int64):
        # one variant per output type: drawing or reading the partners, and drawing negatives
        # or not, are decided at run time
        pair = np.empty(3, dtype), np.empty(3, dtype)
        negatives = (0, 3, np.empty((3, 1), dtype))
        shuffle_pairs(rows, rows, positions, *pair, np.empty(3, np.uint64), negatives, 0)


def _check_bound(name: str, high: int, dtype: np.dtype) -> None:
    if not 0 < high <= min(MAX_BOUND, np.iinfo(dtype).max + 1):
        raise ValueError(f"{name}: high must be in 1..{MAX_BOUND:,} for {dtype}")


def _read_only(values: np.ndarray) -> np.ndarray:
    if not values.flags.writeable:
        return values
    view = values.view()
    view.flags.writeable = False
    return view


def _seed_word(seed: int) -> np.uint64:
    """``seed`` as the stream's 64-bit key (an int of any size; the low 64 bits count)."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
