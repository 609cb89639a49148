"""The demo on a small synthetic log: dirty rows are all caught, and learned models beat popularity."""

from __future__ import annotations

import json

import pytest

from recscale.demo import DemoConfig, run_demo
from recscale.ingest.synthetic import DIRTY_KINDS


@pytest.mark.slow
def test_demo_catches_dirty_rows_and_beats_popularity(tmp_path, capsys) -> None:
    config = DemoConfig(users=1500, items=400, events=45_000, epochs=15, seed=0)
    result = run_demo(tmp_path, config, progress=False)
    out = capsys.readouterr().out

    quality = json.loads((result.dataset_path / "quality.json").read_text())
    rejected = quality["rejected_by_reason"]
    per_kind = round(config.events * 0.03) // len(DIRTY_KINDS)
    for kind in DIRTY_KINDS:
        assert rejected.get(kind) == per_kind, (kind, rejected)
    assert quality["rows_in"] == config.events
    assert quality["rows_in"] == quality["accepted"] + quality["rejected"]

    ndcg = {model: m["ndcg@20"] for model, m in result.metrics.items()}
    # the log plants genre tastes; a model that learns them must clearly beat the popularity chart
    assert ndcg["ials"] > 1.3 * ndcg["popularity"], ndcg
    assert ndcg["mf-bpr"] > 1.3 * ndcg["popularity"], ndcg
    assert "sample recommendations" in out and "recommended:" in out
