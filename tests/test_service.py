"""The HTTP service, over a real uvicorn server on a loopback port, called with httpx."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from recscale.config import TrainConfig
from recscale.dataset import open_dataset
from recscale.errors import ConfigError
from recscale.index import export_index, read_embeddings
from recscale.service import ServedModel, ServiceSettings, create_app, fold_in
from recscale.testing import block_log, serve_in_thread, write_tiny_dataset
from recscale.train import Run, train

KEY = "test-key-0123456789"
AUTH = {"X-API-Key": KEY}


def _train(dataset: Path, run_dir: Path, model: str, params: dict, epochs: int = 1) -> Path:
    config = TrainConfig(
        model=model,
        split="given",
        epochs=epochs,
        batch_size=48,
        device="cpu",
        progress=False,
        num_threads=1,
        validate_k=5,
    )
    train(dataset, config, params, run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 32-user block log (4 blocks of 6 items); item ``i<n>`` is titled ``Item <n>``."""
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "blocks", block_log(valid=True))


@pytest.fixture(scope="module")
def ials_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    params = {"factors": 4, "regularization": 0.1, "alpha": 10.0}
    return _train(dataset, tmp_path_factory.mktemp("runs") / "ials", "ials", params)


@pytest.fixture(scope="module")
def bpr_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    params = {"dim": 8, "lr": 0.05, "n_negatives": 2}
    return _train(dataset, tmp_path_factory.mktemp("runs") / "bpr", "mf-bpr", params, epochs=3)


