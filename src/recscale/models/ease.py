"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019).

One closed-form item × item weight matrix ``B`` with a zero diagonal, the minimiser of
``‖X − XB‖² + λ‖B‖²`` where ``X`` is the binary user × item matrix:

    G = XᵀX + λI,   P = G⁻¹,   B = −P / diag(P) (column-wise),   diag(B) = 0

and ``score(u) = X[u] @ B``: an item scores by how well the user's other items predict it. The
model *is* the dense ``n_items²`` matrix (6.7 GB in float32 for Gowalla's 40,981 items), so
:meth:`EASE.fit` first checks that it fits in memory and refuses with the figures when it does
not. On the CPU ``G`` is factorised and inverted in place by LAPACK (``spotrf`` then
``spotri``), so the whole fit holds one dense matrix; on CUDA ``torch.linalg`` holds two (the
factor and the inverse).

The helpers :func:`history_csr`, :func:`gather_rows` and :func:`cooccurrence_blocks` are shared
with :mod:`recscale.models.itemknn`, which scores the same way from a sparse item × item matrix.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import threadpoolctl
import torch
from scipy.linalg import lapack

from recscale.dataset import Interactions
from recscale.errors import ConfigError, ModelError
from recscale.models.base import Recommender

__all__ = ["EASE", "EASEParams", "ease_memory_bytes", "ease_weights", "parse_memory_size"]

log = logging.getLogger(__name__)

# co-occurrence entries computed per block of item rows: bounds the sparse temporaries of the
# Gram matrix (EASE) and of the similarities (ItemKNN) to a few hundred MB whatever the catalogue
BLOCK_ENTRIES = 1 << 24
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_GIB = 2**30
# the most elements of a dense operand torch's CSR × dense product addresses correctly
DENSE_BLOCK_ELEMENTS = 2**31 - 1


def parse_memory_size(value: str | int) -> int:
    """Bytes of a size such as ``"8GB"``, ``"512MiB"``, ``"1.5 GB"`` or an integer byte count.

    Decimal units are powers of 1000 (``GB``), binary ones powers of 1024 (``GiB``), as in
    DuckDB's ``memory_limit``. Anything else is a :class:`ValueError`.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a memory size must be > 0, got {value}")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a memory size: {value!r}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a memory size must be > 0, got {value!r}")
    return size


@dataclasses.dataclass(frozen=True)
class EASEParams:
    """EASE hyper-parameters.

    λ was chosen on problems cut from Gowalla (LightGCN split; its most popular 10,000 or 16,000
    training items, the interactions with them; full ranking, train items excluded), which a
    fit covers in seconds to a minute instead of the full catalogue's many minutes. NDCG@20 on
    10,000 items: λ 50 0.1862, 100 0.1898, 200 0.1900, 500 0.1861, 1000 0.1811, 2000 0.1754
    (ItemKNN's defaults 0.1756); on 16,000 items λ 200 0.1764, 500 0.1716 (ItemKNN 0.1628).
    """

    # λ, the L2 penalty on B: large because it is added to co-occurrence counts
    l2: float = 200.0
    # the most memory the dense item × item matrices may take: "auto" is the memory available
    # when fit starts (RAM, or the free memory of the CUDA device); a size ("8GB", "512MiB",
    # or bytes) is taken instead, e.g. under a container limit the system does not report
    memory_limit: str | int = "auto"

    def __post_init__(self) -> None:
        if not self.l2 > 0:
            raise ConfigError(f"model ease: l2 must be > 0, got {self.l2!r}")
        if self.memory_limit != "auto":
            try:
                parse_memory_size(self.memory_limit)
            except ValueError:
                raise ConfigError(
                    f"model ease: memory_limit must be 'auto' or a size such as '8GB', "
                    f"'512MiB' or a byte count, got {self.memory_limit!r}"
                ) from None


def ease_memory_bytes(n_items: int, device: str | torch.device = "cpu") -> int:
    """Memory that fitting EASE over ``n_items`` items needs on ``device``, in bytes.

    float32 ``n_items²`` matrices: one on the CPU (LAPACK factorises and inverts in place), two
    on CUDA (torch keeps the Cholesky factor while it writes the inverse), plus the bounded
    blocks of the sparse Gram matrix.
    """
    copies = 2 if torch.device(device).type == "cuda" else 1
    return copies * 4 * n_items * n_items + BLOCK_ENTRIES * 16


class EASE(Recommender):
    """The closed-form item × item linear autoencoder; the dense ``B`` is the whole model."""

    name = "ease"
    Params = EASEParams

    def __init__(self, params: EASEParams, n_users: int, n_items: int, *, seed: int = 0):
        super().__init__(params, n_users, n_items, seed=seed)
        self._device = torch.device("cpu")
        self.weights: torch.Tensor | None = None  # B, (n_items, n_items); None until fitted
        # the observed histories as CSR arrays (binary): what score() multiplies B by
        self.x_indptr = torch.zeros(self.n_users + 1, dtype=torch.int64)
        self.x_indices = torch.zeros(0, dtype=torch.int64)

    def observe(self, history: Interactions) -> None:
        """Score from ``history`` from now on: at test time train and valid are the history."""
        self._check_train(history)
        self.x_indptr, self.x_indices = history_csr(history, self._device)

    def fit(self, train: Interactions, *, progress: bool = True) -> None:
        self._check_train(train)
        self._check_memory()
        self.observe(train)
        started = time.perf_counter()
        self.weights = ease_weights(train.to_csr(), self.params.l2, self._device)
        seconds = time.perf_counter() - started
        log.info("ease: B of %d items (λ=%g) in %.1fs", self.n_items, self.params.l2, seconds)

    def _check_memory(self) -> None:
        needed = ease_memory_bytes(self.n_items, self._device)
        if self.params.memory_limit != "auto":
            budget: int | None = parse_memory_size(self.params.memory_limit)
            source = f"memory_limit={self.params.memory_limit!r}"
        elif self._device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self._device)
            # memory torch's allocator holds but does not use is available to it as well
            reserved = torch.cuda.memory_reserved(self._device)
            budget = free + reserved - torch.cuda.memory_allocated(self._device)
            source = f"free on {self._device}"
        else:
            budget = available_ram()
            source = "available RAM"
        if budget is None:
            log.warning(
                "ease: cannot tell the available memory (install psutil); fitting %d items "
                "needs %.1f GiB, set memory_limit to have it checked",
                self.n_items,
                needed / _GIB,
            )
            return
        if needed > budget:
            raise ModelError(
                f"ease: {self.n_items:,} items need {needed / _GIB:.1f} GiB for the dense item × "
                f"item matrices, but only {budget / _GIB:.1f} GiB are available ({source}); "
                "use itemknn (sparse, bounded memory), or drop rare items at ingest "
                "(--min-item-interactions N, a k-core filter)"
            )
        log.info(
            "ease: %d items need %.1f GiB of %.1f GiB (%s)",
            self.n_items,
            needed / _GIB,
            budget / _GIB,
            source,
        )

    def score(self, users: np.ndarray) -> torch.Tensor:
        users = self._check_users(users)
        if self.weights is None:
            raise ModelError("ease is not fitted: call fit(train) or load a fitted state_dict")
        rows, positions = gather_rows(self.x_indptr, torch.from_numpy(users).to(self._device))
        with torch.no_grad():
            return binary_csr_mm(rows, self.x_indices[positions], self.weights)

    def state_dict(self) -> dict[str, Any]:
        """``weights`` (B) and the observed histories; the tensors are shared, not copied.

        B is the size of the catalogue squared: a copy of it could take the memory that fit
        checked it had. Treat the returned tensors as read-only.
        """
        if self.weights is None:
            raise ModelError("ease is not fitted: nothing to save")
        return {
            "weights": self.weights.cpu(),
            "x_indptr": self.x_indptr.cpu(),
            "x_indices": self.x_indices.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = torch.as_tensor(state["weights"], dtype=torch.float32)
        if weights.shape != (self.n_items, self.n_items):
            raise ModelError(
                f"ease: weights has shape {tuple(weights.shape)}, "
                f"expected ({self.n_items}, {self.n_items})"
            )
        self.x_indptr, self.x_indices = check_csr(
            "ease", state["x_indptr"], state["x_indices"], self.n_users, self.n_items
        )
        self.weights = weights
        self.to(self._device)

    def to(self, device: str | torch.device) -> EASE:
        self._device = torch.device(device)
        if self.weights is not None:
            self.weights = self.weights.to(self._device)
        self.x_indptr = self.x_indptr.to(self._device)
        self.x_indices = self.x_indices.to(self._device)
        return self

    @property
    def device(self) -> torch.device:
        return self._device


def ease_weights(
    x: sp.csr_matrix,
    l2: float,
    device: str | torch.device = "cpu",
    *,
    method: Literal["auto", "lapack", "torch"] = "auto",
) -> torch.Tensor:
    """EASE's ``B`` (float32, on ``device``) from the binary users × items matrix ``x``.

    ``method`` ``"lapack"`` (the CPU's choice under ``"auto"``) factorises and inverts
    ``XᵀX + λI`` in place with LAPACK, so the CPU holds one dense matrix; ``"torch"`` (CUDA's)
    uses ``torch.linalg.cholesky_ex`` and ``torch.cholesky_inverse``, which hold two.
    """
    device = torch.device(device)
    if method == "auto":
        method = "lapack" if device.type == "cpu" else "torch"
    if method == "lapack":
        if device.type != "cpu":
            raise ModelError(f"ease: the lapack method computes on the CPU, not on {device}")
        return _weights_lapack(x, l2)
    return _weights_torch(x, l2, device)


def _weights_lapack(x: sp.csr_matrix, l2: float) -> torch.Tensor:
    n = x.shape[1]
    started = time.perf_counter()
    # zeros: its pages are mapped lazily, and the blocks below add into it
    g = np.zeros((n, n), dtype=np.float32)
    for start, stop, block in cooccurrence_blocks(x):
        block.toarray(out=g[start:stop])
    g[np.diag_indices(n)] += l2
    log.info("ease: Gram matrix %d × %d in %.1fs", n, n, time.perf_counter() - started)
    started = time.perf_counter()
    # LAPACK is Fortran-ordered: g.T is the same symmetric matrix with no copy. BLAS gets the
    # threads torch was given (the training config's num_threads), not every core
    with threadpoolctl.threadpool_limits(torch.get_num_threads(), "blas"):
        factor, info = lapack.spotrf(g.T, lower=True, clean=False, overwrite_a=True)
        _check_lapack("spotrf", info, factor, g, l2)
        log.info("ease: Cholesky factor in %.1fs", time.perf_counter() - started)
        started = time.perf_counter()
        inverse, info = lapack.spotri(factor, lower=True, overwrite_c=True)
        _check_lapack("spotri", info, inverse, g, l2)
    # spotri wrote the lower triangle of g.T, which is g's upper triangle: mirror it down
    _mirror_upper(g)
    log.info("ease: inverse in %.1fs", time.perf_counter() - started)
    # B = −P / diag(P), column j divided by P_jj, all in place
    np.divide(g, -g.diagonal().copy(), out=g)
    g[np.diag_indices(n)] = 0.0
    return torch.from_numpy(g)


def _check_lapack(routine: str, info: int, result: np.ndarray, g: np.ndarray, l2: float) -> None:
    if info > 0:
        raise ModelError(
            f"ease: XᵀX + λI is not positive definite in float32 (LAPACK {routine} stopped at "
            f"column {info}); raise l2 (now {l2:g})"
        )
    if info < 0 or not np.shares_memory(result, g):
        # a copy would double the memory the memory check promised
        raise ModelError(f"ease: LAPACK {routine} failed (info={info}) or copied its input")


def _weights_torch(x: sp.csr_matrix, l2: float, device: torch.device) -> torch.Tensor:
    n = x.shape[1]
    started = time.perf_counter()
    g = torch.zeros(n, n, dtype=torch.float32, device=device)
    for start, stop, block in cooccurrence_blocks(x):
        g[start:stop] = torch.from_numpy(block.toarray()).to(device)
    g.diagonal().add_(l2)
    _synchronize(device)
    log.info("ease: Gram matrix %d × %d in %.1fs", n, n, time.perf_counter() - started)
    started = time.perf_counter()
    factor, info = torch.linalg.cholesky_ex(g)
    del g
    if int(info) > 0:
        raise ModelError(
            f"ease: XᵀX + λI is not positive definite in float32 (Cholesky stopped at column "
            f"{int(info)}); raise l2 (now {l2:g})"
        )
    weights = torch.cholesky_inverse(factor)
    del factor
    weights.div_(-weights.diagonal().clone())
    weights.diagonal().zero_()
    _synchronize(device)
    log.info("ease: Cholesky factor and inverse in %.1fs", time.perf_counter() - started)
    return weights


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # for the logged times: CUDA kernels run asynchronously


def available_ram() -> int | None:
    """Bytes of RAM available to a new allocation (psutil, else /proc/meminfo), or None."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _mirror_upper(g: np.ndarray, block: int = 1024) -> None:
    """Copy the upper triangle of the square ``g`` onto its lower one, in place, by blocks."""
    n = len(g)
    for start in range(0, n, block):
        stop = min(n, start + block)
        g[start:stop, :start] = g[:start, start:stop].T
        square = g[start:stop, start:stop]
        lower = np.tril_indices(stop - start, -1)
        square[lower] = square.T[lower]


def history_csr(history: Interactions, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The binary users × items matrix of ``history`` as CSR ``(indptr, indices)``, int64."""
    x = history.to_csr()
    return (
        torch.from_numpy(x.indptr.astype(np.int64)).to(device),
        torch.from_numpy(x.indices.astype(np.int64)).to(device),
    )


def check_csr(
    model: str, indptr: Any, indices: Any, n_rows: int, n_cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indptr, indices)`` from a state dict as int64 tensors, or a ModelError naming the fault."""
    indptr = torch.as_tensor(indptr, dtype=torch.int64)
    indices = torch.as_tensor(indices, dtype=torch.int64)
    if indptr.shape != (n_rows + 1,) or indices.dim() != 1 or int(indptr[-1]) != len(indices):
        raise ModelError(
            f"{model}: a CSR matrix of {n_rows} rows with {int(indptr[-1])} entries was expected, "
            f"got indptr of shape {tuple(indptr.shape)} and {len(indices)} indices"
        )
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= n_cols):
        raise ModelError(f"{model}: CSR column indices outside 0..{n_cols - 1}")
    return indptr, indices


def gather_rows(indptr: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``rows`` of a CSR matrix: the new ``indptr`` and the positions of their entries.

    ``indices[positions]`` (and ``values[positions]``) are the entries of the selected rows, one
    row after another; vectorised, on whatever device the tensors are.
    """
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    new_indptr = torch.zeros(len(rows) + 1, dtype=torch.int64, device=indptr.device)
    torch.cumsum(counts, 0, out=new_indptr[1:])
    total = int(new_indptr[-1])
    # entry t of the output is entry t + (start of its row − where its row begins in the output)
    shift = torch.repeat_interleave(starts - new_indptr[:-1], counts, output_size=total)
    positions = torch.arange(total, device=indptr.device) + shift
    return new_indptr, positions


def binary_csr(indptr: torch.Tensor, indices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A torch sparse CSR matrix of ones at ``indices`` (a batch of users' histories)."""
    with warnings.catch_warnings():
        # "sparse CSR support is in beta": CSR @ dense, the one product used, is long stable
        warnings.filterwarnings("ignore", "Sparse CSR tensor support", UserWarning)
        return torch.sparse_csr_tensor(
            indptr,
            indices,
            torch.ones(len(indices), dtype=torch.float32, device=indices.device),
            size=size,
            check_invariants=False,
        )


def binary_csr_mm(indptr: torch.Tensor, indices: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``X @ dense`` for the binary CSR ``X`` of ``(indptr, indices)`` (as :func:`binary_csr`).

    torch's CSR × dense kernel addresses the dense operand with 32-bit offsets and reads out of
    bounds (a segfault) once it holds more than 2³¹ elements — EASE's ``B`` past 46,340 items —
    so the product is summed over blocks of ``dense``'s rows that stay below that, each with the
    entries of ``X`` in its columns.
    """
    n_rows = len(indptr) - 1
    n_inner, n_cols = dense.shape
    block = max(1, DENSE_BLOCK_ELEMENTS // max(n_cols, 1))
    if n_inner <= block:
        return torch.sparse.mm(binary_csr(indptr, indices, (n_rows, n_inner)), dense)
    row_of = torch.repeat_interleave(
        torch.arange(n_rows, device=indices.device), indptr.diff(), output_size=len(indices)
    )
    out = torch.zeros(n_rows, n_cols, dtype=dense.dtype, device=dense.device)
    for start in range(0, n_inner, block):
        stop = min(start + block, n_inner)
        keep = (indices >= start) & (indices < stop)  # keeps the row order, so still CSR
        block_indptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=indices.device)
        torch.cumsum(torch.bincount(row_of[keep], minlength=n_rows), 0, out=block_indptr[1:])
        x = binary_csr(block_indptr, indices[keep] - start, (n_rows, stop - start))
        out += torch.sparse.mm(x, dense[start:stop])
    return out


def cooccurrence_blocks(
    x: sp.csr_matrix, max_entries: int = BLOCK_ENTRIES
) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """``(start, stop, XᵀX[start:stop])`` for consecutive blocks of item rows of the Gram matrix.

    Blocks are cut so that each holds at most ``max_entries`` co-occurrences (a block of one
    item may hold more): item ``i``'s row has at most ``Σ_{u ∋ i} |I_u|`` entries, so memory
    stays bounded however popular or numerous the items are.
    """
    xt = x.T.tocsr()
    # upper bound of each item row's entries: the summed history lengths of its users
    bound = xt @ np.diff(x.indptr).astype(np.float64)
    ends = np.cumsum(bound)
    n_items = x.shape[1]
    start = 0
    while start < n_items:
        base = ends[start - 1] if start else 0.0
        stop = int(np.searchsorted(ends, base + max_entries, side="right"))
        stop = min(n_items, max(stop, start + 1))
        yield start, stop, (xt[start:stop] @ x).tocsr()
        start = stop
