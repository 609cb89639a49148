"""Dataset split -> tensor batches: the World, the partition functions, negative sampling,
in-memory and streaming (Parquet) loaders, user histories for sequence models."""

from recscale.loader.memory import InMemoryLoader
from recscale.loader.negatives import (
    Positives,
    is_positive,
    popularity_cdf,
    positive_keys,
    sample_negatives,
)
from recscale.loader.sequence import SequenceLoader, last_items
from recscale.loader.stream import (
    ParquetStream,
    RowGroups,
    StreamLoader,
    interleave_position,
    reader_range,
    reader_spans,
)
from recscale.loader.world import World, partition

__all__ = [
    "InMemoryLoader",
    "ParquetStream",
    "Positives",
    "RowGroups",
    "SequenceLoader",
    "StreamLoader",
    "World",
    "interleave_position",
    "is_positive",
    "last_items",
    "partition",
    "popularity_cdf",
    "positive_keys",
    "reader_range",
    "reader_spans",
    "sample_negatives",
]
