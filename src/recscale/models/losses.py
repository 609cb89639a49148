"""Loss functions of the PyTorch models: pure functions of score and embedding tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bpr_loss", "l2_batch"]


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking loss, averaged over the batch and the negatives.

    ``pos_scores`` is ``(B,)``, ``neg_scores`` is ``(B, n)``: ``mean(-log σ(pos - neg))``.
    ``softplus(neg - pos)`` is the same quantity without the overflow of ``log(sigmoid(.))``.
    With n > 1 negatives each positive gets n ranking constraints per step, which makes BPR
    converge in far fewer epochs than the classic one negative.
    """
    if neg_scores.dim() == 1:
        neg_scores = neg_scores.unsqueeze(1)
    return F.softplus(neg_scores - pos_scores.unsqueeze(1)).mean()


def l2_batch(*tensors: torch.Tensor) -> torch.Tensor:
    """``½ Σ‖x‖²`` over the given batch embeddings, divided by the batch size (first dimension).

    This is the regulariser of the LightGCN reference code: only the rows a batch touches are
    penalised, so frequent users and items are regularised more often, unlike optimizer weight
    decay, which shrinks every row at every step. A tensor of shape ``(B, n, d)`` (several
    negatives per row) counts as the mean over its ``n`` rows.
    """
    batch = tensors[0].shape[0]
    total = tensors[0].new_zeros(())
    for x in tensors:
        squares = x.pow(2).sum(dim=-1)
        if squares.dim() == 2:
            squares = squares.mean(dim=1)
        total = total + squares.sum()
    return 0.5 * total / batch
