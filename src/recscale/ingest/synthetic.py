"""A synthetic streaming-service viewing log with planted taste structure and dirty rows.

Users have tastes over genres (a sparse Dirichlet), titles belong to one to three genres, carry a
power-law popularity and a release date, and a user watches titles of the genres they like, the
popular ones more often, always after the release date. A model that learns each user's genres
beats the popularity ranking; that is what the demo and its test check.

The raw files look like a real export: ``events.csv`` (``user_id,title_id,watched_at,watch_fraction``
with ISO-8601 times) and ``titles.csv`` (``title_id,title,genres,release_date``). A few percent of
the event lines are dirty in every way ingest must catch: missing ids, unparseable times, non-finite
values, wrong field counts, bytes that are not UTF-8, and repeated (user, title) views.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from recscale.errors import ConfigError

__all__ = ["GENRES", "SyntheticLog", "generate_viewing_log"]

GENRES = (
    "Action", "Animation", "Comedy", "Crime", "Documentary", "Drama", "Fantasy", "Horror",
    "Kids", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western", "Music",
)  # fmt: skip

_ADJECTIVES = (
    "Silent", "Broken", "Golden", "Hidden", "Last", "Midnight", "Crimson", "Frozen", "Distant",
    "Electric", "Wild", "Lost", "Secret", "Burning", "Quiet", "Iron", "Paper", "Glass", "Velvet",
    "Northern", "Hollow", "Bright", "Savage", "Gentle", "Endless", "Little", "Final", "Restless",
)  # fmt: skip
_NOUNS = (
    "Harbor", "Kingdom", "Signal", "Garden", "Empire", "River", "Witness", "Horizon", "Orchard",
    "Frontier", "Circus", "Archive", "Lighthouse", "Protocol", "Summer", "Voyage", "Machine",
    "Station", "Island", "Promise", "Echo", "Tide", "Crown", "Mountain", "Letter", "Parade",
)  # fmt: skip

#: Dirty-row kinds written into events.csv, in the order of ``SyntheticLog.dirty``.
DIRTY_KINDS = (
    "missing_user",
    "missing_item",
    "bad_timestamp",
    "bad_value",
    "field_count",
    "bad_encoding",
)

_EPOCH_START = int(dt.datetime(2015, 1, 1, tzinfo=dt.timezone.utc).timestamp())
_EPOCH_END = int(dt.datetime(2024, 12, 31, tzinfo=dt.timezone.utc).timestamp())


@dataclasses.dataclass(frozen=True)
class SyntheticLog:
    """What :func:`generate_viewing_log` wrote, with the ground truth tests can check against."""

    events_path: Path
    titles_path: Path
    n_lines: int  # data lines in events.csv (header excluded)
    n_clean: int  # clean event lines (duplicates included)
    n_duplicates: int  # clean lines that repeat an earlier (user, title) pair
    dirty: dict[str, int]  # dirty lines by kind (see DIRTY_KINDS)
    user_genres: np.ndarray  # (users, genres) taste weights, rows sum to 1


def _iso(seconds: np.ndarray) -> np.ndarray:
    return np.datetime_as_string(seconds.astype("datetime64[s]"), unit="s").astype(object) + "Z"


def generate_viewing_log(
    out_dir: str | Path,
    *,
    users: int = 8000,
    items: int = 3000,
    events: int = 300_000,
    dirty_fraction: float = 0.03,
    duplicate_fraction: float = 0.02,
    seed: int = 0,
) -> SyntheticLog:
    """Write ``events.csv`` and ``titles.csv`` under ``out_dir`` and return what was written.

    Everything is vectorised, so ``events`` in the tens of millions only costs the CSV writing.
    """
    for name, value in (("users", users), ("items", items), ("events", events)):
        if value < 1:
            raise ConfigError(f"demo: --{name} must be >= 1, got {value}")
    if items < len(GENRES):
        raise ConfigError(f"demo: --items must be >= {len(GENRES)} (one per genre), got {items}")
    if not 0 <= dirty_fraction < 0.5 or not 0 <= duplicate_fraction < 0.5:
        raise ConfigError("demo: dirty and duplicate fractions must be in [0, 0.5)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_genres = len(GENRES)

    # Titles: a primary genre (every genre gets titles), up to two more, power-law popularity.
    primary = np.concatenate([np.arange(n_genres), rng.integers(0, n_genres, items - n_genres)])
    rng.shuffle(primary)
    item_genres = np.zeros((items, n_genres), dtype=bool)
    item_genres[np.arange(items), primary] = True
    for _ in range(2):
        extra = rng.integers(0, n_genres, items)
        item_genres[np.arange(items), extra] |= rng.random(items) < 0.2
    popularity = rng.permutation(1.0 / np.arange(1, items + 1) ** 0.6)
    release = rng.integers(_EPOCH_START - 20 * 365 * 86400, _EPOCH_END - 90 * 86400, items)
    release[rng.random(items) < 0.3] = rng.integers(_EPOCH_START, _EPOCH_END - 30 * 86400, 1)[0]

    # Users: sparse tastes (2-3 genres dominate), log-normal activity.
    tastes = rng.dirichlet(np.full(n_genres, 0.08), size=users)
    activity = rng.lognormal(0.0, 0.8, users)
    activity /= activity.sum()
    n_clean = events - round(events * dirty_fraction)
    n_dup = round(n_clean * duplicate_fraction)
    n_fresh = n_clean - n_dup
    event_user = rng.choice(users, size=n_fresh, p=activity)

    # Each event: a genre from the user's taste, then a title of that genre by popularity.
    cum_taste = np.cumsum(tastes, axis=1)
    cum_taste[:, -1] = 1.0
    event_genre = (cum_taste[event_user] < rng.random(n_fresh)[:, None]).sum(axis=1)
    event_item = np.empty(n_fresh, dtype=np.int64)
    for g in range(n_genres):
        members = np.flatnonzero(item_genres[:, g])
        mask = event_genre == g
        weights = popularity[members] / popularity[members].sum()
        event_item[mask] = rng.choice(members, size=int(mask.sum()), p=weights)
    # Watch time: after release and within the log's window; a user's views spread over years.
    start = np.maximum(release[event_item], _EPOCH_START)
    event_ts = start + (rng.random(n_fresh) * (_EPOCH_END - start)).astype(np.int64)
    fraction = np.round(np.clip(rng.beta(4, 1.5, n_fresh), 0.01, 1.0), 3)

    # Repeat views of an already watched title, later in time.
    rep = rng.integers(0, n_fresh, n_dup)
    users_all = np.concatenate([event_user, event_user[rep]])
    items_all = np.concatenate([event_item, event_item[rep]])
    ts_all = np.concatenate(
        [event_ts, np.minimum(event_ts[rep] + rng.integers(3600, 90 * 86400, n_dup), _EPOCH_END)]
    )
    frac_all = np.concatenate([fraction, np.round(rng.uniform(0.05, 1.0, n_dup), 3)])
    order = rng.permutation(n_clean)
    users_all, items_all, ts_all, frac_all = (
        users_all[order],
        items_all[order],
        ts_all[order],
        frac_all[order],
    )
    _, first = np.unique(users_all * items + items_all, return_index=True)
    n_duplicates = n_clean - len(first)

    user_ids = np.char.add("u", np.char.zfill(np.arange(users).astype(str), 6)).astype(object)
    title_ids = np.char.add("t", np.char.zfill(np.arange(items).astype(str), 5)).astype(object)
    clean = pa.table(
        {
            "user_id": user_ids[users_all],
            "title_id": title_ids[items_all],
            "watched_at": _iso(ts_all),
            "watch_fraction": frac_all,
        }
    )
    sink = pa.BufferOutputStream()
    pacsv.write_csv(clean, sink, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    lines = sink.getvalue().to_pybytes().splitlines()

    dirty_lines, dirty_counts = _dirty_lines(rng, events - n_clean, user_ids, title_ids)
    positions = np.sort(rng.integers(0, n_clean + 1, len(dirty_lines)))
    for pos, line in zip(positions[::-1], dirty_lines[::-1], strict=True):
        lines.insert(int(pos), line)
    events_path = out / "events.csv"
    events_path.write_bytes(
        b"user_id,title_id,watched_at,watch_fraction\n" + b"\n".join(lines) + b"\n"
    )

    titles = pa.table(
        {
            "title_id": title_ids,
            "title": _titles(rng, items),
            "genres": ["|".join(GENRES[g] for g in np.flatnonzero(row)) for row in item_genres],
            "release_date": np.datetime_as_string(release.astype("datetime64[s]"), unit="D"),
        }
    )
    titles_path = out / "titles.csv"
    pacsv.write_csv(titles, titles_path)
    return SyntheticLog(
        events_path=events_path,
        titles_path=titles_path,
        n_lines=len(lines),
        n_clean=n_clean,
        n_duplicates=n_duplicates,
        dirty=dirty_counts,
        user_genres=tastes,
    )


def _titles(rng: np.random.Generator, items: int) -> list[str]:
    adjective = rng.integers(0, len(_ADJECTIVES), items)
    noun = rng.integers(0, len(_NOUNS), items)
    the = rng.random(items) < 0.5
    names = [
        f"{'The ' if t else ''}{_ADJECTIVES[a]} {_NOUNS[n]}"
        for t, a, n in zip(the, adjective, noun, strict=True)
    ]
    # Several titles share a name, as remakes and sequels do; a number keeps them apart.
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} {seen[name]}")
    return out


def _dirty_lines(
    rng: np.random.Generator, n: int, user_ids: np.ndarray, title_ids: np.ndarray
) -> tuple[list[bytes], dict[str, int]]:
    """``n`` lines, spread evenly over the dirty kinds, each broken in exactly one way."""
    kinds = np.arange(n) % len(DIRTY_KINDS)
    lines: list[bytes] = []
    for kind in kinds:
        user = str(user_ids[rng.integers(len(user_ids))])
        title = str(title_ids[rng.integers(len(title_ids))])
        when = "2020-05-17T20:15:00Z"
        name = DIRTY_KINDS[kind]
        if name == "missing_user":
            line = f",{title},{when},0.5".encode()
        elif name == "missing_item":
            line = f"{user},,{when},0.5".encode()
        elif name == "bad_timestamp":
            line = f"{user},{title},{rng.choice(['yesterday', '2020-13-45T99:00:00Z', 'n/a'])},0.5".encode()
        elif name == "bad_value":
            line = f"{user},{title},{when},{rng.choice(['nan', 'inf', 'lots'])}".encode()
        elif name == "field_count":
            line = (
                f"{user},{title},{when}".encode()
                if rng.random() < 0.5
                else f"{user},{title},{when},0.5,extra".encode()
            )
        else:  # bad_encoding: a Latin-1 byte sequence that is not valid UTF-8
            line = f"{user},".encode() + b"t\xe9l\xe9" + f",{when},0.5".encode()
        lines.append(line)
    counts = {name: int((kinds == i).sum()) for i, name in enumerate(DIRTY_KINDS)}
    return lines, counts
