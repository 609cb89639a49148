"""How a service is configured: which run and index, who may call it, and its bounds."""

from __future__ import annotations

import dataclasses
import os

from recscale.errors import ConfigError

__all__ = ["API_KEY_ENV", "UNKNOWN_USER_POLICIES", "ServiceSettings"]

API_KEY_ENV = "RECSCALE_API_KEY"
UNKNOWN_USER_POLICIES = ("popular", "404")


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    """``recscale serve``'s options; the API key falls back to ``$RECSCALE_API_KEY``."""

    run: str
    index: str | None = (
        None  # FAISS directory, Milvus Lite .db file or Milvus URI; None: FAISS in memory
    )
    api_key: str | None = None
    unknown_user: str = "popular"  # "popular": most popular items, flagged; "404": an error
    max_k: int = 100
    max_history: int = 1000
    collection: str | None = None  # Milvus collection prefix
    milvus_token: str | None = None

    def __post_init__(self) -> None:
        if self.unknown_user not in UNKNOWN_USER_POLICIES:
            raise ConfigError(
                f"unknown_user must be one of {', '.join(UNKNOWN_USER_POLICIES)}; "
                f"got {self.unknown_user!r}"
            )
        for name in ("max_k", "max_history"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key must not be empty: give a key, or none to turn keys off")

    @classmethod
    def from_env(cls, **values: object) -> ServiceSettings:
        """Settings from ``values``, with the API key from the environment when none is given."""
        if values.get("api_key") is None and os.environ.get(API_KEY_ENV):
            values["api_key"] = os.environ[API_KEY_ENV]
        return cls(**values)  # type: ignore[arg-type]
