"""Vector indexes: exports to FAISS and Milvus Lite, consistency with the evaluator, ANN recall."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recscale.cli import main
from recscale.config import TrainConfig
from recscale.errors import ConfigError, RunError
from recscale.evaluate import top_k
from recscale.index import export_index, faiss_store, milvus_store, open_index, read_embeddings
from recscale.testing import interactions, write_tiny_dataset
from recscale.train import Run, train

N_USERS, N_ITEMS, K = 300, 500, 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(7)

    def part(n: int):
        return interactions(
            rng.integers(0, N_USERS, n), rng.integers(0, N_ITEMS, n), N_USERS, N_ITEMS
        )

    return write_tiny_dataset(
        tmp_path_factory.mktemp("data") / "random",
        {"train": part(6000), "valid": part(300), "test": part(300)},
    )


def _train(dataset: Path, run_dir: Path, model: str, params: dict) -> Path:
    config = TrainConfig(
        model=model,
        split="given",
        epochs=2,
        batch_size=512,
        device="cpu",
        progress=False,
        num_threads=1,
    )
    train(dataset, config, params, run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def bpr_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(dataset, tmp_path_factory.mktemp("runs") / "bpr", "mf-bpr", {"dim": 16})


@pytest.fixture(scope="module")
def cosine_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    params = {"dim": 16, "n_layers": 1, "loss": "softmax", "n_negatives": 8}
    return _train(dataset, tmp_path_factory.mktemp("runs") / "lightgcn", "lightgcn", params)


def _evaluator_top(run_dir: Path, users: np.ndarray, k: int) -> np.ndarray:
    """The evaluator's ranking: model scores, train and valid items excluded, then top_k."""
    scores = Run.open(run_dir).model.score(users).float().cpu()
    for row, seen in enumerate(_seen(run_dir, users)):
        scores[row, seen] = -torch.inf
    return top_k(scores, k)[1].numpy()


def _seen(run_dir: Path, users: np.ndarray) -> list[np.ndarray]:
    """Each user's train and valid items, read from the split's parts."""
    split = Run.open(run_dir).split
    parts = [split.interactions(part) for part in ("train", "valid")]
    return [np.unique(np.concatenate([p.item_idx[p.user_idx == u] for p in parts])) for u in users]


USERS = np.arange(0, N_USERS, 5)


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_exact_search_ranks_as_the_evaluator(bpr_run: Path, tmp_path: Path, backend: str) -> None:
    target = tmp_path / ("items.db" if backend == "milvus" else "items.faiss")
    with export_index(bpr_run, target) as index:
        assert (index.info.backend, index.info.kind, index.info.similarity) == (
            backend,
            "flat",
            "dot",
        )
        assert (index.info.n_users, index.info.n_items) == (N_USERS, N_ITEMS)
        scores, items = index.search(index.user_vectors(USERS), K, _seen(bpr_run, USERS))
    expected = _evaluator_top(bpr_run, USERS, K)
    np.testing.assert_array_equal(items, expected)
    # the index's scores are the model's own
    model_scores = Run.open(bpr_run).model.score(USERS).float().numpy()
    np.testing.assert_allclose(
        scores, np.take_along_axis(model_scores, expected, axis=1), rtol=1e-5, atol=1e-6
    )


def test_a_cosine_model_is_searched_by_cosine(cosine_run: Path, tmp_path: Path) -> None:
    embeddings = read_embeddings(cosine_run)
    assert embeddings.similarity == "cosine"
    np.testing.assert_allclose(np.linalg.norm(embeddings.items, axis=1), 1.0, rtol=1e-5)
    expected = _evaluator_top(cosine_run, USERS, K)
    for target in (tmp_path / "c.db", tmp_path / "c.faiss"):
        with export_index(cosine_run, target) as index:
            assert index.info.similarity == "cosine"
            _, items = index.search(index.user_vectors(USERS), K, _seen(cosine_run, USERS))
        np.testing.assert_array_equal(items, expected)
    described = milvus_store._client(str(tmp_path / "c.db"), None)
    try:
        index_info = described.describe_index("recscale_items", "vector")
        assert index_info["metric_type"] == "COSINE"
    finally:
        described.close()


@pytest.mark.parametrize(
    ("backend", "kind", "params"),
    [
        ("faiss", "hnsw", {"m": 16, "ef_search": 64}),
        ("faiss", "ivf", {"nlist": 16, "nprobe": 8}),
        ("milvus", "hnsw", {"m": 16, "ef_search": 64}),
        # Milvus Lite clusters into 128 lists whatever nlist says; a server honours it
        ("milvus", "ivf", {"nlist": 128, "nprobe": 64}),
    ],
)
def test_approximate_indexes_find_most_of_the_exact_top_k(
    bpr_run: Path, tmp_path: Path, backend: str, kind: str, params: dict
) -> None:
    target = tmp_path / ("ann.db" if backend == "milvus" else "ann.faiss")
    users = np.arange(N_USERS)
    with export_index(bpr_run, tmp_path / "exact.faiss") as exact:
        queries = exact.user_vectors(users)
        _, truth = exact.search(queries, K)
    with export_index(bpr_run, target, kind=kind, params=params) as index:
        assert index.info.kind == kind and not index.info.exact
        assert {k: index.info.params[k] for k in params} == params
        scores, found = index.search(queries, K)
        # whatever the index computes inside, the scores it returns are the inner products
        vectors = index.item_vectors(found.reshape(-1)).reshape(len(users), K, -1)
        np.testing.assert_allclose(
            scores, np.einsum("ud,ukd->uk", queries, vectors), rtol=1e-4, atol=1e-4
        )
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth, strict=True)])
    assert recall >= 0.9, recall


