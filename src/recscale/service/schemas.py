"""The service's request and response bodies (they are also its OpenAPI schema at ``/docs``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

__all__ = [
    "HistoryRequestBase",
    "Item",
    "Recommendations",
    "ReloadRequest",
    "ReloadResult",
    "Similar",
    "UserHistory",
    "UserList",
    "history_request",
]

ItemId = StrictStr | StrictInt


class Item(BaseModel):
    id: str = Field(description="original item id")
    score: float = Field(description="the model's score (popularity count for the fallback)")
    title: str | None = None


class Recommendations(BaseModel):
    user: str | None = Field(None, description="the user asked about; null for a history")
    items: list[Item]
    model: str = Field(description="the served model version: run name and vector digest")
    fallback: Literal["popular"] | None = Field(
        None, description="set when the answer is the most popular items, not personal"
    )
    unknown_items: list[str] = Field(
        default_factory=list, description="history items not in the catalogue (ignored)"
    )


class Similar(BaseModel):
    item: str
    items: list[Item]
    model: str


class UserHistory(BaseModel):
    user: str
    items: list[Item]
    total: int = Field(description="how many items the user has, of which `items` shows some")


class UserList(BaseModel):
    users: list[str] = Field(description="users with the longest histories first")


class HistoryRequestBase(BaseModel):
    """``POST /v1/recommendations``; the app sets the bounds from its settings."""

    model_config = ConfigDict(extra="forbid")

    history: list[ItemId]
    k: int = 10
    exclude_seen: bool = True


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: str | None = Field(None, description="a run directory; default: the one being served")
    index: str | None = Field(None, description="its index; default: the one being served")


class ReloadResult(BaseModel):
    model: str
    previous: str | None
    seconds: float


def history_request(max_k: int, max_history: int) -> type[HistoryRequestBase]:
    """The request body with the service's bounds on ``k`` and the history's length."""

    class HistoryRequest(HistoryRequestBase):
        history: list[ItemId] = Field(max_length=max_history)
        k: int = Field(10, ge=1, le=max_k)

    return HistoryRequest