@pytest.fixture(scope="module")
def base_url(ials_run: Path) -> Iterator[str]:
    settings = ServiceSettings(run=str(ials_run), api_key=KEY, max_k=20, max_history=8)
    with serve_in_thread(create_app(settings)) as url:
        _wait_ready(url)
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def _wait_ready(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/readyz")
        if response.status_code == 200:
            return response.json()
        time.sleep(0.05)
    raise AssertionError(f"not ready: {response.json()}")


# ---- answers


def test_user_recommendations_are_the_runs_own(client: httpx.Client, ials_run: Path) -> None:
    body = client.get("/v1/users/u9/recommendations", params={"k": 5}, headers=AUTH).json()
    expected = Run.open(ials_run).recommend("u9", k=5)
    # the same ranking: the same scores (items past the first tie at about 0, so ids may swap)
    np.testing.assert_allclose(
        [item["score"] for item in body["items"]], [r["score"] for r in expected], atol=1e-6
    )
    assert body["items"][0] == {
        "id": "i9",
        "score": pytest.approx(expected[0]["score"], rel=1e-5),
        "title": "Item 9",
    }
    assert body["user"] == "u9" and body["fallback"] is None
    assert body["model"] == f"ials:{read_embeddings(ials_run).version}"
    # seen items are excluded unless asked for
    seen = {"i6", "i7", "i8", "i10", "i11"}
    assert not seen & {item["id"] for item in body["items"]}
    everything = client.get(
        "/v1/users/u9/recommendations", params={"k": 6, "exclude_seen": "false"}, headers=AUTH
    ).json()
    assert {item["id"] for item in everything["items"]} == seen | {"i9"}


def test_an_unknown_user_gets_popular_items_flagged(client: httpx.Client, dataset: Path) -> None:
    body = client.get("/v1/users/nobody/recommendations?k=3", headers=AUTH).json()
    assert body["fallback"] == "popular"
    # the counts, independently: the train part of the split
    counts = np.bincount(
        open_dataset(dataset).split("given").interactions("train").item_idx, minlength=24
    )
    order = np.argsort(-counts, kind="stable")[:3]
    assert [item["id"] for item in body["items"]] == [f"i{i}" for i in order]
    assert [item["score"] for item in body["items"]] == counts[order].tolist()


def test_a_history_is_folded_in(client: httpx.Client) -> None:
    # u9's block (items 6..11) without the held-out 9: the one block item left is 9
    body = client.post(
        "/v1/recommendations",
        json={"history": ["i6", "i7", "i8", "i10", "i11"], "k": 3},
        headers=AUTH,
    ).json()
    assert body["items"][0]["id"] == "i9"
    # ids may be numbers; unknown ones are reported, and the rest of the block comes first
    body = client.post(
        "/v1/recommendations",
        json={"history": ["i6", "i7", 8, "i10", "i11", "nope"], "k": 3},
        headers=AUTH,
    ).json()
    assert {item["id"] for item in body["items"][:2]} == {"i8", "i9"}
    assert body["unknown_items"] == ["8", "nope"]
    assert body["user"] is None and body["fallback"] is None
    nothing_known = client.post(
        "/v1/recommendations", json={"history": ["x"], "k": 2}, headers=AUTH
    ).json()
    assert nothing_known["fallback"] == "popular" and nothing_known["unknown_items"] == ["x"]


def test_fold_in_solves_the_weighted_least_squares() -> None:
    rng = np.random.default_rng(0)
    items = rng.normal(size=(40, 5))
    history = [3, 17, 21]
    alpha, reg = 7.0, 0.5
    u = fold_in(items.T @ items, items[history], alpha=alpha, regularization=reg)
    # independently: sqrt(confidence)-weighted rows, plus the ridge rows
    weights = np.ones(40)
    weights[history] = 1 + alpha
    target = np.zeros(40)
    target[history] = 1.0
    a = np.vstack([items * np.sqrt(weights)[:, None], np.sqrt(reg) * np.eye(5)])
    b = np.concatenate([target * np.sqrt(weights), np.zeros(5)])
    np.testing.assert_allclose(u, np.linalg.lstsq(a, b, rcond=None)[0], rtol=1e-4, atol=1e-5)


def test_similar_items(client: httpx.Client, ials_run: Path) -> None:
    body = client.get("/v1/items/i9/similar?k=4", headers=AUTH).json()
    items = read_embeddings(ials_run).items
    expected = np.delete(items @ items[9], 9)  # every other item's inner product with i9
    returned = [int(item["id"][1:]) for item in body["items"]]
    scores = [item["score"] for item in body["items"]]
    # the scores are the inner products, best first, and they are the 4 best (up to float ties)
    np.testing.assert_allclose(scores, (items @ items[9])[returned], rtol=1e-5)
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(scores, np.sort(expected)[::-1][:4], rtol=1e-5)
    assert body["item"] == "i9" and "i9" not in {item["id"] for item in body["items"]}
    missing = client.get("/v1/items/nope/similar", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json() == {"detail": "unknown item id 'nope'"}


def test_users_and_history_for_the_page(client: httpx.Client) -> None:
    users = client.get("/v1/users?limit=3", headers=AUTH).json()["users"]
    assert len(users) == 3 and all(u.startswith("u") for u in users)
    history = client.get("/v1/users/u9/history", headers=AUTH).json()
    # train (6, 7, 8, 11) and valid (10) items; the test item 9 is not shown
    assert sorted(item["id"] for item in history["items"]) == ["i10", "i11", "i6", "i7", "i8"]
    assert history["total"] == 5
    assert client.get("/v1/users/nobody/history", headers=AUTH).status_code == 404


# ---- security and validation


def test_the_api_key_is_required(client: httpx.Client) -> None:
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY + "x"}):
        response = client.get("/v1/users/u9/recommendations", headers=headers)
        assert response.status_code == 401
        assert "X-API-Key" in response.json()["detail"]
    assert client.post("/admin/reload", json={}).status_code == 401
    # health, readiness, metrics and the page stay open
    for path in ("/healthz", "/readyz", "/metrics", "/", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 200, path


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("GET", "/v1/users/u9/recommendations?k=0", None, "query.k"),
        ("GET", "/v1/users/u9/recommendations?k=21", None, "query.k"),
        ("GET", "/v1/users/u9/recommendations?k=ten", None, "query.k"),
        ("GET", "/v1/users/u9/recommendations?exclude_seen=maybe", None, "query.exclude_seen"),
        ("GET", "/v1/items/i1/similar?k=-1", None, "query.k"),
        ("POST", "/v1/recommendations", {"history": "i1"}, "body.history"),
        ("POST", "/v1/recommendations", {"history": ["i1"] * 9}, "body.history"),
        ("POST", "/v1/recommendations", {"history": [1.5]}, "body.history.0.str"),
        ("POST", "/v1/recommendations", {"history": ["i1"], "k": 100}, "body.k"),
        ("POST", "/v1/recommendations", {"history": ["i1"], "user": "u1"}, "body.user"),
        ("POST", "/v1/recommendations", {}, "body.history"),
        ("POST", "/v1/recommendations", None, "body"),
    ],
)
def test_bad_requests_are_422_naming_the_field(
    client: httpx.Client, method: str, path: str, body: object, field: str
) -> None:
    response = client.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 422
    payload = response.json()
    assert payload["detail"] == "invalid request"
    assert field in [error["field"] for error in payload["errors"]], payload


