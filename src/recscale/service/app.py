"""The HTTP service: ``create_app(settings)`` builds the FastAPI app that ``recscale serve`` runs.

Routes (original ids in and out; OpenAPI docs at ``/docs``):

- ``GET  /v1/users/{user_id}/recommendations?k=10&exclude_seen=true``
- ``POST /v1/recommendations`` ``{"history": [item ids], "k": 10}``: a new or anonymous user
- ``GET  /v1/items/{item_id}/similar?k=10``
- ``GET  /v1/users?limit=20``, ``GET /v1/users/{user_id}/history``: for the page at ``/``
- ``POST /admin/reload`` ``{"run": ..., "index": ...}``: swap to another (or re-exported) run
- ``GET  /healthz`` (the process is up), ``/readyz`` (a model is loaded), ``/metrics``

With an API key configured, ``/v1`` and ``/admin`` need it in the ``X-API-Key`` header (401
without it); without one, ``/admin`` is off (403). A reload builds the new model beside the old
one and swaps them in one step: requests in flight finish on the model they started with, and a
failed load leaves the old model serving. ``SIGHUP`` reloads the same run and index.
"""

import asyncio
import contextlib
import hmac
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from recscale import __version__
from recscale.errors import RecscaleError
from recscale.service.metrics import ServiceMetrics
from recscale.service.schemas import (
    Recommendations,
    ReloadRequest,
    ReloadResult,
    Similar,
    UserHistory,
    UserList,
    history_request,
)
from recscale.service.settings import ServiceSettings
from recscale.service.state import ModelHolder, ServedModel

__all__ = ["create_app"]

log = logging.getLogger("recscale.service")

ID_MAX_LENGTH = 256


