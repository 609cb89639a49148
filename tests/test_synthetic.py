"""The synthetic viewing log: exact line accounting, determinism, planted taste structure."""

from __future__ import annotations

import numpy as np
import pytest

from recscale.errors import ConfigError
from recscale.ingest.synthetic import DIRTY_KINDS, GENRES, generate_viewing_log


def test_line_accounting_and_dirty_kinds(tmp_path) -> None:
    log = generate_viewing_log(
        tmp_path, users=200, items=100, events=6000, dirty_fraction=0.05, seed=3
    )
    raw = log.events_path.read_bytes().splitlines()
    assert raw[0] == b"user_id,title_id,watched_at,watch_fraction"
    assert len(raw) - 1 == log.n_lines == 6000
    assert log.n_clean == 6000 - 300
    assert sum(log.dirty.values()) == 300
    assert set(log.dirty) == set(DIRTY_KINDS) and set(log.dirty.values()) == {50}
    # each planted kind is present in the bytes
    assert sum(line.startswith(b",") for line in raw[1:]) == log.dirty["missing_user"]
    assert sum(b"t\xe9l\xe9" in line for line in raw) == log.dirty["bad_encoding"]
    field_counts = [line.count(b",") + 1 for line in raw[1:]]
    assert sum(n != 4 for n in field_counts) == log.dirty["field_count"]
    # duplicates: clean lines repeating an earlier (user, title) pair
    clean = [line.split(b",") for line in raw[1:] if line.count(b",") == 3]
    clean = [
        f
        for f in clean
        if f[0]
        and f[1]
        and f[2].endswith(b"Z")
        and f[2][:4].isdigit()
        and not f[2].startswith(b"2020-13-45")
        and f[3] not in (b"nan", b"inf", b"lots")
        and b"\xe9" not in f[1]
    ]
    assert len(clean) == log.n_clean
    pairs = {(f[0], f[1]) for f in clean}
    assert log.n_clean - len(pairs) == log.n_duplicates


def test_deterministic_for_a_seed(tmp_path) -> None:
    a = generate_viewing_log(tmp_path / "a", users=50, items=40, events=500, seed=1)
    b = generate_viewing_log(tmp_path / "b", users=50, items=40, events=500, seed=1)
    c = generate_viewing_log(tmp_path / "c", users=50, items=40, events=500, seed=2)
    assert a.events_path.read_bytes() == b.events_path.read_bytes()
    assert a.titles_path.read_bytes() == b.titles_path.read_bytes()
    assert a.events_path.read_bytes() != c.events_path.read_bytes()


def test_users_watch_the_genres_they_like(tmp_path) -> None:
    import pyarrow.csv as pacsv

    log = generate_viewing_log(
        tmp_path, users=300, items=200, events=20000, dirty_fraction=0.0, seed=0
    )
    events = pacsv.read_csv(log.events_path).to_pandas()
    titles = pacsv.read_csv(log.titles_path).to_pandas().set_index("title_id")
    user = events["user_id"].str[1:].astype(int).to_numpy()
    genres = titles.loc[events["title_id"], "genres"].str.split("|").to_numpy()
    top = np.argmax(log.user_genres, axis=1)
    in_top = np.mean([GENRES[top[u]] in g for u, g in zip(user, genres, strict=True)])
    # a user's favourite genre carries most of their taste; chance would be ~1.5/16
    assert in_top > 0.4


def test_bad_sizes_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--users must be >= 1, got 0"):
        generate_viewing_log(tmp_path, users=0)
    with pytest.raises(ConfigError, match=f"--items must be >= {len(GENRES)}"):
        generate_viewing_log(tmp_path, items=3)
