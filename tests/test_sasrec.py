"""SASRec and its sequence loader: causality, padding, exact batches, resumption, a known answer."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from recscale.config import TrainConfig
from recscale.dataset import Interactions
from recscale.errors import ConfigError, RunError
from recscale.evaluate import evaluate_model
from recscale.loader import SequenceLoader, World, last_items
from recscale.models import SASRec, SASRecParams, create_model
from recscale.train import fit

N_ITEMS = 12


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def sequences_log(lengths: list[int], seed: int = 0) -> tuple[Interactions, list[list[int]]]:
    """Users whose histories have the given lengths, random items, rows shuffled, ts = order."""
    rng = np.random.default_rng(seed)
    histories = [rng.integers(0, N_ITEMS, n).tolist() for n in lengths]
    users = np.repeat(np.arange(len(lengths)), lengths)
    items = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
    ts = np.concatenate([np.arange(n) * 10 for n in lengths]).astype(np.int64)
    shuffle = rng.permutation(len(users))  # the loader must order by time, not by row
    log = Interactions(
        users[shuffle].astype(np.int32),
        items[shuffle].astype(np.int32),
        ts[shuffle],
        np.ones(len(users), np.float32),
        len(lengths),
        N_ITEMS,
    )
    return log, histories


def expected_row(history: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """The brute-force row: last max_len inputs and their next items, shifted, left-padded."""
    inputs = [i + 1 for i in history[:-1]][-max_len:]
    targets = [i + 1 for i in history[1:]][-max_len:]
    pad = [0] * (max_len - len(inputs))
    return pad + inputs, pad + targets


LENGTHS = [1, 2, 3, 7, 12, 0, 5, 9, 2, 15, 4]


# ------------------------------------------------------------------------- the loader


def test_every_user_with_two_items_once_per_epoch_and_exact_rows() -> None:
    log, histories = sequences_log(LENGTHS)
    loader = SequenceLoader(log, max_len=6, batch_size=4, seed=2)
    eligible = [u for u, n in enumerate(LENGTHS) if n >= 2]
    assert loader.rows_per_epoch == len(eligible) == 9
    assert len(loader) == 3
    for _ in range(2):
        batches = list(loader)
        assert [len(b["users"]) for b in batches] == [4, 4, 1]
        users = torch.cat([b["users"] for b in batches]).tolist()
        assert sorted(users) == eligible
        assert "neg" not in batches[0]
        for batch in batches:
            for row, user in enumerate(batch["users"].tolist()):
                seq, pos = expected_row(histories[user], 6)
                assert batch["seq"][row].tolist() == seq
                assert batch["pos"][row].tolist() == pos
            # the target of position i is the input at position i + 1
            seq, pos = batch["seq"], batch["pos"]
            both = (seq[:, 1:] > 0) & (pos[:, :-1] > 0)
            assert torch.equal(pos[:, :-1][both], seq[:, 1:][both])
            assert torch.equal(pos > 0, seq > 0)
            assert seq.dtype == pos.dtype == torch.int64
    assert loader.epoch == 2


def test_epoch_orders_differ_and_depend_on_the_seed() -> None:
    log, _ = sequences_log(LENGTHS)
    a = SequenceLoader(log, max_len=4, batch_size=9, seed=0)
    (first,), (second,) = list(a), list(a)
    assert sorted(first["users"].tolist()) == sorted(second["users"].tolist())
    assert first["users"].tolist() != second["users"].tolist()
    (other,) = list(SequenceLoader(log, max_len=4, batch_size=9, seed=1))
    assert other["users"].tolist() != first["users"].tolist()


def test_negatives_are_padded_and_never_positives() -> None:
    log, histories = sequences_log(LENGTHS)
    loader = SequenceLoader(log, max_len=5, batch_size=16, n_negatives=7, seed=3)
    (batch,) = list(loader)
    neg = batch["neg"]
    assert neg.shape == (9, 5, 7) and neg.dtype == torch.int64
    real = batch["seq"] > 0
    assert torch.all(neg[~real] == 0)
    assert torch.all((neg[real] >= 1) & (neg[real] <= N_ITEMS))
    for row, user in enumerate(batch["users"].tolist()):
        drawn = set((neg[row][real[row]] - 1).flatten().tolist())
        assert not drawn & set(histories[user])
    # without rejection the draws are plain uniform: positives do occur
    loose = SequenceLoader(
        log, max_len=5, batch_size=16, n_negatives=7, seed=3, reject_positives=False
    )
    (batch,) = list(loose)
    hits = [
        set((batch["neg"][row] - 1).flatten().tolist()) & set(histories[user])
        for row, user in enumerate(batch["users"].tolist())
    ]
    assert any(hits)


@pytest.mark.parametrize("bucket_batches", [0, 2])
def test_batches_are_deterministic_and_resume_mid_epoch(bucket_batches: int) -> None:
    log, _ = sequences_log(LENGTHS)

    def make() -> SequenceLoader:
        return SequenceLoader(
            log,
            max_len=5,
            batch_size=2,
            n_negatives=3,
            shared_negatives=4,
            seed=7,
            bucket_batches=bucket_batches,
        )

    uninterrupted = make()
    list(uninterrupted)  # epoch 0
    expected = list(uninterrupted)  # epoch 1
    again = make()
    list(again)
    assert all(
        torch.equal(x[k], y[k]) for x, y in zip(expected, list(again), strict=True) for k in x
    )

    crashed = make()
    list(crashed)
    it = iter(crashed)
    seen = [next(it), next(it)]
    state = crashed.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 2)
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(seen) + len(rest) == len(expected) == 5
    for x, y in zip(seen + rest, expected, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert resumed.epoch == 2 and resumed.batch == 0

    other = SequenceLoader(log, max_len=6, batch_size=2, seed=7)
    with pytest.raises(RunError, match=r"max_len=5 \(now 6\)"):
        other.load_state_dict(state)


def test_length_buckets_group_similar_histories() -> None:
    lengths = list(range(2, 40)) * 3  # 114 users
    log, _ = sequences_log(lengths)
    loader = SequenceLoader(log, max_len=50, batch_size=8, seed=0, bucket_batches=100)
    for _ in range(2):
        batches = list(loader)
        users = torch.cat([b["users"] for b in batches]).tolist()
        assert sorted(users) == list(range(len(lengths)))  # still each user once
        assert [len(b["users"]) for b in batches] == [8] * 14 + [2]  # only the last is short
        # one window holds the epoch: its batches are consecutive runs of the sorted lengths
        spans = sorted(
            (
                min(lengths[u] for u in b["users"].tolist()),
                max(lengths[u] for u in b["users"].tolist()),
            )
            for b in batches
        )
        assert all(hi <= next_lo for (_, hi), (next_lo, _) in itertools.pairwise(spans))
        # and come in a shuffled order, not shortest first
        firsts = [min(lengths[u] for u in b["users"].tolist()) for b in batches[:-1]]
        assert firsts != sorted(firsts)


def test_shared_negatives_are_one_draw_per_batch() -> None:
    log, _ = sequences_log(LENGTHS)
    loader = SequenceLoader(log, max_len=5, batch_size=4, shared_negatives=6, seed=3)
    batches = list(loader)
    # sorted and unique (at most 6 distinct draws), for the model's binary search
    assert all(1 <= len(b["shared_neg"]) <= 6 for b in batches)
    assert all(torch.all(b["shared_neg"][1:] > b["shared_neg"][:-1]) for b in batches)
    assert all(1 <= int(i) <= N_ITEMS for b in batches for i in b["shared_neg"])
    assert not torch.equal(batches[0]["shared_neg"], batches[1]["shared_neg"])


def test_ranks_share_the_users() -> None:
    log, _ = sequences_log(LENGTHS)
    ranks = [
        SequenceLoader(log, max_len=3, batch_size=2, seed=1, world=World(rank=r, world_size=3))
        for r in range(3)
    ]
    users = [torch.cat([b["users"] for b in r]).tolist() for r in ranks]
    assert [len(u) for u in users] == [3, 3, 3]
    assert sorted(u for rank in users for u in rank) == [u for u, n in enumerate(LENGTHS) if n >= 2]


def test_last_items_of_every_user() -> None:
    log, histories = sequences_log(LENGTHS)
    indptr, items = log.sequences()
    window, index = last_items(indptr, items, np.arange(len(LENGTHS)), 4)
    for user, history in enumerate(histories):
        kept = [i + 1 for i in history][-4:]
        assert window[user].tolist() == [0] * (4 - len(kept)) + kept
    assert np.array_equal(index < 0, window == 0)


def test_bad_loader_settings_are_config_errors() -> None:
    log, _ = sequences_log(LENGTHS)
    with pytest.raises(ConfigError, match=r"max_len and batch_size must be > 0, got 0 and 2"):
        SequenceLoader(log, max_len=0, batch_size=2)
    with pytest.raises(ConfigError, match=r"bucket_batches must be >= 0, got -1"):
        SequenceLoader(log, max_len=3, batch_size=2, bucket_batches=-1)


# ------------------------------------------------------------------------- the model


def small_model(**params: object) -> SASRec:
    defaults: dict[str, object] = {"dim": 16, "max_len": 8, "n_layers": 2, "n_heads": 2}
    model = create_model("sasrec", {**defaults, **params}, 5, N_ITEMS, seed=1)
    assert isinstance(model, SASRec)
    # non-zero biases and norm weights, so that nothing is trivially symmetric
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def test_changing_a_later_item_leaves_earlier_positions_unchanged() -> None:
    model = small_model()
    generator = torch.Generator().manual_seed(1)
    seq = torch.randint(1, N_ITEMS + 1, (3, 8), generator=generator)
    seq[1, :3] = 0  # a padded row as well
    with torch.no_grad():
        before = model.encode(seq)
        for t in range(3, 8):
            changed = seq.clone()
            changed[:, t] = changed[:, t] % N_ITEMS + 1  # another item
            after = model.encode(changed)
            torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
            assert not torch.allclose(after[:, t], before[:, t])


def test_padding_does_not_reach_real_positions() -> None:
    model = small_model()
    seq = torch.tensor([[0, 0, 0, 0, 0, 3, 7, 2], [0, 0, 5, 1, 1, 9, 4, 12]])
    real = seq > 0
    with torch.no_grad():
        clean = model.encode(seq)
        x = model.item_emb(seq) * 4.0  # sqrt(dim)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
        noisy = torch.where(real[..., None], x, noise)  # garbage in every padding cell
        out = model.encode_embeddings(noisy, real)
        torch.testing.assert_close(out[real], clean[real], rtol=0, atol=1e-6)
        # positions count from the right: the same items without the padding encode the same
        short = model.encode(seq[:1, 5:])
        torch.testing.assert_close(short[0], clean[0, 5:], rtol=1e-5, atol=1e-6)


def test_history_buffer_and_users_without_history() -> None:
    log, histories = sequences_log([3, 0, 11, 0, 1])
    model = small_model()
    model.prepare(log)
    for user, history in enumerate(histories):
        kept = [i + 1 for i in history][-8:]
        assert model.history[user].tolist() == [0] * (8 - len(kept)) + kept
    scores = model.score(np.arange(5))
    assert torch.isfinite(scores).all()
    # no history: the encoding of an all-padding sequence, the same for every such user
    assert torch.equal(scores[1], scores[3])
    empty = model.encode(torch.zeros(1, 8, dtype=torch.int64))[0, -1] @ model.item_emb.weight[1:].T
    torch.testing.assert_close(scores[1], empty)


@pytest.mark.parametrize("loss", ["softmax", "sampled-softmax", "bce", "bpr"])
def test_learns_a_deterministic_next_item(loss: str, tmp_path: Path) -> None:
    """Every user walks the same cycle of items from its own start: the next item is known."""
    cycle = np.random.default_rng(0).permutation(N_ITEMS)
    n_users = 24
    rng = np.random.default_rng(1)
    starts = rng.integers(0, N_ITEMS, n_users)
    lengths = rng.integers(3, 7, n_users)
    users = np.repeat(np.arange(n_users), lengths)
    steps = np.concatenate([np.arange(n) for n in lengths])
    items = cycle[(np.repeat(starts, lengths) + steps) % N_ITEMS]
    train = Interactions(
        users.astype(np.int32),
        items.astype(np.int32),
        steps.astype(np.int64),
        np.ones(len(users), np.float32),
        n_users,
        N_ITEMS,
    )
    nxt = cycle[(starts + lengths) % N_ITEMS]
    test = Interactions(
        np.arange(n_users, dtype=np.int32),
        nxt.astype(np.int32),
        np.full(n_users, 100, np.int64),
        np.ones(n_users, np.float32),
        n_users,
        N_ITEMS,
    )
    params = {"dim": 16, "max_len": 8, "lr": 0.02, "dropout": 0.0, "loss": loss, "n_negatives": 4}
    model = create_model("sasrec", params, n_users, N_ITEMS, seed=0)
    config = TrainConfig(
        model="sasrec", epochs=40, batch_size=8, device="cpu", progress=False, num_threads=1
    )
    fit(model, train, None, config, tmp_path)
    # the sampled losses never use a user's own items as negatives, so, as in evaluation, the
    # user's items are excluded (the next item is not among them: a history is shorter than
    # the cycle)
    scores = model.score(np.arange(n_users))
    scores[torch.from_numpy(users), torch.from_numpy(items)] = -torch.inf
    np.testing.assert_array_equal(scores.argmax(dim=1).numpy(), nxt)
    assert evaluate_model(model, test, exclude=train, ks=(1,))["hr@1"] == 1.0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"dim": 10, "n_heads": 4}, r"dim \(10\) must be a multiple of n_heads \(4\)"),
        ({"loss": "ce"}, r"loss: got 'ce'; expected one of 'softmax', 'sampled-softmax'"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"max_len": 0}, r"max_len must be > 0, got 0"),
        (
            {"loss": "bce", "log_q": True},
            r"log_q applies to loss 'sampled-softmax' only, not 'bce'",
        ),
        (
            {"loss": "softmax", "batch_negatives": True},
            r"batch_negatives applies to loss 'sampled-softmax' only, not 'softmax'",
        ),
    ],
)
def test_bad_hyper_parameters(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_model("sasrec", params, 4, 4)


def test_which_negatives_the_loader_draws() -> None:
    full = SASRec(SASRecParams(loss="softmax"), 3, 5)
    assert (full.n_negatives, full.shared_negatives, full.full_softmax) == (0, 0, True)
    bpr = SASRec(SASRecParams(loss="bpr", n_negatives=9), 3, 5)
    assert (bpr.n_negatives, bpr.shared_negatives, bpr.full_softmax) == (9, 0, False)
    sampled = SASRec(SASRecParams(loss="sampled-softmax", n_negatives=4), 3, 5)
    assert (sampled.n_negatives, sampled.shared_negatives, sampled.full_softmax) == (0, 4, False)
    # as many draws as items: the exact softmax instead
    exact = SASRec(SASRecParams(loss="sampled-softmax", n_negatives=5), 3, 5)
    assert (exact.n_negatives, exact.shared_negatives, exact.full_softmax) == (0, 0, True)


# two left-padded rows and their next items: what the position-by-position references read
SEQ = torch.tensor([[0, 0, 0, 0, 0, 0, 3, 7], [0, 0, 0, 0, 5, 1, 9, 4]])
POS = torch.tensor([[0, 0, 0, 0, 0, 0, 7, 2], [0, 0, 0, 0, 1, 9, 4, 5]])


def position_by_position(model: SASRec, term: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Mean of ``term(b, j, h, t, p, table)`` over the real positions ``(b, j)`` of ``POS``:
    ``h`` the hidden state, ``t`` the target, ``p`` its score."""
    with torch.no_grad():
        hidden = model.encode(SEQ)
        table = model.item_emb.weight
        terms = []
        for b, j in torch.nonzero(POS).tolist():
            h, t = hidden[b, j], int(POS[b, j])
            terms.append(term(b, j, h, t, h @ table[t], table))
        return torch.stack(terms).mean()


