"""Which files to read and how: paths, globs and folders -> one :class:`SourceSpec` per file.

Detection looks at names first (MovieLens and LightGCN files as published, extensions), then at
the first lines of the file (at most :data:`SAMPLE_BYTES`): a Parquet magic number, a JSON object,
whitespace-separated integer lists (LightGCN), or the delimiter that splits every sampled line
into the same number of fields. Only this sample is read in Python; every row is read by the
engine. Column roles (user, item, time, value) come from the config, else from well-known names,
else - for files without a header - from positions (user, item, value, time).

Paths are local (:class:`pathlib.Path`) unless ``plan_sources`` is given other
:class:`~recscale.ingest.files.Files`: the Spark engine passes its Hadoop filesystems, whose paths
have the same methods, so detection reads the bytes the engine will read.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import re
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from recscale.config import IngestConfig
from recscale.errors import FormatError, SchemaError, SourceNotFoundError
from recscale.ingest.files import LOCAL_FILES, Files

if TYPE_CHECKING:  # pragma: no cover - types only
    from recscale.ingest.hadoop import HadoopPath

    SourcePath = Path | HadoopPath

__all__ = [
    "FORMATS",
    "ROLES",
    "ROLE_NAMES",
    "MetaSpec",
    "Plan",
    "SourceSpec",
    "plan_sources",
]

FORMATS = ("csv", "tsv", "jsonl", "parquet", "movielens", "lightgcn")
ROLES = ("user", "item", "time", "value")
SAMPLE_BYTES = 1 << 18
SAMPLE_LINES = 2000

#: Column names recognised for each role, compared lower-case with '_', '-' and spaces removed.
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "user": (
        "user",
        "userid",
        "useridx",
        "uid",
        "visitorid",
        "customerid",
        "memberid",
        "reviewerid",
    ),
    "item": (
        "item",
        "itemid",
        "itemidx",
        "iid",
        "movieid",
        "artistid",
        "productid",
        "trackid",
        "songid",
        "asin",
        "businessid",
    ),
    "time": ("timestamp", "ts", "time", "datetime", "date", "eventtime", "createdat", "unixtime"),
    "value": (
        "rating",
        "value",
        "weight",
        "count",
        "score",
        "plays",
        "playcount",
        "clicks",
        "stars",
    ),
}
#: Value columns whose numbers are counts, not ratings (``value_kind``).
COUNT_NAMES = ("weight", "count", "plays", "playcount", "clicks")

_DELIMITERS = ("\t", "::", ",", ";", "|", " ")
_QUOTED = (",", ";", "|", "\t")
_ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One input file of interactions and how to read it."""

    path: SourcePath
    format: str  # one of FORMATS, as recorded in the manifest
    kind: str  # reader: "delimited", "jsonl", "lightgcn" or "parquet"
    columns: tuple[str, ...] = ()
    roles: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    delimiter: str | None = None
    quoted: bool = False  # csv-style double quotes around fields
    header: bool = False
    ids_int: bool = False  # ids must be integers (MovieLens, LightGCN, id_type="int")
    column_types: Mapping[str, str] = dataclasses.field(default_factory=dict)  # parquet
    part: str | None = None  # "train"/"test" of a LightGCN folder's given split

    @property
    def skip(self) -> int:
        """Physical lines before the first data line."""
        return 1 if self.header else 0

    def position(self, role: str) -> int | None:
        """0-based field index of a role in a delimited file."""
        name = self.roles.get(role)
        return None if name is None else self.columns.index(name)

    def describe(self) -> dict[str, object]:
        """The resolved reading options, as recorded in the manifest."""
        out: dict[str, object] = {"path": str(self.path), "format": self.format}
        if self.kind == "delimited":
            out.update(delimiter=self.delimiter, header=self.header, quoted=self.quoted)
        out["columns"] = dict(self.roles)
        if self.part:
            out["part"] = self.part
        return out


