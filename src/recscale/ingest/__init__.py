"""Raw interaction logs -> a dataset directory (``recscale ingest``).

``ingest(sources, out, config)`` reads CSV/TSV, JSON Lines, Parquet, MovieLens and LightGCN files
with DuckDB (out-of-core), validates every row against :mod:`recscale.ingest.rules`, quarantines
the rows it rejects, deduplicates, optionally applies a k-core filter, and writes the dataset
format of ``recscale/dataset/README.md`` atomically, with a quality report.
"""

from recscale.ingest.api import IngestResult, format_quality, ingest
from recscale.ingest.rules import REASONS
from recscale.ingest.split import make_split

__all__ = ["REASONS", "IngestResult", "format_quality", "ingest", "make_split"]