@pytest.mark.parametrize("loss", ["softmax", "sampled-softmax", "bce", "bpr"])
def test_batch_loss_matches_a_position_by_position_computation(loss: str) -> None:
    model = small_model(loss=loss, n_negatives=3)
    batch = {"users": torch.tensor([0, 1]), "seq": SEQ, "pos": POS}
    generator = torch.Generator().manual_seed(3)
    batch["neg"] = (
        torch.randint(1, N_ITEMS + 1, (2, 8, 3), generator=generator) * (SEQ > 0)[..., None]
    )
    # 5 and 9 are targets of the second row: they must not count as their own negatives
    batch["shared_neg"] = torch.tensor([2, 5, 9, 11])
    softplus = torch.nn.functional.softplus

    def term(b: int, j: int, h: torch.Tensor, t: int, p: torch.Tensor, table: torch.Tensor):
        if loss == "softmax":
            logits = table[1:] @ h
            return torch.logsumexp(logits, 0) - logits[t - 1]
        if loss == "sampled-softmax":
            negs = [n for n in batch["shared_neg"].tolist() if n != t]
            return torch.logsumexp(torch.stack([p, *(h @ table[n] for n in negs)]), 0) - p
        n = table[batch["neg"][b, j]] @ h
        return softplus(-p) + softplus(n).mean() if loss == "bce" else softplus(n - p).mean()

    expected = position_by_position(model, term)
    torch.testing.assert_close(model.batch_loss(batch), expected, rtol=1e-5, atol=1e-6)


