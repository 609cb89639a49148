"""The run that bench/index.py and bench/serve.py search: iALS with 64 factors on Gowalla.

Gowalla (LightGCN split) has 29,858 users and 40,981 items. 64 factors is a usual serving size;
with regularization 0.01 and alpha 10 iALS reaches Recall@20 0.141 there (see IALSParams).
Built once under ``bench/out/serving/`` and reused while it exists.
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARAMS = {"factors": 64, "regularization": 0.01, "alpha": 10.0, "iterations": 15}


def data_root() -> Path:
    return Path(os.environ.get("RECSCALE_DATA", ROOT.parent / "shared" / "data")).resolve()


def gowalla_run(work: Path) -> Path:
    """The run directory (ingesting and training first if it is not there yet)."""
    from recscale.config import TrainConfig
    from recscale.ingest import ingest
    from recscale.train import train

    dataset, run_dir = work / "gowalla", work / "gowalla-ials-64"
    source = data_root() / "gowalla"
    if not source.is_dir():
        raise SystemExit(f"no Gowalla under {source}: set RECSCALE_DATA")
    if not (dataset / "manifest.json").exists():
        ingest([source], dataset, progress=False)
    if not (run_dir / "embeddings" / "items.parquet").exists():
        config = TrainConfig(model="ials", split="given", epochs=1, progress=False)
        train(dataset, config, PARAMS, run_dir=run_dir)
    return run_dir
