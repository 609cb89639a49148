"""LightGCN (He et al., SIGIR 2020): embeddings smoothed over the user–item graph.

Each layer replaces a node's embedding by the normalised sum of its neighbours',
``E⁽ᵏ⁺¹⁾ = Â E⁽ᵏ⁾`` with ``Â = D^-½ A D^-½`` over the bipartite graph of the training
interactions, and the final embedding is the mean of layers ``0..K``. Only layer 0 is learnt.

The graph is bipartite, so ``Â`` is never built: with ``R̃ = D_u^-½ R D_i^-½`` (users × items),
a layer is two sparse products, ``E_u ← R̃ E_i`` and ``E_i ← R̃ᵀ E_u``. Both ``R̃`` and ``R̃ᵀ``
are held as CSR (the backward of one is a forward of the other), as persistent buffers, so a
model loaded from a checkpoint scores without the training data. Propagation runs once per step
over the whole graph (a few tens of ms on 2 CPU cores for Gowalla); large batches amortise it.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from recscale.dataset import Interactions
from recscale.errors import ConfigError, ModelError
from recscale.models.base import TorchRecommender
from recscale.models.losses import (
    LOSSES,
    bpr_loss,
    cosine_contrastive_loss,
    l2_batch,
    sampled_softmax_loss,
)

__all__ = ["LightGCN", "LightGCNParams", "normalized_adjacency", "top_singular_vectors"]

NEGATIVE_SAMPLERS = ("uniform", "hard", "mix")


@dataclasses.dataclass(frozen=True)
class LightGCNParams:
    """LightGCN hyper-parameters.

    The defaults are the paper's (64 dimensions, 3 layers, BPR with one uniform negative, lr 1e-3,
    L2 1e-4), which need hundreds of epochs. ``configs/gowalla/lightgcn.toml`` is the recipe that
    trains in minutes on 2 CPU cores: 128 dimensions, MixGCF negatives from 32 candidates, lr 1e-2
    annealed over 20 epochs of 8,192-row batches (figures in the README's results).
    """

    dim: int = 64
    n_layers: int = 3
    lr: float = 1e-3
    # L2 on the layer-0 embeddings of the batch (the reference code's `decay`)
    reg: float = 1e-4
    # "bpr" (the paper), "softmax" (sampled softmax over the negatives) or "ccl" (cosine
    # contrastive, SimpleX); see recscale.models.losses. softmax and ccl score by cosine.
    loss: str = "bpr"
    # negatives per row, drawn by the loader (uniform, never one of the user's items)
    n_negatives: int = 1
    # how the negative of a BPR row is chosen among its n_negatives candidates: "uniform" (each
    # is a negative), "hard" (the best-scored one) or "mix" (MixGCF's synthetic hard negative)
    negative_sampler: str = "uniform"
    # > 0: also this many uniform negatives drawn once per batch and shared by all its rows;
    # one (B, d) × (d, N) product scores them, so thousands cost less than a few per row
    shared_negatives: int = 0
    # softmax: logits are cosine / temperature
    temperature: float = 1.0
    # ccl: negatives more similar than the margin are pushed, weighted by negative_weight
    margin: float = 0.8
    negative_weight: float | None = None
    init_std: float = 0.1
    # "normal" (the paper) or "svd": layer 0 starts from the top singular vectors of R̃ scaled by
    # √σ, rescaled to init_std — the graph's smoothest signals, which propagation keeps, so
    # training starts near a good solution instead of noise
    init: str = "normal"

    def __post_init__(self) -> None:
        if self.shared_negatives < 0:
            raise ConfigError(
                f"model lightgcn: shared_negatives must be >= 0, got {self.shared_negatives!r}"
            )
        for name in ("dim", "lr", "n_negatives", "init_std", "temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"model lightgcn: {name} must be > 0, got {getattr(self, name)!r}"
                )
        if self.n_layers < 0:
            raise ConfigError(f"model lightgcn: n_layers must be >= 0, got {self.n_layers!r}")
        if self.reg < 0:
            raise ConfigError(f"model lightgcn: reg must be >= 0, got {self.reg!r}")
        if self.init not in ("normal", "svd"):
            raise ConfigError(
                f"model lightgcn: init {self.init!r} is unknown; expected 'normal' or 'svd'"
            )
        if self.negative_sampler not in NEGATIVE_SAMPLERS:
            raise ConfigError(
                f"model lightgcn: negative_sampler {self.negative_sampler!r} is unknown; expected "
                + ", ".join(repr(x) for x in NEGATIVE_SAMPLERS)
            )
        if self.negative_sampler != "uniform" and (self.loss != "bpr" or self.shared_negatives):
            raise ConfigError(
                f"model lightgcn: negative_sampler {self.negative_sampler!r} makes one negative "
                "per row for BPR: it needs loss = 'bpr' and shared_negatives = 0"
            )
        if self.loss not in LOSSES:
            raise ConfigError(
                f"model lightgcn: loss {self.loss!r} is unknown; expected one of "
                + ", ".join(repr(x) for x in LOSSES)
            )


def top_singular_vectors(
    matrix: sp.spmatrix, k: int, *, seed: int, oversample: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triplets ``(U, σ, V)`` of a sparse matrix, by randomised SVD.

    ``torch.svd_lowrank`` (Halko et al.) with ``k + oversample`` columns and ``iterations``
    power iterations; its random projection comes from a private generator seeded with ``seed``,
    so the result is reproducible and the global RNG is untouched.
    """
    k = min(k, min(matrix.shape))
    q = min(k + oversample, min(matrix.shape))
    coo = matrix.tocoo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse invariant checks disabled"
        tensor = torch.sparse_coo_tensor(
            np.vstack([coo.row, coo.col]), coo.data, matrix.shape, dtype=torch.float32
        ).coalesce()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, sigma, v = torch.svd_lowrank(tensor, q=q, niter=iterations)
    return u[:, :k], sigma[:k], v[:, :k]


def normalized_adjacency(train: Interactions) -> sp.csr_matrix:
    """``R̃ = D_u^-½ R D_i^-½`` (users × items, float32) of the binary interaction matrix.

    Degrees count distinct items (users); a user or item without interactions has an empty row
    (column) rather than a division by zero.
    """
    r = train.to_csr()
    du = np.asarray(r.sum(axis=1)).ravel()
    di = np.asarray(r.sum(axis=0)).ravel()
    inv_u = np.where(du > 0, 1.0 / np.sqrt(np.maximum(du, 1)), 0.0)
    inv_i = np.where(di > 0, 1.0 / np.sqrt(np.maximum(di, 1)), 0.0)
    r = r.tocoo()
    data = (inv_u[r.row] * inv_i[r.col]).astype(np.float32)
    out = sp.csr_matrix((data, (r.row, r.col)), shape=r.shape, dtype=np.float32)
    out.sort_indices()
    return out


class _SparseMatmul(torch.autograd.Function):
    """``A @ x`` whose backward is ``Aᵀ @ grad`` with a precomputed ``Aᵀ`` (both CSR)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, a_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.a_t = a_t
        return a @ x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        return None, None, ctx.a_t @ grad


class LightGCN(TorchRecommender):
    """User and item embeddings propagated over the training graph, trained with BPR or a
    softmax/contrastive loss over sampled negatives."""

    name = "lightgcn"
    Params = LightGCNParams

    def __init__(self, params: LightGCNParams, n_users: int, n_items: int, *, seed: int = 0):
        super().__init__(params, n_users, n_items, seed=seed)
        self.n_negatives = params.n_negatives
        generator = self._generator()
        self.user_emb = torch.nn.Parameter(torch.empty(self.n_users, params.dim))
        self.item_emb = torch.nn.Parameter(torch.empty(self.n_items, params.dim))
        torch.nn.init.normal_(self.user_emb, std=params.init_std, generator=generator)
        torch.nn.init.normal_(self.item_emb, std=params.init_std, generator=generator)
        # the graph (R̃ and R̃ᵀ as CSR arrays); empty until prepare(), restored by load_state_dict
        for prefix in ("graph", "graph_t"):
            self.register_buffer(f"{prefix}_indptr", torch.zeros(0, dtype=torch.int64))
            self.register_buffer(f"{prefix}_indices", torch.zeros(0, dtype=torch.int64))
            self.register_buffer(f"{prefix}_values", torch.zeros(0, dtype=torch.float32))
        self._final: tuple[torch.Tensor, torch.Tensor] | None = None  # cached for scoring

    def prepare(self, train: Interactions, items: pa.Table | None = None) -> None:
        self._check_train(train)
        r = normalized_adjacency(train)
        for prefix, m in (("graph", r), ("graph_t", r.T.tocsr())):
            m.sort_indices()
            device = self.user_emb.device
            setattr(
                self, f"{prefix}_indptr", torch.from_numpy(m.indptr.astype(np.int64)).to(device)
            )
            setattr(
                self, f"{prefix}_indices", torch.from_numpy(m.indices.astype(np.int64)).to(device)
            )
            setattr(self, f"{prefix}_values", torch.from_numpy(m.data).to(device))
        if self.params.init == "svd":
            self._spectral_init(r)
        self._final = None

    def _spectral_init(self, r: sp.csr_matrix) -> None:
        """Layer 0 from the rank-``dim`` SVD of ``R̃``: ``U √σ`` for users, ``V √σ`` for items."""
        dim = self.params.dim
        u, sigma, v = top_singular_vectors(r, dim, seed=self.seed, oversample=32, iterations=4)
        k = u.shape[1]
        scale = sigma[:k].clamp_min(0).sqrt()
        users = torch.zeros(self.n_users, dim)
        items = torch.zeros(self.n_items, dim)
        users[:, :k], items[:, :k] = u[:, :k] * scale, v[:, :k] * scale
        factor = self.params.init_std / float(torch.cat([users, items]).std())
        with torch.no_grad():
            self.user_emb.copy_(users * factor)
            self.item_emb.copy_(items * factor)

    def _graphs(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph_indptr.numel() == 0:
            raise ModelError(
                "lightgcn has no graph: train it (the loop calls prepare(train)) or load a "
                "checkpoint of a trained model"
            )
        with warnings.catch_warnings():
            # "sparse CSR support is in beta": the two products used here are long stable
            warnings.simplefilter("ignore", UserWarning)
            return self._csr_pair()

    def _csr_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.sparse_csr_tensor(
            self.graph_indptr,
            self.graph_indices,
            self.graph_values,
            size=(self.n_users, self.n_items),
            check_invariants=False,
        )
        a_t = torch.sparse_csr_tensor(
            self.graph_t_indptr,
            self.graph_t_indices,
            self.graph_t_values,
            size=(self.n_items, self.n_users),
            check_invariants=False,
        )
        return a, a_t

    def layers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """User and item embeddings of every layer ``0..n_layers`` (layer 0 is learnt)."""
        a, a_t = self._graphs()
        users, items = [self.user_emb], [self.item_emb]
        for _ in range(self.params.n_layers):
            users.append(_SparseMatmul.apply(a, a_t, items[-1]))
            items.append(_SparseMatmul.apply(a_t, a, users[-2]))
        return users, items

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The final user and item embeddings: the mean of layers ``0..n_layers``."""
        users, items = self.layers()
        scale = 1.0 / (self.params.n_layers + 1)
        # running sums: stacking the layers would copy every embedding table once per step
        return sum(users[1:], users[0]) * scale, sum(items[1:], items[0]) * scale

    @property
    def _cosine(self) -> bool:
        return self.params.loss in ("softmax", "ccl")

    @property
    def similarity(self) -> str:
        return "cosine" if self._cosine else "dot"

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._final = None  # the parameters are about to change
        if self.params.negative_sampler != "uniform":
            return self._hard_negative_loss(batch)
        p = self.params
        all_users, all_items = self.propagate()
        items = torch.cat([batch["pos"].unsqueeze(1), batch["neg"]], dim=1)  # (B, 1 + n)
        u = F.embedding(batch["users"], all_users)  # (B, d)
        v = F.embedding(items, all_items)  # (B, 1 + n, d)
        if self._cosine:
            u, v = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
        scores = torch.bmm(v, u.unsqueeze(2)).squeeze(2)  # (B, 1 + n)
        pos, neg = scores[:, 0], scores[:, 1:]
        shared = None
        if p.shared_negatives:
            shared = torch.randint(
                0, self.n_items, (p.shared_negatives,), device=u.device, dtype=torch.int64
            )
            w = F.embedding(shared, all_items)
            if self._cosine:
                w = F.normalize(w, dim=-1)
            extra = u @ w.T  # (B, N)
            # a row's own positive drawn as a shared negative is no negative for that row
            hit = batch["pos"].unsqueeze(1) == shared.unsqueeze(0)
            extra = extra.masked_fill(hit, -1.0 if p.loss == "ccl" else float("-inf"))
            neg = torch.cat([neg, extra], dim=1)
        if p.loss == "ccl":
            loss = cosine_contrastive_loss(
                pos, neg, margin=p.margin, negative_weight=p.negative_weight
            )
        elif p.loss == "bpr":
            loss = bpr_loss(pos, neg)
        else:
            loss = sampled_softmax_loss(pos, neg, temperature=p.temperature)
        if p.reg > 0:
            ego_u = F.embedding(batch["users"], self.user_emb)
            ego_v = F.embedding(items, self.item_emb)
            loss = loss + p.reg * l2_batch(ego_u, ego_v[:, 0], ego_v[:, 1:])
            if shared is not None:
                loss = loss + p.reg * 0.5 * self.item_emb[shared].pow(2).sum(dim=1).mean()
        return loss

    def _hard_negative_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """BPR against one negative made from the ``n_negatives`` sampled candidates.

        ``hard`` (dynamic negative sampling, Zhang et al. 2013): the candidate the model scores
        highest. ``mix`` (MixGCF, Huang et al., KDD 2021): per layer, each candidate is mixed with
        the positive, ``α e_pos + (1 - α) e_cand`` with ``α ~ U(0, 1)`` per row and layer, the
        mix scoring highest against the user's embedding of that layer is kept, and the negative is
        the mean of the kept layers — a synthetic negative harder than any real one. Selection runs
        without autograd: only the chosen rows get gradients.
        """
        p = self.params
        user_layers, item_layers = self.layers()
        users, pos, cand = batch["users"], batch["pos"], batch["neg"]  # cand: (B, n)
        n_layers = len(user_layers)
        u = [F.embedding(users, e) for e in user_layers]  # each (B, d)
        v = [F.embedding(pos, e) for e in item_layers]
        with torch.no_grad():
            if p.negative_sampler == "hard":
                u_final = torch.stack(u).mean(0)
                cand_final = F.embedding(cand, torch.stack(item_layers).mean(0))  # (B, n, d)
                scores = torch.bmm(cand_final, u_final.unsqueeze(2)).squeeze(2)
                chosen = cand.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
                picks = [chosen] * n_layers
                alpha = torch.zeros(len(users), n_layers, device=users.device)
            else:
                alpha = torch.rand(len(users), n_layers, device=users.device)
                picks = []
                for layer in range(n_layers):
                    a = alpha[:, layer : layer + 1]
                    to_pos = (u[layer] * v[layer]).sum(dim=1, keepdim=True)  # (B, 1)
                    cand_emb = F.embedding(cand, item_layers[layer])  # (B, n, d)
                    to_cand = torch.bmm(cand_emb, u[layer].unsqueeze(2)).squeeze(2)  # (B, n)
                    mixed = a * to_pos + (1 - a) * to_cand  # score of each mixed candidate
                    picks.append(cand.gather(1, mixed.argmax(dim=1, keepdim=True)).squeeze(1))
        neg_layers = [
            alpha[:, layer : layer + 1] * v[layer]
            + (1 - alpha[:, layer : layer + 1]) * F.embedding(picks[layer], item_layers[layer])
            for layer in range(n_layers)
        ]
        u_final, v_final = torch.stack(u).mean(0), torch.stack(v).mean(0)
        n_final = torch.stack(neg_layers).mean(0)
        loss = bpr_loss((u_final * v_final).sum(dim=1), (u_final * n_final).sum(dim=1))
        if p.reg > 0:
            ego = [u[0], v[0]] + [F.embedding(pick, self.item_emb) for pick in picks[:1]]
            loss = loss + p.reg * l2_batch(*ego)
        return loss

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.params.lr, fused=True)

    def train(self, mode: bool = True) -> LightGCN:
        self._final = None
        return super().train(mode)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False):
        self._final = None
        # the graph buffers change size from empty to the graph's: assign them, do not copy
        for key in list(state):
            if key.startswith("graph"):
                setattr(self, key, state[key].to(self.user_emb.device))
        rest = {k: v for k, v in state.items() if not k.startswith("graph")}
        missing, unexpected = super().load_state_dict(rest, strict=False, assign=assign)
        missing = [k for k in missing if not k.startswith("graph")]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"lightgcn state: missing keys {missing}, unexpected keys {unexpected}"
            )
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def _final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._final is None or self.training:
            with torch.no_grad():
                final = self.propagate()
            if self.training:
                return final
            self._final = final
        return self._final

    def score(self, users: np.ndarray) -> torch.Tensor:
        users = torch.from_numpy(self._check_users(users)).to(self.device)
        all_users, all_items = self._final_embeddings()
        if self._cosine:
            # trained on cosines: rank by them
            return F.normalize(all_users[users], dim=-1) @ F.normalize(all_items, dim=-1).T
        return all_users[users] @ all_items.T

    def export_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        users, items = self._final_embeddings()
        if self._cosine:
            users, items = F.normalize(users, dim=-1), F.normalize(items, dim=-1)
        return (
            np.ascontiguousarray(users.detach().cpu().numpy(), np.float32),
            np.ascontiguousarray(items.detach().cpu().numpy(), np.float32),
        )
