"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

A user is the sequence of their last ``max_len`` items. Item embeddings plus learnable position
embeddings go through ``n_layers`` causal self-attention blocks (pre-LayerNorm); the hidden state
at position ``t`` sees items ``1..t`` only and is trained to score item ``t + 1`` above the
others. The output layer is the item embedding table itself, so ``score(u, i) = ⟨h_u, e_i⟩``
where ``h_u`` is the hidden state after the user's latest item: exported user vectors are these
hidden states and item vectors the item embeddings.

``loss`` picks the objective over the next item at every position:

- ``"softmax"``: cross-entropy over the whole catalogue. Klenitskiy & Vasilev (RecSys 2023,
  "Turning Dross Into Gold Loss: is BERT4Rec really better than SASRec?") show that this alone
  lifts SASRec above BERT4Rec under full ranking. It costs a ``(positions × items)`` product
  per batch, the dominant cost on large catalogues;
- ``"sampled-softmax"``: the same cross-entropy against ``n_negatives`` uniform items drawn once
  per batch and shared by all its positions (one ``positions × n_negatives`` product; a draw
  equal to a position's target is masked for it); with a few thousand negatives it tracks the
  full softmax at a fraction of its cost on large catalogues. ``batch_negatives`` adds the
  batch's own next items to the draws: they follow popularity, so the items that weigh most in
  the full softmax's normaliser are scored in every batch. ``log_q`` divides each negative's
  ``exp(score)`` by the probability that it is among the batch's negatives (Bengio & Senécal
  2008; Yi et al., RecSys 2019), which makes the sampled normaliser an unbiased estimate of the
  full one; with uniform draws alone that is a constant, ``log(N / n)`` roughly;
- ``"bce"``: the paper's binary cross-entropy, the positive against each of ``n_negatives``
  negatives drawn per position among the items the user has not interacted with;
