"""The behaviour every registered model must show, written once (one factory line per model)."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from recscale.config import TrainConfig
from recscale.errors import ConfigError, ModelError
from recscale.evaluate import evaluate_model
from recscale.models import MODELS, Recommender, TorchRecommender, create_model
from recscale.testing import block_log
from recscale.train import fit


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    params: dict[str, Any]
    personalised: bool = True
    epochs: int = 1
    batch_size: int = 32
    # scores are inner products of exported vectors (False: export_embeddings() is None)
    embeddings: bool = True
    # the seed changes the model (False: closed-form, every seed gives the same scores)
    seeded: bool = True


# One line per model: hyper-parameters that learn the 32-user block log in well under a second.
CASES = {
    "popularity": Case("popularity", {}, personalised=False),
    "ials": Case("ials", {"factors": 4, "regularization": 0.1, "alpha": 10.0, "iterations": 15}),
    "ease": Case("ease", {"l2": 1.0}, embeddings=False, seeded=False),
    # no oversampling or power iterations: the seeded random projection decides the basis
    "bspm": Case(
        "bspm", {"factors": 4, "svd_oversample": 0, "svd_iterations": 0}, embeddings=False
    ),
    "itemknn": Case("itemknn", {"k": 10, "shrink": 1.0}, embeddings=False, seeded=False),
    "mf-bpr": Case("mf-bpr", {"dim": 16, "lr": 0.05, "n_negatives": 4}, epochs=60),
    # the options: an item bias (exported as one more dimension) and hardest-of-n negatives
    "mf-bpr-bias-hard": Case(
        "mf-bpr",
        {"dim": 16, "lr": 0.05, "n_negatives": 4, "item_bias": True, "hard_negatives": True},
        epochs=60,
    ),
    # sparse gradients and lazy Adam, the set-up for tables bigger than a batch by far
    "mf-bpr-sparse": Case(
        "mf-bpr",
        {"dim": 16, "lr": 0.05, "n_negatives": 4, "item_bias": True, "sparse": True},
        epochs=60,
    ),
    # the paper's loss (binary cross-entropy, sampled negatives): the block log's rows are in
    # item order (no times), so a block's first item is never a next item; softmax over all
    # items learns exactly that order and is tested on sequences in test_sasrec.py instead
    "sasrec": Case(
        "sasrec",
        {"dim": 16, "max_len": 8, "lr": 0.02, "dropout": 0.1, "loss": "bce", "n_negatives": 4},
        epochs=40,
    ),
    # the shared cosine losses on plain MF (MF-CCL is SimpleX's recipe)
    "mf-ccl": Case(
        "mf-bpr",
        {
            "dim": 16,
            "lr": 0.05,
            "n_negatives": 8,
            "loss": "ccl",
            "negative_weight": 4.0,
            "hard_negatives": False,
            "item_bias": False,
        },
        epochs=40,
    ),
    "mf-softmax": Case(
        "mf-bpr",
        {
            "dim": 16,
            "lr": 0.05,
            "n_negatives": 8,
            "loss": "softmax",
            "temperature": 0.2,
            "hard_negatives": False,
            "item_bias": False,
        },
        epochs=40,
    ),
    "lightgcn": Case("lightgcn", {"dim": 16, "lr": 0.05, "n_negatives": 4}, epochs=60),
    # the cosine losses, with negatives shared by the batch
    "lightgcn-softmax": Case(
        "lightgcn",
        {"dim": 16, "lr": 0.05, "loss": "softmax", "temperature": 0.2, "shared_negatives": 16},
        epochs=40,
    ),
    "lightgcn-ccl": Case(
        "lightgcn",
        {"dim": 16, "lr": 0.05, "loss": "ccl", "n_negatives": 8, "negative_weight": 4.0},
        epochs=40,
    ),
    # no items table here: the towers run on ids and the last 4 items of each user's history
    "two-tower": Case(
        "two-tower", {"dim": 16, "hidden": 32, "lr": 0.02, "history_len": 4}, epochs=20
    ),
    # in-batch and uniform negatives in one softmax, log-Q corrected for their mixture
    "two-tower-mixed": Case(
        "two-tower",
        {"dim": 16, "hidden": 32, "lr": 0.02, "history_len": 4, "loss": "mixed", "n_negatives": 4},
        epochs=20,
    ),
}

PARTS = block_log()


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads() -> Iterator[None]:
    """Training with num_threads=1 sets torch's global thread count; other modules get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_every_registered_model_has_a_case() -> None:
    assert {case.name for case in CASES.values()} == set(MODELS)


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


@pytest.fixture(scope="module")
def train_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Recommender]:
    """Train a case through the real loop; trained models are shared by the tests (read-only)."""
    cache: dict[tuple[str, int], Recommender] = {}

    def make(case: Case, *, seed: int = 0, fresh: bool = False) -> Recommender:
        key = (repr(case), seed)
        if not fresh and key in cache:
            return cache[key]
        train = PARTS["train"]
        model = create_model(case.name, case.params, train.n_users, train.n_items, seed=seed)
        config = TrainConfig(
            model=case.name,
            epochs=case.epochs,
            batch_size=case.batch_size,
            seed=seed,
            device="cpu",
            progress=False,
            num_threads=1,  # tiny tensors: thread start-up would cost more than the work
        )
        fit(model, train, None, config, tmp_path_factory.mktemp(case.name))
        if not fresh:
            cache[key] = model
        return model

    return make


