"""The default hyper-parameters on Gowalla (LightGCN split): each model beats its reference.

Slow: ingests the real data set (RECSCALE_DATA) and trains every registered model with its
defaults, through the same ``train()`` users call. Published references for this split (full
ranking, train items excluded): MostPop 0.0416 / 0.0317, MF-BPR 0.1291 / 0.1109 (LightGCN paper).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recscale.config import EvalConfig, TrainConfig, load_toml
from recscale.ingest import ingest
from recscale.train import train

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RECSCALE_DATA", ROOT.parent / "shared" / "data"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gowalla(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (DATA / "gowalla" / "train.txt.gz").exists():
        pytest.skip(f"RECSCALE_DATA has no {DATA / 'gowalla'}")
    out = tmp_path_factory.mktemp("data") / "gowalla"
    ingest([DATA / "gowalla"], out, progress=False)
    return out


@pytest.mark.parametrize(
    ("model", "recall", "ndcg"),
    [
        # popularity is exact: the literature's MostPop row
        ("popularity", 0.0416, 0.0317),
        # learnt models: floors a little under the figures in their Params docstrings
        ("ials", 0.165, 0.138),
        ("mf-bpr", 0.165, 0.140),
        ("itemknn", 0.160, 0.133),
        # the best published figure on this split is BSPM-EM's 0.1920 / 0.1597: ours must beat it
        ("bspm", 0.1920, 0.1597),
    ],
)
def test_defaults_on_gowalla(
    gowalla: Path, tmp_path: Path, model: str, recall: float, ndcg: float
) -> None:
    params = {"alpha": 0.9, "shrink": 2.0} if model == "itemknn" else None  # configs/gowalla
    run = train(
        gowalla,
        TrainConfig(model=model, split="given", progress=False),
        params,
        run_dir=tmp_path / model,
    )
    metrics = run.evaluate(EvalConfig(ks=(20,)))
    assert metrics["users"] == 29_858
    if model == "popularity":
        assert round(metrics["recall@20"], 4) == recall
        assert round(metrics["ndcg@20"], 4) == ndcg
    else:
        assert metrics["recall@20"] > recall
        assert metrics["ndcg@20"] > ndcg


# about 10 minutes on 2 cores (4 epochs of 1.5 s steps: twelve sparse products over the graph and
# 32 gathered candidates a row, memory-bound), over 15 on a slow CI machine: the suite's
# 15-minute limit per test would cut it
@pytest.mark.timeout(2400)
def test_lightgcn_recipe_learns_gowalla(gowalla: Path, tmp_path: Path) -> None:
    """configs/gowalla/lightgcn.toml cut to 4 of its 20 epochs already beats MF-BPR's paper row.

    The full 20 epochs (bench/time_to_quality.py, about 15 minutes) reach the LightGCN paper's
    0.1830 / 0.1554; four, cosine-annealed over the four, are a check that CI can afford and
    measured Recall@20 0.1563, NDCG@20 0.1329 on 2 cores (the floors are a little under).
    """
    tables = load_toml(ROOT / "configs" / "gowalla" / "lightgcn.toml")
    config = TrainConfig(**{**tables["train"], "epochs": 4, "split": "given", "progress": False})
    run = train(gowalla, config, tables["model"], run_dir=tmp_path / "lightgcn")
    metrics = run.evaluate(EvalConfig(ks=(20,)))
    assert metrics["recall@20"] > 0.150
    assert metrics["ndcg@20"] > 0.125