def create_app(settings: ServiceSettings, served: ServedModel | None = None) -> FastAPI:
    """The app serving ``settings.run``; ``served`` is used as loaded, else it loads at start-up.

    Loading at start-up happens in the background: ``/healthz`` answers at once, ``/readyz`` and
    the API answer 503 until the model is in.
    """
    _one_thread_per_search()
    holder = ModelHolder(served)
    metrics = ServiceMetrics()
    sources = {"run": settings.run, "index": settings.index}
    state: dict[str, Any] = {"load_error": None}

    def load(run: str, index: str | None) -> ServedModel:
        return ServedModel.load(
            run, index, collection=settings.collection, token=settings.milvus_token
        )

    def announce(served: ServedModel) -> None:
        info = served.index.info
        metrics.serving(served.version, served.model, f"{info.backend}/{info.kind}")

    def publish(new: ServedModel) -> str | None:
        old = holder.swap(new)
        announce(new)
        return None if old is None else old.version

    def reload(run: str | None = None, index: str | None = None) -> ReloadResult:
        """Load and swap in a model; raises what the load raised, serving the old model still."""
        if not holder.reload_lock.acquire(blocking=False):
            raise HTTPException(409, "a reload is already running")
        try:
            started = time.perf_counter()
            target_run = run or sources["run"]
            target_index = index if run is not None or index is not None else sources["index"]
            try:
                new = load(target_run, target_index)
            except Exception:
                metrics.reloads.labels("failed").inc()
                raise
            previous = publish(new)
            sources.update(run=target_run, index=target_index)
            metrics.reloads.labels("ok").inc()
            state["load_error"] = None
            log.info("now serving %s (was %s)", new.version, previous)
            return ReloadResult(
                model=new.version, previous=previous, seconds=time.perf_counter() - started
            )
        finally:
            holder.reload_lock.release()

    def initial_load() -> None:
        try:
            reload()
        except Exception as exc:
            state["load_error"] = str(exc)
            log.error("could not load run %s: %s", settings.run, exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        current = holder.current()
        if current is not None:
            announce(current)
        else:
            threading.Thread(target=initial_load, name="recscale-load", daemon=True).start()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            # only where the loop runs in the main thread (as under `recscale serve`)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, _sighup))
        yield
        current = holder.current()
        if current is not None:
            current.retire()

    def _sighup() -> None:
        try:
            reload()
        except Exception as exc:  # the old model keeps serving; say why in the log
            log.error("reload on SIGHUP failed, still serving the old model: %s", exc)

    app = FastAPI(
        title="recscale",
        summary="Recommendations from a trained recscale run",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.holder = holder
    app.state.metrics = metrics

    # ---- errors: JSON always, naming the field; never a stack trace

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": ".".join(str(part) for part in error.get("loc", ())),
                "message": error.get("msg", ""),
                "type": error.get("type", ""),
            }
            for error in exc.errors()
        ]
        return JSONResponse({"detail": "invalid request", "errors": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error answering %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    # ---- who may call

    # async: FastAPI would run a plain function in its thread pool, a thread hop per request
    async def require_key(x_api_key: str | None = Header(None, description="the API key")) -> None:
        if settings.api_key is None:
            return
        given = (x_api_key or "").encode()
        if not hmac.compare_digest(given, settings.api_key.encode()):
            raise HTTPException(
                401,
                "missing or wrong API key: send it in the X-API-Key header",
                headers={"WWW-Authenticate": "ApiKey"},
            )

    async def require_admin(x_api_key: str | None = Header(None)) -> None:
        if settings.api_key is None:
            raise HTTPException(403, "the admin API is off: start the service with an API key")
        await require_key(x_api_key)

    # ---- the API

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
    UserId = Path(min_length=1, max_length=ID_MAX_LENGTH, description="original user id")
    ItemIdPath = Path(min_length=1, max_length=ID_MAX_LENGTH, description="original item id")
    K = Query(10, ge=1, le=settings.max_k, description=f"how many items, 1..{settings.max_k}")
    HistoryRequest = history_request(settings.max_k, settings.max_history)

    async def answer(fn: Callable[[ServedModel], Any]) -> Any:
        served = holder.acquire()
        if served is None:
            raise HTTPException(503, "the model is still loading" + _why(state))
        try:
            if served.index.info.backend == "faiss" and served.encoder is None:
                return fn(served)  # a FAISS search takes well under a millisecond
            return await run_in_threadpool(fn, served)  # a network round trip, or torch
        finally:
            served.release()

    @api.get("/users/{user_id}/recommendations", response_model=Recommendations)
    async def user_recommendations(
        user_id: str = UserId,
        k: int = K,
        exclude_seen: bool = Query(True, description="leave out items the user has seen"),
    ) -> dict[str, Any]:
        def run(served: ServedModel) -> dict[str, Any]:
            user = served.user_index.get(user_id)
            if user is None:
                if settings.unknown_user == "404":
                    raise HTTPException(404, f"unknown user id {user_id!r}")
                scores, items = served.popular_items(k)
                return _answer(served, scores, items, user=user_id, fallback="popular")
            scores, items = served.for_user(user, k, exclude_seen)
            return _answer(served, scores, items, user=user_id)

        return await answer(run)

    @api.post("/recommendations", response_model=Recommendations)
    async def history_recommendations(body: HistoryRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        ids = [str(item) for item in body.history]

        def run(served: ServedModel) -> dict[str, Any]:
            known = [served.item_index.get(item) for item in ids]
            unknown = [item for item, idx in zip(ids, known, strict=True) if idx is None]
            history = np.array([idx for idx in known if idx is not None], dtype=np.int64)
            if not len(history):
                scores, items = served.popular_items(body.k)
                return _answer(served, scores, items, fallback="popular", unknown=unknown)
            scores, items = served.for_history(history, body.k, body.exclude_seen)
            return _answer(served, scores, items, unknown=unknown)

        return await answer(run)

    @api.get("/items/{item_id}/similar", response_model=Similar)
    async def similar_items(item_id: str = ItemIdPath, k: int = K) -> dict[str, Any]:
        def run(served: ServedModel) -> dict[str, Any]:
            item = served.item_index.get(item_id)
            if item is None:
                raise HTTPException(404, f"unknown item id {item_id!r}")
            scores, items = served.similar(item, k)
            return {
                "item": item_id,
                "items": _items(served, scores, items),
                "model": served.version,
            }

        return await answer(run)

    @api.get("/users", response_model=UserList)
    async def users(limit: int = Query(20, ge=1, le=1000)) -> dict[str, Any]:
        def run(served: ServedModel) -> dict[str, Any]:
            top = served.active_users[:limit]
            return {"users": [str(user) for user in served.user_ids[top]]}

        return await answer(run)

    @api.get("/users/{user_id}/history", response_model=UserHistory)
    async def user_history(
        user_id: str = UserId, limit: int = Query(50, ge=1, le=1000)
    ) -> dict[str, Any]:
        def run(served: ServedModel) -> dict[str, Any]:
            user = served.user_index.get(user_id)
            if user is None:
                raise HTTPException(404, f"unknown user id {user_id!r}")
            items = served.user_history(user)
            shown = items[:limit]
            return {
                "user": user_id,
                "items": _items(served, served.popularity[shown], shown),
                "total": len(items),
            }

        return await answer(run)

    app.include_router(api)

    # ---- admin

    @app.post("/admin/reload", response_model=ReloadResult, dependencies=[Depends(require_admin)])
    async def admin_reload(body: ReloadRequest | None = None) -> ReloadResult:
        body = body or ReloadRequest()
        try:
            return await run_in_threadpool(reload, body.run, body.index)
        except RecscaleError as exc:
            current = holder.current()
            still = current.version if current is not None else "nothing"
            raise HTTPException(
                422, f"reload failed, still serving {still}: {type(exc).__name__}: {exc}"
            ) from None

    # ---- operations

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        current = holder.current()
        if current is None:
            return JSONResponse(
                {
                    "status": "loading" + _why(state),
                    "api_key_required": settings.api_key is not None,
                },
                status_code=503,
            )
        return JSONResponse(
            {
                "status": "ready",
                "model": current.version,
                "index": f"{current.index.info.backend}/{current.index.info.kind}",
                "api_key_required": settings.api_key is not None,
            }
        )

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page())

    app.add_middleware(_Wrap, wrap=metrics.middleware)
    return app


class _Wrap:
    """Adapts a function that wraps an ASGI app to ``add_middleware``'s class protocol."""

    def __init__(self, app: Any, wrap: Callable[[Any], Any]) -> None:
        self._app = wrap(app)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


def _one_thread_per_search() -> None:
    """Requests are the parallelism: FAISS's OpenMP threads on one query only contend."""
    with contextlib.suppress(ImportError):
        import faiss

        faiss.omp_set_num_threads(1)


def _items(served: ServedModel, scores: np.ndarray, items: np.ndarray) -> list[dict[str, Any]]:
    ids = served.item_ids[items]
    titles = served.titles[items] if served.titles is not None else [None] * len(items)
    return [
        {"id": str(item_id), "score": float(score), "title": title}
        for item_id, score, title in zip(ids, scores.tolist(), titles, strict=True)
    ]


def _answer(
    served: ServedModel,
    scores: np.ndarray,
    items: np.ndarray,
    *,
    user: str | None = None,
    fallback: str | None = None,
    unknown: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "user": user,
        "items": _items(served, scores, items),
        "model": served.version,
        "fallback": fallback,
        "unknown_items": unknown or [],
    }


def _why(state: dict[str, Any]) -> str:
    return f" (the last load failed: {state['load_error']})" if state["load_error"] else ""


def _page() -> str:
    return resources.files("recscale.service").joinpath("page.html").read_text(encoding="utf-8")