def _masked_scores(model: Recommender) -> torch.Tensor:
    train = PARTS["train"]
    scores = model.score(np.arange(train.n_users)).clone()
    scores[
        torch.from_numpy(train.user_idx).long(), torch.from_numpy(train.item_idx).long()
    ] = -torch.inf
    return scores


def test_recommends_the_held_out_item(case: Case, train_model: Callable[..., Recommender]) -> None:
    model = train_model(case)
    train, test = PARTS["train"], PARTS["test"]
    scores = _masked_scores(model)
    top1 = scores.argmax(dim=1).numpy()
    if case.personalised:
        # each user's held-out item is the only unseen item of its block: ranked first
        np.testing.assert_array_equal(top1[test.user_idx], test.item_idx)
        metrics = evaluate_model(model, test, exclude=train, ks=(1,))
        assert metrics["recall@1"] == 1.0
        assert metrics["ndcg@1"] == 1.0
    else:
        counts = np.bincount(train.item_idx, minlength=train.n_items).astype(np.float32)
        np.testing.assert_array_equal(model.score(np.array([0, 5]))[1].numpy(), counts)


def test_scores_shape_and_dtype(case: Case, train_model: Callable[..., Recommender]) -> None:
    model = train_model(case)
    users = np.array([3, 0, 3, 31])
    scores = model.score(users)
    assert scores.shape == (4, PARTS["train"].n_items)
    assert scores.dtype == torch.float32
    full = model.score(np.arange(PARTS["train"].n_users))
    assert torch.equal(scores, full[torch.from_numpy(users)])
    assert model.score(np.array([], dtype=np.int64)).shape == (0, PARTS["train"].n_items)


def test_training_items_can_be_excluded(
    case: Case, train_model: Callable[..., Recommender]
) -> None:
    model = train_model(case)
    train = PARTS["train"]
    top = torch.topk(_masked_scores(model), 2, dim=1).indices.numpy()
    seen = set(zip(train.user_idx.tolist(), train.item_idx.tolist(), strict=True))
    recommended = {(u, int(i)) for u in range(train.n_users) for i in top[u]}
    assert not recommended & seen


def test_state_dict_round_trip(case: Case, train_model: Callable[..., Recommender]) -> None:
    model = train_model(case)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = create_model(case.name, case.params, model.n_users, model.n_items, seed=99)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    users = np.arange(model.n_users)
    assert torch.equal(fresh.score(users), model.score(users))


def test_same_seed_same_scores(case: Case, train_model: Callable[..., Recommender]) -> None:
    users = np.arange(PARTS["train"].n_users)
    a = train_model(case, seed=3, fresh=True).score(users)
    b = train_model(case, seed=3, fresh=True).score(users)
    assert torch.equal(a, b)
    if not case.seeded:  # closed form: the seed plays no part
        assert torch.equal(a, train_model(case, seed=4, fresh=True).score(users))
    elif case.personalised:  # a different seed starts elsewhere
        assert not torch.equal(a, train_model(case, seed=4, fresh=True).score(users))


def test_embeddings_reproduce_the_scores(
    case: Case, train_model: Callable[..., Recommender]
) -> None:
    model = train_model(case)
    vectors = model.export_embeddings()
    if not case.embeddings:  # not an inner-product model: nothing to serve by vector search
        assert vectors is None
        return
    assert vectors is not None
    users, items = vectors
    assert users.dtype == items.dtype == np.float32
    assert users.shape[0] == model.n_users and items.shape[0] == model.n_items
    np.testing.assert_allclose(
        users @ items.T, model.score(np.arange(model.n_users)).numpy(), rtol=1e-5, atol=1e-5
    )


def test_unknown_hyper_parameter_is_a_config_error(case: Case) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'no_such_param'; allowed keys are"):
        create_model(case.name, {**case.params, "no_such_param": 1}, 4, 4)


@pytest.mark.parametrize("name", sorted(n for n in MODELS if dataclasses.fields(MODELS[n].Params)))
def test_wrong_typed_hyper_parameter_is_a_config_error(name: str) -> None:
    fields = dataclasses.fields(MODELS[name].Params)
    with pytest.raises(ConfigError, match=rf"{fields[0].name}: got 'many'"):
        create_model(name, {fields[0].name: "many"}, 4, 4)


def test_out_of_range_user_is_a_model_error(case: Case) -> None:
    model = create_model(case.name, case.params, 4, 6)
    with pytest.raises(ModelError, match=r"user index 4 is out of range: expected 0\.\.3"):
        model.score(np.array([0, 4]))


def test_fit_on_other_sizes_is_a_model_error(case: Case) -> None:
    model = create_model(case.name, case.params, 5, 6)
    if isinstance(model, TorchRecommender):
        with pytest.raises(ModelError, match="trained epoch by epoch"):
            model.fit(PARTS["train"])
    else:
        with pytest.raises(ModelError, match=r"built for 5 users × 6 items"):
            model.fit(PARTS["train"])


def test_unknown_model_lists_the_known_ones() -> None:
    known = ", ".join(sorted(MODELS))  # every name, in alphabetical order
    with pytest.raises(ModelError, match=rf"^unknown model 'nope'; known models are: {known}$"):
        create_model("nope", {}, 4, 4)
