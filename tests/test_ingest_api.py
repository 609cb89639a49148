"""recscale.ingest: the public surface, the manifest it writes and the printed quality summary."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import recscale.ingest
from recscale.config import IngestConfig, config_from_dict
from recscale.dataset import Manifest
from recscale.ingest import REASONS, format_quality, ingest

README = Path(recscale.ingest.__file__).parents[1] / "dataset" / "README.md"


def test_public_surface() -> None:
    assert set(recscale.ingest.__all__) >= {"IngestResult", "format_quality", "ingest", "REASONS"}
    for name in recscale.ingest.__all__:
        assert hasattr(recscale.ingest, name)


def test_readme_documents_every_reason_and_a_valid_manifest() -> None:
    text = README.read_text()
    for code in REASONS:
        assert f"`{code}`" in text, code
    example = re.search(r"```json\n(.*?)\n```", text, re.S)
    assert example is not None
    data = json.loads(example.group(1))
    fields = {f.name for f in dataclasses.fields(Manifest)}
    assert set(data) == fields
    # the example's options are a complete, valid IngestConfig
    options = {
        k: v
        for k, v in data["options"].items()
        if k in {f.name for f in dataclasses.fields(IngestConfig)}
    }
    assert config_from_dict(IngestConfig, options) == IngestConfig()


def test_manifest_records_sources_with_checksums(tmp_path: Path) -> None:
    src = tmp_path / "log.csv"
    src.write_text("user,item,rating,ts\n1,2,3.5,100\n1,3,,200\n")
    result = ingest([src], tmp_path / "ds", IngestConfig(dedupe="keep-first"), progress=False)
    manifest = Manifest.read(tmp_path / "ds")
    assert manifest == result.dataset.manifest
    (source,) = manifest.sources
    assert source.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (source.path, source.bytes, source.format, source.rows) == (
        str(src),
        src.stat().st_size,
        "csv",
        2,
    )
    assert (manifest.n_input_rows, manifest.n_rejected, manifest.n_interactions) == (2, 1, 1)
    assert manifest.options["dedupe"] == "keep-first"
    assert manifest.options["resolved_sources"] == [
        {
            "path": str(src),
            "format": "csv",
            "delimiter": ",",
            "header": True,
            "quoted": True,
            "columns": {"user": "user", "item": "item", "time": "ts", "value": "rating"},
        }
    ]
    assert manifest.created_by.startswith("recscale ") and "duckdb" in manifest.created_by
    assert json.loads((tmp_path / "ds" / "quality.json").read_text()) == result.quality


def test_format_quality_summary(tmp_path: Path) -> None:
    src = tmp_path / "log.csv"
    src.write_text(
        "user,item,rating,ts\n"
        + "".join(
            f"{u},{i},{1 + (u + i) % 5},{1_600_000_000 + 86400 * (u * 7 + i)}\n"
            for u in range(6)
            for i in range(u + 1)
        )
        + "x,1,bad,1\n"
    )
    result = ingest([src], tmp_path / "ds", progress=False)
    lines = format_quality(result.quality).splitlines()
    assert lines[0] == "input rows = accepted + rejected: 22 = 21 + 1"
    assert lines[1] == (
        "accepted = interactions + duplicates folded: 21 = 21 + 0  (dedupe keep-last, 0 duplicates)"
    )
    assert lines[2] == "rejected by reason: bad_value 1"
    assert lines[3] == "skipped lines (not rows): 1 header, 0 blank"
    assert lines[4] == "users 6  items 6  interactions 21  density 58.3333%"
    assert lines[5] == (
        "interactions per user: min 1 | p25 2 | p50 3 | p75 5 | p90 6 | p99 6 | max 6 | mean 3.50"
    )
    assert lines[6] == (
        "interactions per item: min 1 | p25 2 | p50 3 | p75 5 | p90 6 | p99 6 | max 6 | mean 3.50"
    )
    # item counts 6,5,4,3,2,1: Gini = sum((2i - n - 1) x_i) / (n sum x) over ascending x
    counts = [1, 2, 3, 4, 5, 6]
    gini = sum((2 * (k + 1) - 7) * x for k, x in enumerate(counts)) / (6 * sum(counts))
    assert lines[7] == f"item popularity Gini: {gini:.3f}"
    assert lines[8] == "time: 2020-09-13 .. 2020-10-23"  # 1.6e9 s, + 40 days
    assert lines[9].startswith("value (rating): min 1, max 5, mean ")
    assert lines[10] == "cold (< 5 interactions): users 4 (66.7%), items 4 (66.7%)"
    assert lines[11] == f"source {src}: 22 rows, 21 accepted, 1 rejected"
    assert lines[12].startswith("ingested in ")