- ``"bpr"``: the positive above each of those negatives
  (:func:`~recscale.models.losses.bpr_loss`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from recscale.dataset import Interactions
from recscale.errors import ConfigError
from recscale.loader import SequenceLoader, World, last_items
from recscale.models.base import TorchRecommender, rank_batch_size
from recscale.models.losses import bpr_loss, sampled_softmax_loss

__all__ = ["SASRec", "SASRecParams"]

SASRecLoss = typing.Literal["softmax", "sampled-softmax", "bce", "bpr"]


@dataclasses.dataclass(frozen=True)
class SASRecParams:
    """SASRec hyper-parameters (the ``[model]`` table).

    ``max_len`` 50, ``dim`` 64, 2 layers are the usual settings on Amazon Beauty (use 200 on
    MovieLens, whose histories are long). The model trains one row per user, so the ``[train]``
    table wants small batches: ``batch_size = 128``, ``epochs = 20`` (the cosine schedule and
    early stopping on the valid part do the rest).

    Measured on the Beauty SASRec/BERT4Rec file (``ingest --order-from-input``, leave-last k=1,
    full ranking, 2 shared CPU cores, 1 thread): the defaults reach HR@10 0.0505, NDCG@10
    0.0306 on test (best validation at epoch 16 of 19, 8.5 minutes), against iALS
    0.0340 / 0.0175, MF-BPR 0.0208 / 0.0105 and popularity 0.0078 / 0.0035 on the same split.
    What got there (NDCG@10 on 5,000 valid users): 1,024 shared negatives, dropout 0.5, lr 1e-3
    0.028 after 15 epochs; lr 3e-3 and dropout 0.3 0.033; 4,096 negatives and dropout 0.2 0.038.
    The full softmax learns more per epoch (0.0065 after one epoch against 0.0028 for 1,024
    negatives) but costs 350 s per epoch on that CPU against about 20 s, so it is the choice on
    a GPU, not the default. ``configs/beauty/sasrec.toml`` adds ``batch_negatives`` and
    ``log_q`` (valid NDCG@10 0.033 after 3 epochs against 0.027 with uniform draws alone, but
    over-fitting after epoch 7 at dropout 0.2), dropout 0.5 and 30 epochs: HR@10 0.0510 ± 0.0007,
    NDCG@10 0.0305 ± 0.0005 over 3 seeds, against EASE's 0.0481 / 0.0266. On ml-latest-small
    (real times, leave-last, ``max_len`` 200, batch 64): HR@10 0.1028, NDCG@10 0.0588 against MF-BPR 0.0745 / 0.0433 and iALS 0.0715 / 0.0339.
    """

    max_len: int = 50
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    lr: float = 3e-3
    weight_decay: float = 0.0
    loss: SASRecLoss = "sampled-softmax"
    # negatives per batch (sampled-softmax; the full softmax when >= the number of items) or
    # per position (bce, bpr); unused by "softmax"
    n_negatives: int = 4096
    # sampled-softmax: the batch's own next items join the uniform draws as negatives, so the
    # popular items that make up most of the full softmax's normaliser are scored in every batch
    batch_negatives: bool = False
    # sampled-softmax: weight each negative by 1 / P(it is in the batch's set), which makes the
    # sampled normaliser an unbiased estimate of the full softmax's
    log_q: bool = False
    init_std: float = 0.02
    # batches whose users are sorted by history length together (SequenceLoader); 0 = off
    bucket_batches: int = 32

    def __post_init__(self) -> None:
        for name in ("max_len", "dim", "n_layers", "n_heads", "lr", "n_negatives", "init_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model sasrec: {name} must be > 0, got {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise ConfigError(
                f"model sasrec: dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model sasrec: dropout must be in [0, 1), got {self.dropout!r}")
        if self.bucket_batches < 0:
            raise ConfigError(
                f"model sasrec: bucket_batches must be >= 0, got {self.bucket_batches!r}"
            )
        if self.weight_decay < 0:
            raise ConfigError(f"model sasrec: weight_decay must be >= 0, got {self.weight_decay!r}")
        losses = typing.get_args(SASRecLoss)
        if self.loss not in losses:
            raise ConfigError(
                f"model sasrec: loss {self.loss!r} is unknown; expected one of "
                + ", ".join(repr(x) for x in losses)
            )
        for name in ("batch_negatives", "log_q"):
            if getattr(self, name) and self.loss != "sampled-softmax":
                raise ConfigError(
                    f"model sasrec: {name} applies to loss 'sampled-softmax' only, "
                    f"not {self.loss!r}"
                )


class _Block(torch.nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(LN(x))``, then ``x + ffn(LN(x))``."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        # SASRec's point-wise feed-forward keeps the model's width
        self.ffn = torch.nn.Sequential(
            torch.nn.Linear(dim, dim),
            torch.nn.GELU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(dim, dim),
        )
        self.dropout = torch.nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(dim, dim=2)
        heads = (b, length, self.n_heads, dim // self.n_heads)
        q, k, v = (t.view(heads).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x + self.dropout(self.out(attn.transpose(1, 2).reshape(b, length, dim)))
        return x + self.dropout(self.ffn(self.norm2(x)))


def _trim(seq: torch.Tensor, *aligned: torch.Tensor) -> list[torch.Tensor]:
    """Drop the columns on the left that are padding in every row, from ``seq`` and ``aligned``.

    Positions count from the right, so the remaining columns encode exactly as before; short
    histories (and the loader's length buckets) make this most of a batch. It reads one number
    from the device.
    """
    width = max(int((seq > 0).sum(dim=1).max()), 1) if len(seq) else 1
    if width >= seq.shape[1]:
        return [seq, *aligned]
    return [seq[:, -width:], *(x[:, -width:] for x in aligned)]


class SASRec(TorchRecommender):
    """Causal self-attention over each user's recent items; the item table is the output layer."""

    name = "sasrec"
    Params = SASRecParams

    def __init__(self, params: SASRecParams, n_users: int, n_items: int, *, seed: int = 0):
        super().__init__(params, n_users, n_items, seed=seed)
        # negatives per position (bce, bpr) and per batch (sampled-softmax), drawn by the loader
        per_position = params.loss in ("bce", "bpr")
        self.n_negatives = params.n_negatives if per_position else 0
        # as many draws as items would only approximate what the full softmax computes exactly
        self.full_softmax = params.loss == "softmax" or (
            params.loss == "sampled-softmax" and params.n_negatives >= n_items
        )
        self.shared_negatives = (
            params.n_negatives if params.loss == "sampled-softmax" and not self.full_softmax else 0
        )
        generator = self._generator()
        d = params.dim
        # row 0 is padding (item i is row i + 1); it stays zero and gets no gradient
        self.item_emb = torch.nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = torch.nn.Embedding(params.max_len, d)
        self.blocks = torch.nn.ModuleList(
            _Block(d, params.n_heads, params.dropout) for _ in range(params.n_layers)
        )
        self.norm = torch.nn.LayerNorm(d)
        self.dropout = torch.nn.Dropout(params.dropout)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=params.init_std, generator=generator)
            elif name.endswith("bias"):
                torch.nn.init.zeros_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        # each user's last max_len observed items (shifted ids, left-padded): what score() reads
        self.register_buffer(
            "history", torch.zeros(n_users, params.max_len, dtype=torch.int64), persistent=True
        )
        # each item's share of the next items to predict in training (set by prepare when
        # batch_negatives is on)
        self.register_buffer(
            "target_freq", torch.zeros(n_items, dtype=torch.float64), persistent=False
        )

    # ----------------------------------------------------------------- histories

    def prepare(self, train: Interactions, items: pa.Table | None = None) -> None:
        self._check_train(train)
        self.observe(train)
        if self.params.batch_negatives:
            self._count_targets(train)

    def _count_targets(self, train: Interactions) -> None:
        """Each item's share of the next items to predict: the batch negatives' proposal."""
        indptr, seq_items = train.sequences()
        firsts = indptr[:-1][np.diff(indptr) > 0]
        is_target = np.ones(len(seq_items), dtype=bool)
        is_target[firsts] = False
        counts = np.bincount(seq_items[is_target], minlength=self.n_items).astype(np.float64)
        self.target_freq.copy_(torch.from_numpy(counts / max(counts.sum(), 1.0)))

    def observe(self, history: Interactions) -> None:
        """Keep each user's last ``max_len`` items of ``history`` (in time order) for scoring."""
        self._check_train(history)
        indptr, items = history.sequences()
        window, _ = last_items(indptr, items, np.arange(self.n_users), self.params.max_len)
        self.history.copy_(torch.from_numpy(window))

    def make_loader(
        self,
        train: Interactions,
        config: Any,
        *,
        world: World | None = None,
        source: Any = None,
    ) -> SequenceLoader:
        if config.loader != "memory":
            raise ConfigError(
                f"model sasrec trains on whole user sequences: loader = {config.loader!r} "
                "streams single rows; use loader = 'memory'"
            )
        world = world or World()
        return SequenceLoader(
            train,
            max_len=self.params.max_len,
            batch_size=rank_batch_size(config.batch_size, world),
            n_negatives=self.n_negatives,
            shared_negatives=self.shared_negatives,
            bucket_batches=self.params.bucket_batches,
            seed=config.seed,
            reject_positives=config.reject_positives,
            world=world,
        )

    # ----------------------------------------------------------------- the encoder

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(B, L, dim)`` of left-padded, shifted item ids ``seq (B, L)``."""
        x = self.item_emb(seq) * math.sqrt(self.params.dim)
        return self.encode_embeddings(x, seq != 0)

    def encode_embeddings(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The blocks over input embeddings ``x (B, L, dim)`` whose real cells are ``real (B, L)``.

        Position ``i`` attends to positions ``j <= i`` that hold an item, and always to itself:
        a padding cell then sees only itself (a softmax over nothing would be NaN and leak into
        every later layer), and what a padding cell holds never reaches a real one. A user
        without history is an all-padding row; its last state is a function of the position
        embeddings alone, the same for every such user.
        """
        length = x.shape[1]
        x = self.dropout(x + self.pos_emb.weight[-length:])
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril_()
        eye = torch.eye(length, dtype=torch.bool, device=x.device)
        mask = (causal & real.unsqueeze(1)) | eye  # (B, L query, L key)
        mask = mask.unsqueeze(1)  # one mask for all heads
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def _user_states(self, users: torch.Tensor) -> torch.Tensor:
        """The last hidden state of each user's observed history, ``(len(users), dim)``."""
        (seq,) = _trim(self.history[users])
        return self.encode(seq)[:, -1]

    # ----------------------------------------------------------------- training

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        names = [k for k in ("seq", "pos", "neg") if k in batch]
        cells = dict(zip(names, _trim(*(batch[k] for k in names)), strict=True))
        seq = cells["seq"]
        real = cells["pos"] > 0
        target = cells["pos"][real]  # (N,) shifted ids: one per (user, position) with a next item
        loss = self.params.loss
        if self.full_softmax:
            negatives = target[:0]  # every item is scored, none is looked up
        elif loss == "sampled-softmax":
            negatives = batch["shared_neg"]  # (n,) for every position, sorted and unique
            if self.params.batch_negatives:
                negatives = torch.unique(torch.cat([negatives, target]))
        else:
            negatives = cells["neg"][real]  # (N, n), per position
        # one lookup for inputs, targets and negatives: each lookup's backward fills a gradient
        # the size of the whole item table, which dominates a step on large catalogues
        ids = torch.cat([seq.reshape(-1), target, negatives.reshape(-1)])
        emb = self.item_emb(ids)
        n_in, n_target = seq.numel(), len(target)
        x = emb[:n_in].view(*seq.shape, -1) * math.sqrt(self.params.dim)
        h = self.encode_embeddings(x, seq != 0)[real]  # (N, d)
        if self.full_softmax:
            logits = h @ self.item_emb.weight[1:].T  # (N, n_items)
            return F.cross_entropy(logits, target - 1)
        pos = (h * emb[n_in : n_in + n_target]).sum(-1)  # (N,)
        neg_emb = emb[n_in + n_target :]
        if loss == "sampled-softmax":
            neg = h @ neg_emb.T  # (N, n)
            # a draw that is a position's own target is no negative for it; the draws are sorted
            # and unique, so each target matches at most one column, found by binary search
            # (a comparison over the whole (N, n) grid would cost as much as the product)
            col = torch.searchsorted(negatives, target).clamp_(max=len(negatives) - 1)
            row = torch.nonzero(negatives[col] == target).squeeze(1)
            neg = neg.index_put((row, col[row]), neg.new_tensor(-torch.inf))
            log_q = self._log_inclusion(negatives, len(target)) if self.params.log_q else None
            return sampled_softmax_loss(pos, neg, log_q_neg=log_q)
        neg_emb = neg_emb.view(len(target), -1, self.params.dim)
        neg = torch.bmm(neg_emb, h.unsqueeze(2)).squeeze(2)  # (N, n)
        if loss == "bpr":
            return bpr_loss(pos, neg)
        # bce: -log σ(pos) - mean log(1 - σ(neg)), softplus for stability
        return (F.softplus(-pos) + F.softplus(neg).mean(dim=1)).mean()

    def _log_inclusion(self, negatives: torch.Tensor, n_targets: int) -> torch.Tensor:
        """log P(item ∈ the batch's negatives) for each of ``negatives`` (shifted ids).

        An item is missed by ``n_negatives`` uniform draws with probability ``(1 - 1/N)^n`` and,
        with ``batch_negatives``, by the batch's ``n_targets`` next items with probability
        ``(1 - f)^n_targets`` where ``f`` is its share of all next items in training.
        """
        log_miss = self.params.n_negatives * math.log1p(-1.0 / self.n_items)
        log_miss = torch.full(
            negatives.shape, log_miss, dtype=torch.float64, device=negatives.device
        )
        if self.params.batch_negatives:
            freq = self.target_freq[negatives - 1]
            log_miss = log_miss + n_targets * torch.log1p(-freq.clamp(max=1 - 1e-12))
        # log(1 - e^x): expm1 keeps the small inclusion probabilities of rare items exact
        return torch.log(-torch.expm1(log_miss)).to(torch.float32)

    def make_optimizer(self) -> torch.optim.Optimizer:
        # decoupled decay (AdamW) on the weight matrices only: not on norms, biases or padding
        decay = [p for n, p in self.named_parameters() if p.dim() > 1]
        rest = [p for n, p in self.named_parameters() if p.dim() <= 1]
        return torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.params.weight_decay},
                {"params": rest, "weight_decay": 0.0},
            ],
            lr=self.params.lr,
            betas=(0.9, 0.98),
            # one pass over all parameters: the item table dominates and the per-tensor loop
            # would walk it several times per step
            fused=True,
        )

    # ----------------------------------------------------------------- scoring

    def score(self, users: np.ndarray) -> torch.Tensor:
        users = torch.from_numpy(self._check_users(users)).to(self.device)
        was_training = self.training
        self.eval()  # dropout off: scores are a function of the weights and histories only
        try:
            with torch.no_grad():
                return self._user_states(users) @ self.item_emb.weight[1:].T
        finally:
            self.train(was_training)

    def export_embeddings(self, batch_users: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                states = [
                    self._user_states(
                        torch.arange(s, min(s + batch_users, self.n_users), device=self.device)
                    )
                    .cpu()
                    .numpy()
                    for s in range(0, self.n_users, batch_users)
                ]
                items = self.item_emb.weight[1:].detach().cpu().numpy()
        finally:
            self.train(was_training)
        users = np.concatenate(states) if states else np.zeros((0, self.params.dim), np.float32)
        return np.ascontiguousarray(users, np.float32), np.ascontiguousarray(items, np.float32)
