"""Dataset split -> tensor batches: the World, the partition function, negative sampling,
user histories for sequence models."""

from recscale.loader.memory import InMemoryLoader, is_positive, positive_keys, sample_negatives
from recscale.loader.sequence import SequenceLoader, last_items
from recscale.loader.world import World, partition

__all__ = [
    "InMemoryLoader",
    "SequenceLoader",
    "World",
    "is_positive",
    "last_items",
    "partition",
    "positive_keys",
    "sample_negatives",
]