def test_target_frequencies_count_every_next_item() -> None:
    log, histories = sequences_log(LENGTHS)
    params = {"dim": 8, "max_len": 4, "batch_negatives": True}
    model = create_model("sasrec", params, len(LENGTHS), N_ITEMS)
    model.prepare(log)
    counts = np.zeros(N_ITEMS)
    for history in histories:
        for item in history[1:]:  # a user's first item is never predicted
            counts[item] += 1
    np.testing.assert_allclose(model.target_freq.numpy(), counts / counts.sum())


def test_inclusion_probabilities_match_a_simulation_of_the_draws() -> None:
    log, _ = sequences_log(LENGTHS)
    params = {"dim": 8, "max_len": 4, "n_negatives": 5, "batch_negatives": True, "log_q": True}
    model = create_model("sasrec", params, len(LENGTHS), N_ITEMS)
    model.prepare(log)
    n_targets, trials = 6, 40_000
    rng = np.random.default_rng(0)
    freq = model.target_freq.numpy()
    seen = np.zeros(N_ITEMS)
    for _ in range(trials):
        uniform = rng.integers(0, N_ITEMS, 5)
        targets = rng.choice(N_ITEMS, n_targets, p=freq)
        seen[np.unique(np.concatenate([uniform, targets]))] += 1
    q = torch.exp(model._log_inclusion(torch.arange(1, N_ITEMS + 1), n_targets)).numpy()
    # binomial standard error over 40,000 trials is at most 0.0025
    np.testing.assert_allclose(q, seen / trials, atol=0.01)
    uniform_only = create_model(
        "sasrec", {**params, "batch_negatives": False}, len(LENGTHS), N_ITEMS
    )
    q = torch.exp(uniform_only._log_inclusion(torch.arange(1, N_ITEMS + 1), n_targets))
    torch.testing.assert_close(q, torch.full((N_ITEMS,), 1 - (1 - 1 / N_ITEMS) ** 5))


def test_batch_negatives_with_log_q_match_a_position_by_position_computation() -> None:
    model = small_model(n_negatives=4, batch_negatives=True, log_q=True)
    model.target_freq.copy_(torch.linspace(1, 2, N_ITEMS, dtype=torch.float64) / 18)
    shared = torch.tensor([2, 6, 11])
    batch = {"users": torch.tensor([0, 1]), "seq": SEQ, "pos": POS, "shared_neg": shared}
    targets = POS[POS > 0]
    candidates = sorted(set(shared.tolist()) | set(targets.tolist()))

    def term(b: int, j: int, h: torch.Tensor, t: int, p: torch.Tensor, table: torch.Tensor):
        logits = [p]
        for n in candidates:
            if n != t:
                f = float(model.target_freq[n - 1])
                miss = (1 - 1 / N_ITEMS) ** 4 * (1 - f) ** len(targets)
                logits.append(h @ table[n] - np.log(1 - miss))
        return torch.logsumexp(torch.stack(logits), 0) - p

    expected = position_by_position(model, term)
    torch.testing.assert_close(model.batch_loss(batch), expected, rtol=1e-5, atol=1e-6)