def test_vectors_round_trip_and_reopen(bpr_run: Path, tmp_path: Path) -> None:
    embeddings = read_embeddings(bpr_run)
    for target in (tmp_path / "r.faiss", tmp_path / "r.db"):
        export_index(bpr_run, target).close()
        with open_index(target) as index:
            np.testing.assert_array_equal(
                index.item_vectors([4, 2, 4]), embeddings.items[[4, 2, 4]]
            )
            np.testing.assert_array_equal(index.user_vectors([7]), embeddings.users[[7]])
            assert index.info.version == embeddings.version
            assert index.info.run == str(bpr_run.resolve())


def test_exclusions_are_filtered_inside_the_search(bpr_run: Path, tmp_path: Path) -> None:
    with export_index(bpr_run, tmp_path / "x.faiss") as faiss_index:
        query = faiss_index.user_vectors([3])
        _, plain = faiss_index.search(query, K + 3)
        _, filtered = faiss_index.search(query, K, [plain[0, :3]])
        np.testing.assert_array_equal(filtered[0], plain[0, 3:])
        # more than the items left: padded with -1 and -inf
        scores, items = faiss_index.search(query, N_ITEMS, [np.arange(N_ITEMS - 2)])
        assert sorted(items[0, :2]) == [N_ITEMS - 2, N_ITEMS - 1]
        assert (items[0, 2:] == -1).all() and np.isneginf(scores[0, 2:]).all()
    with export_index(bpr_run, tmp_path / "x.db") as milvus_index:
        _, filtered_m = milvus_index.search(query, K, [plain[0, :3]])
        np.testing.assert_array_equal(filtered_m[0], plain[0, 3:])


def test_a_failed_faiss_export_keeps_the_old_index(
    bpr_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "keep.faiss"
    export_index(bpr_run, target).close()
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(faiss_store.np, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        export_index(bpr_run, target, kind="hnsw")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.faiss"]  # no temporary left behind


def test_a_failed_milvus_export_keeps_the_old_index(
    bpr_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "keep.db"
    export_index(bpr_run, target).close()
    real_insert = milvus_store._insert

    def insert_then_fail(client: object, name: str, vectors: np.ndarray) -> None:
        real_insert(client, name, vectors)
        if "_users_" in name:
            raise ConnectionError("Milvus went away")

    monkeypatch.setattr(milvus_store, "_insert", insert_then_fail)
    with pytest.raises(ConnectionError):
        export_index(bpr_run, target, kind="ivf", params={"nlist": 8})
    monkeypatch.undo()
    with open_index(target) as index:
        assert index.info.kind == "flat"  # the old export still answers
        assert index.search(index.user_vectors([0]), K)[1].shape == (1, K)
        names = index._client.list_collections()
    assert len(names) == 2, names  # the half-written collections were dropped


def test_re_export_replaces_the_milvus_collections(bpr_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "twice.db"
    export_index(bpr_run, target).close()
    with export_index(bpr_run, target, kind="hnsw") as index:
        assert index.info.kind == "hnsw"
        names = index._client.list_collections()
    assert len(names) == 2 and all(n.startswith("recscale_") for n in names)


def test_bad_requests_name_what_is_wrong(bpr_run: Path, dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="index kind must be one of flat, hnsw, ivf; got 'lsh'"):
        export_index(bpr_run, tmp_path / "a.faiss", kind="lsh")
    with pytest.raises(ConfigError, match="has no parameter 'nprobe'"):
        export_index(bpr_run, tmp_path / "a.faiss", kind="hnsw", params={"nprobe": 4})
    with pytest.raises(ConfigError, match="m must be an integer >= 1, got 0"):
        export_index(bpr_run, tmp_path / "a.faiss", kind="hnsw", params={"m": 0})
    with pytest.raises(ConfigError, match="nlist=9999 is more than the 500 items"):
        export_index(bpr_run, tmp_path / "a.faiss", kind="ivf", params={"nlist": 9999})
    config = TrainConfig(model="ease", split="given", epochs=1, progress=False, device="cpu")
    ease = train(dataset, config, None, run_dir=tmp_path / "ease")
    assert ease is not None
    with pytest.raises(RunError, match="has no embeddings"):
        export_index(tmp_path / "ease", tmp_path / "a.faiss")
    with pytest.raises(ConfigError, match="is not a FAISS index directory"):
        open_index(tmp_path)
    with export_index(bpr_run, tmp_path / "ok.faiss") as index:
        with pytest.raises(ConfigError, match=r"queries must be \(n, 17\) vectors"):
            index.search(np.zeros((1, 3)), K)
        with pytest.raises(ConfigError, match=r"user index 300 is out of range 0\.\.299"):
            index.user_vectors([300])
        with pytest.raises(ConfigError, match="k must be an integer >= 1, got 0"):
            index.search(index.user_vectors([0]), 0)
    assert not (tmp_path / "a.faiss").exists()


def test_cli_export(bpr_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "cli.faiss"
    assert main(["export", "--run", str(bpr_run), "--index", str(target), "--kind", "ivf",
                 "--param", "nlist=8", "--param", "nprobe=8"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "wrote faiss ivf index (nlist=8, nprobe=8) of 500 items and 300 users" in out
    with open_index(target) as index:
        assert index.info.params == {"nlist": 8, "nprobe": 8}
    assert main(["export", "--run", str(bpr_run), "--index", str(target), "--param", "m"]) == 2
    assert "expected NAME=INTEGER" in capsys.readouterr().err
