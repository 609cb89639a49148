"""Quoted CSV fields: delimiters and escaped quotes inside quotes, empty quoted ids."""

from __future__ import annotations

from recscale.config import IngestConfig
from recscale.ingest import ingest

QUOTED = """user,item,value
"u,1",i1,1
"u""2",i2,2
"u3","i3",3
u4,"i,4",4
"",i5,5
"u6",i6
"""


def test_quoted_fields_are_split_exactly(tmp_path) -> None:
    (tmp_path / "q.csv").write_text(QUOTED)
    result = ingest([tmp_path / "q.csv"], tmp_path / "ds", IngestConfig(), progress=False)
    users = result.dataset.users.column("user_id").to_pylist()
    items = result.dataset.items.column("item_id").to_pylist()
    assert users == ['u"2', "u,1", "u3", "u4"]  # ascending string order
    assert items == ["i,4", "i1", "i2", "i3"]
    reasons = {k: v for k, v in result.quality["rejected_by_reason"].items() if v}
    assert reasons == {"missing_user": 1, "field_count": 1}
    values = result.dataset.interactions().value
    assert sorted(values.tolist()) == [1.0, 2.0, 3.0, 4.0]
