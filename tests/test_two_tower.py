"""Two-tower: features built from the item table, the log-Q corrected losses, what genres learn,
and the title embeddings."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest
import torch

from recscale.config import TrainConfig
from recscale.dataset import Interactions
from recscale.errors import ConfigError, ModelError
from recscale.features import TEXT_DIM, embed_texts
from recscale.models import TwoTower, create_model
from recscale.models.two_tower import genre_matrix, item_log_q
from recscale.testing import interactions
from recscale.train import fit

# five items whose rows are not in item_idx order: features must be placed by the column
ITEMS = pa.table(
    {
        "item_idx": pa.array([2, 0, 4, 1, 3], pa.int32()),
        "item_id": ["c", "a", "e", "b", "d"],
        "title": ["Heat (1995)", "Toy Story (1995)", None, "Jumanji (1995)", "Casino (1995)"],
        "genres": [["Crime", "Drama"], ["Animation", "Comedy"], [], ["Comedy"], None],
    }
)
# item 0 three times, item 1 twice, items 2 and 3 once, item 4 never
TRAIN = interactions([0, 0, 1, 1, 2, 2, 3], [0, 1, 0, 2, 0, 1, 3], 4, 5)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster, and the global setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(**params: object) -> TwoTower:
    model = create_model("two-tower", {"dim": 8, "hidden": 16, **params}, 4, 5, seed=1)
    assert isinstance(model, TwoTower)
    return model


# ----------------------------------------------------------------- features


def test_genre_matrix_is_placed_by_item_idx() -> None:
    index, vocabulary = genre_matrix(ITEMS, 5)
    assert vocabulary == ["Animation", "Comedy", "Crime", "Drama"]
    # ids are 1 + the position in the vocabulary; 0 pads; no genres (or null) is all padding
    expected = np.array([[1, 2], [2, 0], [3, 4], [0, 0], [0, 0]])
    np.testing.assert_array_equal(index, expected)


def test_log_q_is_the_log_share_of_training_rows() -> None:
    counts = np.array([3, 2, 1, 1, 0])
    expected = np.log(np.maximum(counts, 1) / 7)  # an item without rows counts as one row
    np.testing.assert_allclose(item_log_q(TRAIN), expected, rtol=1e-6)


def test_prepare_builds_every_feature_buffer() -> None:
    model = _model(text=True)
    model.prepare(TRAIN, ITEMS)
    np.testing.assert_array_equal(model.item_genres.numpy(), genre_matrix(ITEMS, 5)[0])
    assert model.genre_emb.shape == (5, 8)  # padding + 4 genres
    assert torch.equal(model.genre_emb[0], torch.zeros(8))
    text = model.item_text.numpy()
    assert text.shape == (5, TEXT_DIM)
    titles = {0: "Toy Story (1995)", 1: "Jumanji (1995)", 2: "Heat (1995)", 3: "Casino (1995)"}
    for item, title in titles.items():
        np.testing.assert_allclose(text[item], embed_texts([title])[0], atol=1e-5)
    np.testing.assert_array_equal(text[4], np.zeros(TEXT_DIM))  # no title
    np.testing.assert_allclose(model.item_log_q.numpy(), item_log_q(TRAIN))
    # each user's items, oldest first (no times: the order of the rows), ids shifted by one
    np.testing.assert_array_equal(model.history[:, -2:].numpy(), [[1, 2], [1, 3], [1, 2], [0, 4]])


def test_without_an_items_table_the_towers_use_ids() -> None:
    model = _model(text=True)
    model.prepare(TRAIN, None)
    assert model.item_genres.shape == (5, 0) and model.item_text.shape == (0, TEXT_DIM)
    assert model.score(np.arange(4)).shape == (4, 5)


def test_items_table_of_another_dataset_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"item_idx values outside 0\.\.3"):
        model = create_model("two-tower", {"dim": 8}, 4, 4)
        model.prepare(interactions([0], [0], 4, 4), ITEMS)


def test_bad_hyper_parameters_are_config_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"\(two-tower\): loss: got 'bpr'; expected one of 'in-batch'"
    ):
        _model(loss="bpr")
    with pytest.raises(ConfigError, match=r"two-tower: temperature must be > 0, got 0"):
        _model(temperature=0)


def test_state_dict_round_trip_keeps_the_features() -> None:
    model = _model(text=True)
    model.prepare(TRAIN, ITEMS)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _model(text=True)  # never prepared: the sized tables come from the state
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.score(np.arange(4)), model.score(np.arange(4)))
    users, items = fresh.export_embeddings()
    np.testing.assert_allclose(users @ items.T, model.score(np.arange(4)).numpy(), atol=1e-5)


def test_observe_changes_the_history_that_scores_read() -> None:
    model = _model()
    model.prepare(TRAIN, ITEMS)
    before = model.score(np.arange(4))
    # train and then one more item for user 3: only user 3's history and scores change
    model.observe(Interactions.concat(TRAIN, interactions([3], [4], 4, 5)))
    np.testing.assert_array_equal(model.history[3, -2:].numpy(), [4, 5])
    after = model.score(np.arange(4))
    assert torch.equal(after[:3], before[:3])
    assert not torch.equal(after[3], before[3])


def test_user_tower_reads_the_mean_of_the_history() -> None:
    model = _model()
    model.prepare(TRAIN, ITEMS)  # user 0 has seen items 0 and 1, user 3 item 3
    emb = model.item_emb.detach()
    with torch.no_grad():
        users = torch.tensor([0, 0, 3])
        got = model.user_vectors(users, exclude=torch.tensor([2, 1, 3]))
        inputs = model.user_emb[users] + torch.stack(
            [(emb[0] + emb[1]) / 2, emb[0], torch.zeros(8)]  # the left-out item is not counted
        )
        torch.testing.assert_close(got, model.user_tower(inputs))


# ----------------------------------------------------------------- losses


def _softmax_loss(logits: np.ndarray, target: np.ndarray) -> float:
    """Mean cross-entropy, in float64, with -inf logits allowed."""
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(lse - logits[np.arange(len(logits)), target]))


BATCH = {
    "users": torch.tensor([0, 1, 2, 3, 0]),
    "pos": torch.tensor([0, 2, 1, 3, 0]),  # item 0 twice: not a negative of its own rows
    "neg": torch.tensor([[4, 2], [3, 4], [0, 4], [1, 2], [4, 3]]),
}


def _towers(model: TwoTower) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with torch.no_grad():
        exclude = BATCH["pos"] if model.params.leave_out_positive else None
        u = model.user_vectors(BATCH["users"], exclude=exclude).double().numpy()
        v = model.item_vectors(BATCH["pos"]).double().numpy()
        w = model.item_vectors(BATCH["neg"].reshape(-1)).double().numpy()
    return u, v, w


@pytest.mark.parametrize(("weight", "leave_out"), [(0.0, False), (1.0, True), (1.5, False)])
def test_in_batch_loss_with_log_q(weight: float, leave_out: bool) -> None:
    model = _model(log_q_weight=weight, temperature=0.5, leave_out_positive=leave_out)
    model.prepare(TRAIN, ITEMS)
    u, v, _ = _towers(model)
    pos = BATCH["pos"].numpy()
    logits = u @ v.T / 0.5 - weight * np.log(np.array([3, 2, 1, 1, 1]) / 7)[pos][None, :]
    duplicate = (pos[:, None] == pos[None, :]) & ~np.eye(len(pos), dtype=bool)
    logits[duplicate] = -np.inf
    expected = _softmax_loss(logits, np.arange(len(pos)))
    assert model.batch_loss(BATCH).item() == pytest.approx(expected, rel=1e-5)


def test_log_q_changes_the_in_batch_loss() -> None:
    losses = []
    for weight in (0.0, 1.0):
        model = _model(log_q_weight=weight)
        model.prepare(TRAIN, ITEMS)
        losses.append(model.batch_loss(BATCH).item())
    assert abs(losses[0] - losses[1]) > 1e-3


def test_sampled_and_mixed_losses() -> None:
    pos, neg = BATCH["pos"].numpy(), BATCH["neg"].numpy().reshape(-1)
    log_p = np.log(np.array([3, 2, 1, 1, 1]) / 7)
    for loss in ("sampled", "mixed"):
        model = _model(loss=loss, n_negatives=2, temperature=0.5, log_q_weight=0.5)
        model.prepare(TRAIN, ITEMS)
        u, v, w = _towers(model)
        positive = np.sum(u * v, axis=1)
        uniform = u @ w.T
        uniform[pos[:, None] == neg[None, :]] = -np.inf  # a row's positive is no negative
        if loss == "sampled":  # uniform negatives: log Q is a constant, left out
            logits = np.hstack([positive[:, None], uniform]) / 0.5
        else:
            # one softmax over the in-batch and the uniform candidates, each corrected by the
            # mixture of the two samplers, B · p(i) + M / n_items with B = 5 rows, M = 10 draws
            log_q = 0.5 * np.log(5 * np.exp(log_p) + 10 / 5)  # log_q_weight 0.5
            in_batch = u @ v.T
            in_batch[pos[:, None] == pos[None, :]] = -np.inf  # itself and its duplicates
            rest = np.hstack([in_batch, uniform]) / 0.5 - np.concatenate([log_q[pos], log_q[neg]])
            logits = np.hstack([(positive / 0.5 - log_q[pos])[:, None], rest])
        expected = _softmax_loss(logits, np.zeros(5, dtype=np.int64))
        assert model.batch_loss(BATCH).item() == pytest.approx(expected, rel=1e-5), loss


# ----------------------------------------------------------------- what genres learn


def _genre_log() -> tuple[object, pa.Table]:
    """8 users like the 6 warm items of genre A, 8 those of genre B; 4 cold items, 2 of each.

    Items 0-5 are A, 6-11 B (warm); 12, 13 are A and 14, 15 B, with no interaction at all, so
    only their genre tells them apart.
    """
    users, items = [], []
    for u in range(16):
        first = 0 if u < 8 else 6
        for i in range(first, first + 6):
            if (u + i) % 3:  # each user misses two of its genre's items
                users.append(u)
                items.append(i)
    genres = [["A"]] * 6 + [["B"]] * 6 + [["A"], ["A"], ["B"], ["B"]]
    table = pa.table({"item_idx": pa.array(range(16), pa.int32()), "genres": genres})
    return interactions(users, items, 16, 16), table


def _cold_items_follow_the_genre(genres: bool, tmp_path: object) -> bool:
    train, table = _genre_log()
    model = create_model(
        "two-tower",
        {"dim": 8, "hidden": 16, "lr": 0.02, "genres": genres, "history_len": 0},
        16,
        16,
        seed=0,
    )
    config = TrainConfig(
        model="two-tower", epochs=30, batch_size=16, device="cpu", progress=False, seed=0
    )
    fit(model, train, None, config, tmp_path, items=table)
    scores = model.score(np.arange(16)).numpy()
    liked, other = scores[:8, 12:14], scores[:8, 14:16]
    b_liked, b_other = scores[8:, 14:16], scores[8:, 12:14]
    return bool(
        (liked.min(axis=1) > other.max(axis=1)).all()
        and (b_liked.min(axis=1) > b_other.max(axis=1)).all()
    )


def test_cold_items_of_a_liked_genre_rank_above_the_others(tmp_path_factory) -> None:
    assert _cold_items_follow_the_genre(True, tmp_path_factory.mktemp("genres"))
    # the control: without genres the cold items are four random vectors
    assert not _cold_items_follow_the_genre(False, tmp_path_factory.mktemp("ids"))


# ----------------------------------------------------------------- text embeddings


def test_embed_texts_shape_norm_and_paraphrases() -> None:
    texts = [
        "A man is playing a guitar on stage.",
        "Someone performs music with a guitar at a concert.",
        "The central bank raised interest rates again.",
    ]
    vectors = embed_texts(texts)
    assert vectors.shape == (3, TEXT_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    paraphrase, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert paraphrase > unrelated + 0.3
    # a text's vector does not depend on the rest of the list
    np.testing.assert_allclose(embed_texts(texts[2:])[0], vectors[2], atol=1e-5)
    assert embed_texts([]).shape == (0, TEXT_DIM)