@dataclasses.dataclass(frozen=True)
class MetaSpec:
    """A file of item or user features (titles, genres, demographics)."""

    path: SourcePath
    kind: str  # "ml100k-items", "ml100k-users", "ml1m-items", "ml1m-users", "table"
    target: str  # "items" or "users"
    id_col: str | None = None  # "table": the id column
    genre_names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything ingest reads, resolved and checked before any row is read."""

    sources: tuple[SourceSpec, ...]
    items_meta: tuple[MetaSpec, ...] = ()
    users_meta: tuple[MetaSpec, ...] = ()
    given_split: bool = False

    def value_kind(self, config: IngestConfig) -> str:
        if config.dedupe == "count":
            return "count"
        names = {s.roles.get("value") for s in self.sources}
        if names == {None}:
            return "implicit"
        if all(n is not None and _norm(n) in COUNT_NAMES for n in names - {None}):
            return "count"
        return "rating"


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


# --------------------------------------------------------------------------- reading a sample


def _head(path: SourcePath) -> tuple[list[str], bool]:
    """The first lines of a file (decoded leniently, for sniffing only) and whether that is all."""
    try:
        with path.open("rb") as raw:
            if path.name.endswith(".gz"):
                with gzip.GzipFile(fileobj=raw, mode="rb") as fh:
                    data = fh.read(SAMPLE_BYTES + 1)
            else:
                data = raw.read(SAMPLE_BYTES + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise FormatError(f"{path}: cannot be read as a gzip-compressed file: {exc}") from None
    complete = len(data) <= SAMPLE_BYTES
    lines = data[:SAMPLE_BYTES].split(b"\n")
    if not complete:
        lines = lines[:-1]  # the last line is cut
    if lines and lines[-1] == b"":
        lines = lines[:-1]
    text = [
        line.rstrip(b"\r").decode("utf-8", errors="replace").lstrip("\ufeff")
        for line in lines[:SAMPLE_LINES]
    ]
    return text, complete and len(lines) <= SAMPLE_LINES


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _split(line: str, delimiter: str) -> list[str]:
    if delimiter == " ":
        return line.split()
    if delimiter in _QUOTED and '"' in line:
        try:
            return next(csv.reader(io.StringIO(line), delimiter=delimiter))
        except (csv.Error, StopIteration):
            pass
    return line.split(delimiter)


def _sniff_delimiter(lines: list[str]) -> str | None:
    """The candidate that splits the most sampled lines into the same number (>= 2) of fields.

    Ties go to the earlier candidate; at least half the lines must agree.
    """
    data = [line for line in lines if line.strip()]
    best: tuple[float, str] | None = None
    for delim in _DELIMITERS:
        if not data:
            break
        counts = Counter(len(_split(line, delim)) for line in data)
        mode, hits = counts.most_common(1)[0]
        share = hits / len(data)
        if mode >= 2 and share >= 0.5 and (best is None or share > best[0]):
            best = (share, delim)
    return best[1] if best else None


def _looks_lightgcn(lines: list[str]) -> bool:
    data = [line.split() for line in lines if line.strip()]
    if not data or any(re.search(r"[,;|:\t]", line) for line in lines):
        return False
    if not all(tok.isdigit() for fields in data for tok in fields):
        return False
    counts = {len(f) for f in data}
    return len(counts) > 1 or max(counts) > 4


def _has_header(first: list[str], rest: list[list[str]]) -> bool:
    if any(_norm(f) in names for f in first for names in ROLE_NAMES.values()):
        return True
    for col, text in enumerate(first):
        values = [row[col] for row in rest if col < len(row)]
        numeric = sum(_is_number(v) for v in values)
        if not _is_number(text) and values and numeric >= 0.9 * len(values):
            return True
    return False


# --------------------------------------------------------------------------- roles


def _find_role(
    role: str, columns: Sequence[str], config: IngestConfig, path: SourcePath, header: bool
) -> str | None:
    wanted = getattr(config, f"{role}_col")
    if wanted is not None:
        if wanted in columns:
            return wanted
        hint = "" if header else " (the file has no header, so columns are named by position)"
        raise SchemaError(
            f"{path}: no column {wanted!r} (from {role}_col); the file's columns are: "
            f"{', '.join(columns)}{hint}"
        )
    by_norm = {_norm(c): c for c in reversed(columns)}
    for name in ROLE_NAMES[role]:
        if name in by_norm:
            return by_norm[name]
    return None


def _roles(
    columns: Sequence[str],
    config: IngestConfig,
    path: SourcePath,
    *,
    header: bool,
    sample_rows: Sequence[Sequence[str]] = (),
) -> dict[str, str | None]:
    roles = {r: _find_role(r, columns, config, path, header) for r in ROLES}
    if not header and not any(getattr(config, f"{r}_col") for r in ROLES):
        # no names to go by: the MovieLens convention user, item, rating, timestamp
        taken = set(roles.values())
        free = [c for c in columns if c not in taken]
        for role in ("user", "item"):
            if roles[role] is None and free:
                roles[role] = free.pop(0)
        if len(columns) == 3 and roles["value"] is None and roles["time"] is None and free:
            col = columns.index(free[0])
            values = [r[col] for r in sample_rows if col < len(r)]
            looks_time = bool(values) and all(v.isdigit() and int(v) > 10**8 for v in values)
            roles["time" if looks_time else "value"] = free.pop(0)
        else:
            for role in ("value", "time"):
                if roles[role] is None and free:
                    roles[role] = free.pop(0)
    for role in ("user", "item"):
        if roles[role] is None:
            raise SchemaError(
                f"{path}: cannot tell which column holds the {role} id; the file's columns "
                f"are: {', '.join(columns)}; name it with {role}_col"
            )
    named = [c for c in roles.values() if c is not None]
    if len(set(named)) != len(named):
        raise SchemaError(f"{path}: one column was given two roles: {roles}")
    return roles


# --------------------------------------------------------------------------- one file


def _delimited(
    path: SourcePath,
    config: IngestConfig,
    fmt: str,
    *,
    delimiter: str | None = None,
    header: bool | None = None,
    names: Sequence[str] | None = None,
    ids_int: bool = False,
) -> SourceSpec:
    lines, _ = _head(path)
    if not any(line.strip() for line in lines):
        raise FormatError(f"{path}: the file is empty (no data lines)")
    delim = config.delimiter or delimiter
    if delim is None:
        delim = "\t" if fmt == "tsv" else _sniff_delimiter(lines)
    if delim is None and fmt == "csv":
        delim = ","
    if delim is None:
        raise FormatError(
            f"{path}: cannot detect the field delimiter (tried tab, '::', ',', ';', '|', space); "
            "set delimiter"
        )
    rows = [_split(line, delim) for line in lines if line.strip()]
    has_header = config.header if config.header is not None else header
    if has_header is None:
        has_header = _has_header(rows[0], rows[1:])
    if has_header:
        columns = [c.strip() for c in rows[0]]
        if any(not c for c in columns):
            columns = [c or f"column{i}" for i, c in enumerate(columns)]
        data_rows = rows[1:]
    else:
        width = Counter(len(r) for r in rows).most_common(1)[0][0]
        columns = (
            list(names) if names and len(names) == width else [f"column{i}" for i in range(width)]
        )
        data_rows = rows
    roles = _roles(columns, config, path, header=has_header or bool(names), sample_rows=data_rows)
    return SourceSpec(
        path=path,
        format=fmt if fmt != "auto" else ("tsv" if delim == "\t" else "csv"),
        kind="delimited",
        columns=tuple(columns),
        roles=roles,
        delimiter=delim,
        quoted=delim in _QUOTED,
        header=bool(has_header),
        ids_int=_ids_int(config, ids_int),
    )


def _ids_int(config: IngestConfig, by_format: bool) -> bool:
    """Whether ids must be integers: ``id_type``, where "auto" follows the format."""
    return config.id_type == "int" or (config.id_type == "auto" and by_format)


def _jsonl(path: SourcePath, config: IngestConfig) -> SourceSpec:
    lines, _ = _head(path)
    keys: dict[str, None] = {}
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            keys.update(dict.fromkeys(obj))
    if not keys:
        if not any(line.strip() for line in lines):
            raise FormatError(f"{path}: the file is empty (no data lines)")
        raise FormatError(f"{path}: no JSON object in the first lines; expected JSON Lines")
    columns = tuple(keys)
    return SourceSpec(
        path=path,
        format="jsonl",
        kind="jsonl",
        columns=columns,
        roles=_roles(columns, config, path, header=True),
        ids_int=_ids_int(config, False),
    )


def _arrow_kind(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "float"
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "timestamp"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_dictionary(t):
        return _arrow_kind(t.value_type)
    return "other"


def _parquet(path: SourcePath, config: IngestConfig) -> SourceSpec:
    try:
        with path.open("rb") as fh:
            schema = pq.read_schema(fh)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FormatError(f"{path}: not a readable Parquet file: {exc}") from None
    columns = tuple(schema.names)
    if not columns:
        raise FormatError(f"{path}: the Parquet file has no columns")
    return SourceSpec(
        path=path,
        format="parquet",
        kind="parquet",
        columns=columns,
        roles=_roles(columns, config, path, header=True),
        column_types={f.name: _arrow_kind(f.type) for f in schema},
        ids_int=_ids_int(config, False),
    )


def _lightgcn(path: SourcePath, config: IngestConfig, part: str | None = None) -> SourceSpec:
    lines, _ = _head(path)
    if not any(line.strip() for line in lines):
        raise FormatError(f"{path}: the file is empty (no data lines)")
    return SourceSpec(
        path=path,
        format="lightgcn",
        kind="lightgcn",
        columns=("user", "item"),
        roles={"user": "user", "item": "item", "time": None, "value": None},
        ids_int=_ids_int(config, True),
        part=part,
    )


_ML100K_RATINGS = re.compile(r"^(u\.data|u[1-5]\.(base|test)|u[ab]\.(base|test))$")
_ML1M_RATINGS = re.compile(r"^ratings.*\.dat$")


def _movielens_file(path: SourcePath, config: IngestConfig) -> tuple[SourceSpec, list[MetaSpec]]:
    """A MovieLens ratings file, plus the metadata files published next to it."""
    name = _strip_gz(path.name)
    folder = path.parent
    meta: list[MetaSpec] = []
    if _ML100K_RATINGS.match(name) or name.endswith(".data"):
        spec = _delimited(
            path,
            config,
            "movielens",
            delimiter="\t",
            header=False,
            names=("user_id", "item_id", "rating", "timestamp"),
            ids_int=True,
        )
        if (folder / "u.item").is_file():
            genres = _ML100K_GENRES
            if (folder / "u.genre").is_file():
                text = (folder / "u.genre").read_text(encoding="latin-1")
                parsed = [ln.split("|")[0] for ln in text.splitlines() if "|" in ln]
                genres = tuple(parsed) if len(parsed) == 19 else genres
            meta.append(MetaSpec(folder / "u.item", "ml100k-items", "items", genre_names=genres))
        if (folder / "u.user").is_file():
            meta.append(MetaSpec(folder / "u.user", "ml100k-users", "users"))
        return spec, meta
    if name.endswith(".dat"):
        spec = _delimited(
            path,
            config,
            "movielens",
            delimiter="::",
            header=False,
            names=("UserID", "MovieID", "Rating", "Timestamp"),
            ids_int=True,
        )
        if (folder / "movies.dat").is_file():
            meta.append(MetaSpec(folder / "movies.dat", "ml1m-items", "items"))
        if (folder / "users.dat").is_file():
            meta.append(MetaSpec(folder / "users.dat", "ml1m-users", "users"))
        return spec, meta
    spec = _delimited(path, config, "movielens", delimiter=",", ids_int=True)
    if (folder / "movies.csv").is_file():
        meta.append(MetaSpec(folder / "movies.csv", "table", "items", id_col="movieId"))
    return spec, meta


def _detect_file(path: SourcePath, config: IngestConfig) -> tuple[list[SourceSpec], list[MetaSpec]]:
    fmt = config.format
    name = _strip_gz(path.name).lower()
    folder = path.parent
    if fmt == "parquet":
        return [_parquet(path, config)], []
    if fmt == "jsonl":
        return [_jsonl(path, config)], []
    if fmt == "lightgcn":
        return [_lightgcn(path, config)], []
    if fmt == "movielens":
        spec, meta = _movielens_file(path, config)
        return [spec], meta
    if fmt in ("csv", "tsv"):
        return [_delimited(path, config, fmt)], []
    # auto: names first
    if name.endswith((".parquet", ".pq")):
        return [_parquet(path, config)], []
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return [_jsonl(path, config)], []
    if _ML100K_RATINGS.match(name) or _ML1M_RATINGS.match(name):
        spec, meta = _movielens_file(path, config)
        return [spec], meta
    if name == "ratings.csv" and (folder / "movies.csv").is_file():
        spec, meta = _movielens_file(path, config)
        return [spec], meta
    if name in ("train.txt", "test.txt"):
        return [_lightgcn(path, config)], []
    if name == "user_artists.dat":
        artists = [p for p in (folder / "artists.dat", folder / "artists.dat.gz") if p.is_file()]
        meta = [MetaSpec(artists[0], "table", "items", id_col="id")] if artists else []
        return [_delimited(path, config, "tsv")], meta
    if name.endswith(".csv"):
        return [_delimited(path, config, "csv")], []
    if name.endswith((".tsv", ".tab")):
        return [_delimited(path, config, "tsv")], []
    # then content
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic == b"PAR1":
        return [_parquet(path, config)], []
    lines, _ = _head(path)
    data = [line for line in lines if line.strip()]
    if not data:
        raise FormatError(f"{path}: the file is empty (no data lines)")
    sample = "".join(data[:200])
    control = sum(ch < " " and ch != "\t" for ch in sample) + sample.count("\ufffd")
    if "\x00" in sample or control > 0.05 * len(sample):
        raise FormatError(
            f"{path}: cannot detect the format; the file looks binary; formats allowed: "
            f"{', '.join(FORMATS)}"
        )
    if data[0].lstrip().startswith("{"):
        return [_jsonl(path, config)], []
    if _looks_lightgcn(lines):
        return [_lightgcn(path, config)], []
    if _sniff_delimiter(lines) is not None or config.delimiter:
        return [_delimited(path, config, "auto")], []
    raise FormatError(
        f"{path}: cannot detect the format; formats allowed: {', '.join(FORMATS)} "
        "(set format, or delimiter for delimited text)"
    )


def _first(folder: SourcePath, *names: str) -> SourcePath | None:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _detect_folder(
    folder: SourcePath, config: IngestConfig
) -> tuple[list[SourceSpec], list[MetaSpec], bool]:
    fmt = config.format
    train, test = _first(folder, "train.txt"), _first(folder, "test.txt")
    if fmt in ("auto", "lightgcn") and train and test:
        return [_lightgcn(train, config, "train"), _lightgcn(test, config, "test")], [], True
    ratings = (
        [p for p in [_first(folder, "u.data")] if p]
        or sorted(p for p in folder.iterdir() if _ML1M_RATINGS.match(_strip_gz(p.name)))
        or [p for p in [_first(folder, "ratings.csv")] if p]
    )
    if fmt in ("auto", "movielens") and ratings:
        specs, meta = [], []
        for path in ratings:
            spec, m = _movielens_file(path, dataclasses.replace(config, format="movielens"))
            specs.append(spec)
            meta = meta or m
        return specs, meta, False
    lastfm = _first(folder, "user_artists.dat")
    if fmt == "auto" and lastfm:
        specs, meta = _detect_file(lastfm, config)
        return specs, meta, False
    parquet = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    if fmt in ("auto", "parquet") and parquet:
        return [_parquet(p, config) for p in parquet], [], False
    if fmt in ("csv", "tsv", "jsonl"):
        ext = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl"}[fmt]
        files = sorted(p for p in folder.rglob(f"*{ext}*") if p.is_file())
        if files:
            return [s for p in files for s in _detect_file(p, config)[0]], [], False
    raise FormatError(
        f"{folder}: cannot tell the format of this folder; expected a LightGCN folder "
        "(train.txt + test.txt), a MovieLens folder (u.data, ratings*.dat or ratings.csv) or "
        f"a folder of .parquet files; formats allowed: {', '.join(FORMATS)}"
    )


def _expand(source: str | Path, files: Files) -> list[SourcePath]:
    text = str(source)
    if any(ch in text for ch in "*?["):
        matches = sorted(p for p in files.glob(text) if p.is_file())
        if not matches:
            raise SourceNotFoundError(f"source {text!r} matches no file")
        return matches
    path = files.path(text)
    if not path.exists():
        raise SourceNotFoundError(f"source {text!r} does not exist")
    return [path]


def _meta_file(path: str, target: str, config: IngestConfig, files: Files) -> MetaSpec:
    file = files.path(path)
    if not file.is_file():
        raise SourceNotFoundError(f"{target}_file {path!r} does not exist")
    return MetaSpec(
        file,
        "table",
        target,
        id_col=getattr(config, "item_col" if target == "items" else "user_col"),
    )


def plan_sources(
    sources: Sequence[str | Path], config: IngestConfig, *, files: Files = LOCAL_FILES
) -> Plan:
    """Resolve ``sources`` (files, globs, folders) into what to read; nothing is read but samples.

    ``files`` says where paths live (local files by default).
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise SourceNotFoundError("no source given: pass at least one file, glob or folder")
    specs: list[SourceSpec] = []
    items: list[MetaSpec] = []
    users: list[MetaSpec] = []
    given = False
    for source in sources:
        for path in _expand(source, files):
            if path.is_dir():
                found, meta, is_given = _detect_folder(path, config)
                given = given or is_given
            else:
                found, meta = _detect_file(path, config)
            specs.extend(found)
            items.extend(m for m in meta if m.target == "items")
            users.extend(m for m in meta if m.target == "users")
    seen: set[SourcePath] = set()
    unique = []
    for spec in specs:
        key = spec.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(spec)
    if config.items_file:
        items.append(_meta_file(config.items_file, "items", config, files))
    if config.users_file:
        users.append(_meta_file(config.users_file, "users", config, files))
    # one metadata file per path is enough
    items = list({m.path.resolve(): m for m in items}.values())
    users = list({m.path.resolve(): m for m in users}.values())
    return Plan(tuple(unique), tuple(items), tuple(users), given and len(unique) == 2)
