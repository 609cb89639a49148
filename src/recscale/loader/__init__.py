"""Dataset split -> tensor batches: the World, the partition function, negative sampling."""

from recscale.loader.memory import InMemoryLoader, is_positive, positive_keys, sample_negatives
from recscale.loader.world import World, partition

__all__ = [
    "InMemoryLoader",
    "World",
    "is_positive",
    "partition",
    "positive_keys",
    "sample_negatives",
]