def test_malformed_json_is_422(client: httpx.Client) -> None:
    response = client.post(
        "/v1/recommendations",
        content=b'{"history": [',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["type"] == "json_invalid"


def test_an_internal_error_leaks_no_trace(
    base_url: str, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = client.get("/readyz").json()
    assert served["status"] == "ready"
    from recscale.service import state

    def broken(self: ServedModel, *args: object) -> None:
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(state.ServedModel, "for_user", broken)
    response = client.get("/v1/users/u9/recommendations", headers=AUTH)
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert "secret" not in response.text and "Traceback" not in response.text


def test_an_unknown_user_can_be_a_404(ials_run: Path) -> None:
    settings = ServiceSettings(run=str(ials_run), unknown_user="404")
    with serve_in_thread(create_app(settings)) as url:
        _wait_ready(url)
        response = httpx.get(f"{url}/v1/users/nobody/recommendations")
        assert response.status_code == 404
        assert response.json() == {"detail": "unknown user id 'nobody'"}
        # no key configured: the API is open and the admin API is off
        assert httpx.get(f"{url}/v1/users/u9/recommendations").status_code == 200
        assert httpx.post(f"{url}/admin/reload", json={}).status_code == 403


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown_user must be one of popular, 404"):
        ServiceSettings(run="r", unknown_user="random")
    with pytest.raises(ConfigError, match="max_k must be an integer >= 1, got 0"):
        ServiceSettings(run="r", max_k=0)
    with pytest.raises(ConfigError, match="api_key must not be empty"):
        ServiceSettings(run="r", api_key=" ")


# ---- operations


def test_metrics_count_requests_by_route_and_name_the_model(
    client: httpx.Client, ials_run: Path
) -> None:
    before = _counter(client, "/v1/items/{item_id}/similar", "200")
    for item in ("i1", "i2", "i3"):
        client.get(f"/v1/items/{item}/similar", headers=AUTH)
    text = client.get("/metrics").text
    assert _counter(client, "/v1/items/{item_id}/similar", "200") == before + 3
    assert 'recscale_request_seconds_bucket{le="0.005",route="/v1/items/{item_id}/similar"}' in text
    version = read_embeddings(ials_run).version
    assert (
        f'recscale_model_info{{index="faiss/flat",model="ials",version="ials:{version}"}} 1.0'
        in text
    )


def _counter(client: httpx.Client, route: str, status: str) -> float:
    prefix = f'recscale_requests_total{{method="GET",route="{route}",status="{status}"}} '
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def test_a_milvus_lite_index_serves_the_same_answers(ials_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "items.db"
    export_index(ials_run, target).close()
    settings = ServiceSettings(run=str(ials_run), index=str(target))
    served = ServedModel.load(ials_run, str(target))  # loaded first, as `recscale serve` does
    with serve_in_thread(create_app(settings, served)) as url:
        assert _wait_ready(url)["index"] == "milvus/flat"
        milvus = httpx.get(f"{url}/v1/users/u9/recommendations?k=5").json()
        history = httpx.post(
            f"{url}/v1/recommendations", json={"history": ["i6", "i7", "i8"], "k": 5}
        ).json()
    expected = Run.open(ials_run).recommend("u9", k=5)
    assert milvus["items"][0]["id"] == "i9"
    np.testing.assert_allclose(
        [item["score"] for item in milvus["items"]], [r["score"] for r in expected], atol=1e-6
    )
    assert history["items"][0]["id"] in {"i9", "i10", "i11"}


def test_a_stale_index_is_refused(ials_run: Path, bpr_run: Path, tmp_path: Path) -> None:
    export_index(bpr_run, tmp_path / "bpr.faiss").close()
    from recscale.errors import RunError

    with pytest.raises(RunError, match="export it again"):
        ServedModel.load(ials_run, str(tmp_path / "bpr.faiss"))


def test_hot_swap_drops_no_request(ials_run: Path, bpr_run: Path) -> None:
    settings = ServiceSettings(run=str(ials_run), api_key=KEY)
    with serve_in_thread(create_app(settings)) as url:
        first = _wait_ready(url)["model"]
        stop = threading.Event()
        results: list[tuple[int, str]] = []

        def hammer() -> None:
            with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
                while not stop.is_set():
                    r = c.get("/v1/users/u9/recommendations?k=3")
                    results.append((r.status_code, r.json().get("model", "")))

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        reload = httpx.post(
            f"{url}/admin/reload", json={"run": str(bpr_run)}, headers=AUTH, timeout=60
        )
        time.sleep(0.3)
        failed = httpx.post(
            f"{url}/admin/reload", json={"run": "/no/such/run"}, headers=AUTH, timeout=60
        )
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join()
        after = httpx.get(f"{url}/readyz").json()["model"]
    assert reload.status_code == 200, reload.text
    assert reload.json()["previous"] == first and reload.json()["model"] == after != first
    assert failed.status_code == 422
    assert "reload failed, still serving" in failed.json()["detail"]
    assert "/no/such/run" in failed.json()["detail"]
    statuses = {status for status, _ in results}
    assert statuses == {200}, statuses
    versions = [model for _, model in results]
    assert first in versions and after in versions
    # once the new model answered, the old one never did again
    assert first not in versions[versions.index(after) + 4 * len(threads) :]


@pytest.mark.slow
def test_sasrec_encodes_a_posted_history(dataset: Path, tmp_path: Path) -> None:
    params = {"dim": 8, "n_heads": 1, "n_layers": 1, "max_len": 6, "dropout": 0.0}
    run_dir = _train(dataset, tmp_path / "sasrec", "sasrec", params, epochs=2)
    settings = ServiceSettings(run=str(run_dir))
    history = ["i6", "i7", "i8"]
    with serve_in_thread(create_app(settings)) as url:
        _wait_ready(url)
        body = httpx.post(
            f"{url}/v1/recommendations", json={"history": history, "k": 5, "exclude_seen": False}
        ).json()
    # independently: the model's encoder over the same left-padded sequence, then every item
    model = Run.open(run_dir).model
    seq = torch.tensor([[0, 0, 0, 7, 8, 9]])
    with torch.no_grad():
        state = model.encode(seq)[0, -1]
        scores = model.item_emb.weight[1:] @ state
    expected = torch.argsort(scores, descending=True, stable=True)[:5].tolist()
    assert [item["id"] for item in body["items"]] == [f"i{i}" for i in expected]


@pytest.mark.slow
def test_recscale_serve_reloads_on_sighup(ials_run: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RECSCALE_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "recscale", "serve", "--run", str(ials_run), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(f"{url}/v1/users/u9/recommendations").status_code == 401  # key from env
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while (
            'recscale_model_reloads_total{result="ok"} 1.0' not in httpx.get(f"{url}/metrics").text
        ):
            assert time.monotonic() < deadline, "no reload after SIGHUP"
            time.sleep(0.1)
        ok = httpx.get(f"{url}/v1/users/u9/recommendations", headers=AUTH)
        assert ok.status_code == 200 and ok.json()["items"][0]["id"] == "i9"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"serving ials:{read_embeddings(ials_run).version}" in out
    assert "API key required" in out


def test_recscale_serve_refuses_a_bad_run(tmp_path: Path) -> None:
    from recscale.cli import main

    assert main(["serve", "--run", str(tmp_path / "nope")]) == 1
