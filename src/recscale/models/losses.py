"""Loss functions of the PyTorch models: pure functions of score and embedding tensors.

Three families, shared by every embedding model (MF, LightGCN, two-tower, SASRec):

- :func:`bpr_loss`: pairwise, one positive against each sampled negative;
- :func:`sampled_softmax_loss` and :func:`in_batch_softmax_loss`: the positive against many
  negatives at once, with the log-Q correction that removes the popularity bias of the sampler;
- :func:`cosine_contrastive_loss`: SimpleX's cosine contrastive loss (Mao et al., CIKM 2021),
  which with many negatives and a margin makes plain MF competitive with graph models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "bpr_loss",
    "cosine_contrastive_loss",
    "in_batch_softmax_loss",
    "l2_batch",
    "sampled_softmax_loss",
]

# the names a model's `loss` hyper-parameter accepts for (user, positive, sampled negatives) rows
LOSSES = ("bpr", "softmax", "ccl")


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


def sampled_softmax_loss(
    pos_scores: torch.Tensor,
    neg_scores: torch.Tensor,
    *,
    temperature: float = 1.0,
    log_q_pos: torch.Tensor | None = None,
    log_q_neg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the positive among itself and ``n`` sampled negatives, batch mean.

    ``pos_scores (B,)``, ``neg_scores (B, n)``; logits are ``score / temperature - log Q`` where
    ``log Q`` is the log-probability with which the sampler proposes the item (Bengio & Senécal
    2008; Yi et al., RecSys 2019). Without the correction, a popularity sampler makes popular
    items look like negatives too often and the model learns to under-score them; with uniform
    negatives ``log Q`` is a constant and can be left out.
    """
    if neg_scores.dim() == 1:
        neg_scores = neg_scores.unsqueeze(1)
    pos_logits, neg_logits = pos_scores / temperature, neg_scores / temperature
    if log_q_pos is not None:
        pos_logits = pos_logits - log_q_pos
    if log_q_neg is not None:
        neg_logits = neg_logits - log_q_neg
    # -log softmax of the positive, without concatenating it to the (B, n) negatives: with
    # thousands of negatives each full-size pass over the logits costs as much as the matmul
    total = torch.logaddexp(pos_logits, torch.logsumexp(neg_logits, dim=1))
    return (total - pos_logits).mean()


def in_batch_softmax_loss(
    query: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over the batch's own positives: row ``i``'s positive is ``items[i]``.

    ``query (B, d)`` and ``items (B, d)`` are the two towers' outputs, ``item_ids (B,)`` the items
    (an item that is the positive of several rows is not a negative for any of them), ``log_q
    (B,)`` the log-probability of each item appearing in a batch, i.e. its share of training
    rows. In-batch negatives are drawn by popularity, so without the correction popular items
    are pushed down.
    """
    logits = query @ items.T / temperature  # (B, B)
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    same = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(query), device=query.device)
    return F.cross_entropy(logits, target)


def cosine_contrastive_loss(
    pos_cos: torch.Tensor,
    neg_cos: torch.Tensor,
    *,
    margin: float = 0.8,
    negative_weight: float | None = None,
) -> torch.Tensor:
    """SimpleX's CCL on cosine similarities: ``(1 - cos⁺) + w · mean(relu(cos⁻ - margin))``.

    ``pos_cos (B,)``, ``neg_cos (B, n)``, both in ``[-1, 1]``. Only negatives more similar than
    ``margin`` are pushed, so the many easy ones cost nothing; ``negative_weight`` (default
    ``n``, i.e. the sum over the negatives) balances them against the positive.
    """
    if neg_cos.dim() == 1:
        neg_cos = neg_cos.unsqueeze(1)
    weight = float(neg_cos.shape[1]) if negative_weight is None else negative_weight
    positive = 1.0 - pos_cos
    negative = F.relu(neg_cos - margin).mean(dim=1)
    return (positive + weight * negative).mean()


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
