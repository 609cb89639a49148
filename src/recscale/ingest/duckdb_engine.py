"""The DuckDB engine of ingest: every row is read, checked, deduplicated and written by SQL.

Pipeline (each step one or a few SQL statements; Python only builds SQL and handles batches):

1. **stage**: each source is read into the table ``staged``, one row per input row, with the
   canonical columns of :mod:`recscale.ingest.rules` evaluated and the first failing rule's
   reason. Text is read line by line (``read_csv`` with one column and no quoting), so a row
   maps to its physical line: ``staged`` keeps insertion order, so a row's line is its rowid
   offset within the source, shifted by the lines the reader itself refused (invalid UTF-8),
   which DuckDB reports with their physical line numbers. Only rejected rows keep their raw text.
2. **id maps**: distinct ids of accepted rows get provisional dense indices (ascending numeric
   order when every id of the role is an integer, else ascending string order; in append mode
   after the existing ones, which keep theirs).
3. **dedupe**: accepted rows are joined to the maps and sorted by (user, item, policy order);
   one streaming pass keeps the first row of each pair (keep-first/keep-last) or an aggregate
   sums them (sum/count).
4. **k-core** (optional): pairs of users/items below the minimum are marked round by round until
   stable; if any were removed the indices are compacted.
5. **write**: interactions (in (user_idx, item_idx) order), users, items, the given split,
   rejected rows with their line numbers and raw text.

Everything runs under ``memory_limit`` with ``temp_directory`` for spilling, so inputs larger
than memory are ingested out-of-core.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from recscale.config import IngestConfig
from recscale.dataset import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    REJECTED_SCHEMA,
    USERS_SCHEMA,
    Dataset,
    write_parquet_parts,
)
from recscale.errors import ConfigError, FormatError, InputError, SchemaError
from recscale.ingest import rules
from recscale.ingest.common import EngineResult, Progress, line_limit, rule_params, tally
from recscale.ingest.sources import ROLE_NAMES, MetaSpec, Plan, SourceSpec, _norm

__all__ = ["EngineResult", "run_duckdb"]

_LINE_DELIM = "\x01"  # never a field separator: each physical line is one value
_OLD_SRC = -1  # staged rows of an existing dataset (append mode)
_BATCH = 1 << 20


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclasses.dataclass
class SourceRun:
    """What was read from one source."""

    spec: SourceSpec
    src: int
    base: int = 0  # first rowid in ``staged``
    lines: int = 0
    seconds: float = 0.0
    strict: bool = True  # read in DuckDB's strict CSV mode (exact line numbers)


class DuckDBIngest:
    """One ingest run on one DuckDB connection (in memory, spilling to ``workdir``)."""

    def __init__(self, config: IngestConfig, workdir: Path, progress: bool) -> None:
        self.config = config
        self.say = Progress(progress)
        self.con = duckdb.connect()
        try:
            self.con.execute(f"SET memory_limit = {_lit(config.memory_limit)}")
        except duckdb.Error as exc:
            self.con.close()
            raise ConfigError(
                f"ingest: memory_limit {config.memory_limit!r} is not a memory size "
                f"(expected e.g. '2GB' or '500MB'): {exc}"
            ) from None
        self.con.execute(f"SET temp_directory = {_lit(str(workdir))}")
        if config.threads is not None:
            self.con.execute(f"SET threads = {int(config.threads)}")
        self.con.execute("SET enable_progress_bar = false")
        self.con.execute("SET TimeZone = 'UTC'")
        # row order of `staged` is what maps a row to its line
        self.con.execute("SET preserve_insertion_order = true")
        # the CSV reader holds a buffer per thread; a line longer than it is a bad_line
        self.buffer = line_limit(config)
        self.runs: list[SourceRun] = []
        self.warnings: list[str] = []
        self.ts_offset = 0  # order_from_input: the largest ts staged before the current source

    # ----------------------------------------------------------------- helpers

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        return self.con.execute(query).fetchall()

    def sql1(self, query: str) -> Any:
        return self.con.execute(query).fetchall()[0][0]

    def close(self) -> None:
        self.con.close()

    def _lines(self, path: Path, skip: int, tag: str, strict: bool = True) -> str:
        """Each physical line as one value ``raw`` (no quoting, no field splitting)."""
        return (
            f"read_csv({_lit(str(path))}, columns={{'raw': 'VARCHAR'}}, delim={_lit(_LINE_DELIM)}, "
            f"quote='', escape='', header=false, auto_detect=false, skip={skip}, "
            f"store_rejects=true, rejects_table={_lit(tag + '_err')}, "
            f"rejects_scan={_lit(tag + '_scan')}, buffer_size={self.buffer}, "
            f"max_line_size={self.buffer}{'' if strict else ', strict_mode=false'})"
        )

    # ----------------------------------------------------------------- staging

    def create_staged(self) -> None:
        self.con.execute(
            "CREATE TABLE staged (src INTEGER, ln BIGINT, raw VARCHAR, reason VARCHAR, "
            "detail VARCHAR, u_int BIGINT, u_str VARCHAR, i_int BIGINT, i_str VARCHAR, "
            "ts BIGINT, value DOUBLE)"
        )

    def stage_existing(self, existing: Dataset) -> int:
        """Existing interactions go first, so in input order they precede every new row."""
        inter = _lit(str(existing.path / "interactions" / "part-*.parquet"))
        users = _lit(str(existing.path / "users.parquet"))
        items = _lit(str(existing.path / "items.parquet"))
        self.con.execute(
            f"""INSERT INTO staged
            SELECT {_OLD_SRC}, NULL, NULL, NULL, NULL,
                {_id_int("u.user_id")}, CASE WHEN {_id_int("u.user_id")} IS NULL THEN u.user_id END,
                {_id_int("i.item_id")}, CASE WHEN {_id_int("i.item_id")} IS NULL THEN i.item_id END,
                x.ts, x.value
            FROM read_parquet({inter}) x
            JOIN read_parquet({users}) u ON u.user_idx = x.user_idx
            JOIN read_parquet({items}) i ON i.item_idx = x.item_idx"""
        )
        return int(self.sql1(f"SELECT count(*) FROM staged WHERE src = {_OLD_SRC}"))

    def stage(self, spec: SourceSpec, src: int) -> SourceRun:
        run = SourceRun(spec, src, base=int(self.sql1("SELECT count(*) FROM staged")))
        if self.config.order_from_input:
            time_col = spec.roles.get("time")
            if time_col is not None:
                raise ConfigError(
                    f"ingest: {spec.path} has a time column {time_col!r} and order_from_input is "
                    "set; order_from_input is for sources without one (drop it to use the column)"
                )
            # a later file (or rows appended to a dataset) comes after everything before it
            self.ts_offset = int(self.sql1("SELECT coalesce(max(ts), 0) FROM staged"))
        start = time.perf_counter()
        try:
            if spec.kind == "parquet":
                self.con.execute(self._parquet_sql(spec, src))
            else:
                tag = f"rej_{src}"
                try:
                    self.con.execute(self._text_sql(spec, src, tag))
                except duckdb.InvalidInputException as exc:
                    if "invalid state" not in str(exc):
                        raise
                    # mixed \n and \r\n line ends: DuckDB reads them only in non-strict mode,
                    # where a \r\n also counts as an empty line, so later line numbers shift
                    run.strict = False
                    self.warnings.append(
                        f"{spec.path} mixes \\n and \\r\\n line ends: its rows are read, "
                        "but line numbers in rejected/ may be too high after the first \\r\\n; "
                        "normalise the line ends for exact line numbers"
                    )
                    self.say(self.warnings[-1])
                    self.con.execute(f"DROP TABLE IF EXISTS {tag}_err")
                    self.con.execute(f"DROP TABLE IF EXISTS {tag}_scan")
                    self.con.execute(self._text_sql(spec, src, tag, strict=False))
                self._reader_rejects(src, tag)
        except duckdb.OutOfMemoryException as exc:
            raise self._oom(exc) from None
        except duckdb.Error as exc:
            if spec.kind == "parquet":
                raise FormatError(f"{spec.path}: not a readable Parquet file: {exc}") from None
            raise FormatError(f"{spec.path}: cannot be read as {spec.format}: {exc}") from None
        run.seconds = time.perf_counter() - start
        run.lines = int(self.sql1("SELECT count(*) FROM staged")) - run.base
        rate = run.lines / run.seconds if run.seconds > 0 else float("inf")
        self.say(f"{spec.path}: {run.lines:,} rows in {run.seconds:.2f}s ({rate:,.0f} rows/s)")
        self.runs.append(run)
        return run

    def _oom(self, exc: Exception) -> ConfigError:
        return ConfigError(
            f"ingest: DuckDB ran out of memory under memory_limit={self.config.memory_limit!r}; "
            f"raise memory_limit or free disk space for spilling: {exc}"
        )

    def _rules_sql(
        self,
        base: str,
        spec: SourceSpec,
        src: int,
        *,
        blank: str,
        expected: int | None = None,
        overrides: dict[str, str] | None = None,
        ln: str = "NULL::BIGINT",
        raw: str = "raw",
    ) -> str:
        """``INSERT INTO staged`` from ``base`` (a query giving the text columns)."""
        params = rule_params(spec, self.config, expected)
        overrides = overrides or {}
        ctes = [f"b AS ({base})"]
        prev = "b"
        for i, (name, expr) in enumerate(rules.DERIVED):
            expr = overrides.get(name, rules.render(expr, params))
            ctes.append(f"d{i} AS (SELECT *, {expr} AS {name} FROM {prev})")
            prev = f"d{i}"
        if self.config.order_from_input:
            # `pos`: the row's 1-based position in its file, computed by the base query
            ts = f"{self.ts_offset} + pos"
        elif "ts" in overrides:
            ts = overrides["ts"]
        elif self.config.time_format:
            ts = (
                "CASE WHEN time_text IS NULL OR trim(time_text) = '' THEN NULL ELSE "
                + rules.render(rules.TIME_FORMAT_SQL, params)
                + " END"
            )
        else:
            ts = rules.TIME_SQL
        value = overrides.get("value", rules.VALUE_SQL if params["has_value"] else "1.0::DOUBLE")
        ctes.append(f"t AS (SELECT *, {ts} AS ts, {value} AS value FROM {prev})")
        own = {"delimited": "field_count", "jsonl": "bad_json"}.get(spec.kind)
        active = [
            r for r in rules.RULES if r.reason not in ("field_count", "bad_json") or r.reason == own
        ]
        whens = " ".join(f"WHEN {rules.render(r.when, params)} THEN '{r.reason}'" for r in active)
        details = " ".join(
            f"WHEN '{r.reason}' THEN {rules.render(r.detail, params)}" for r in active
        )
        ctes.append(f"r AS (SELECT *, CASE WHEN {blank} THEN 'blank' {whens} END AS reason FROM t)")
        return (
            "INSERT INTO staged WITH "
            + ", ".join(ctes)
            + f""" SELECT {src}, {ln},
                CASE WHEN reason IS NOT NULL AND reason <> 'blank' THEN {raw} END,
                reason,
                CASE WHEN reason IS NOT NULL AND reason <> 'blank' THEN CASE reason {details} END END,
                u_int, u_str, i_int, i_str, ts, value
            FROM r"""
        )

    def _text_sql(self, spec: SourceSpec, src: int, tag: str, strict: bool = True) -> str:
        lines = self._lines(spec.path, spec.skip, tag, strict)
        if spec.kind == "lightgcn":
            base = f"""
                WITH l AS (SELECT row_number() OVER () AS rn, raw FROM {lines}),
                t AS (SELECT rn, raw, CASE WHEN raw IS NULL THEN ['']
                        WHEN contains(raw, '  ') OR contains(raw, '\t')
                            THEN regexp_split_to_array(trim(raw), '\\s+')
                        ELSE string_split(trim(raw), ' ') END AS f FROM l)
                -- blank is decided per line: a line can be long and unnests into many rows
                SELECT rn, raw, f[1] = '' AS is_blank, NULL::INTEGER AS n_fields, TRUE AS json_ok,
                    f[1] AS user_text,
                    unnest(CASE WHEN len(f) <= 1 THEN [NULL::VARCHAR] ELSE f[2:] END) AS item_text,
                    NULL::VARCHAR AS time_text, NULL::VARCHAR AS value_text
                FROM t"""
            if self.config.order_from_input:
                # a line lists many items: positions number the (user, item) pairs, not lines
                base = f"SELECT *, row_number() OVER () AS pos FROM ({base})"
            return self._rules_sql(base, spec, src, blank="is_blank", ln="rn")
        # order_from_input: the physical line number (the lines before the first row counted)
        pos = f", row_number() OVER () + {spec.skip} AS pos" if self.config.order_from_input else ""
        keep = ", pos" if pos else ""
        if spec.kind == "jsonl":

            def field(role: str) -> str:
                name = spec.roles.get(role)
                if name is None:
                    return "NULL::VARCHAR"
                path = _lit('$."' + name.replace("\\", "\\\\").replace('"', '\\"') + '"')
                return f"obj ->> {path}"

            # JSON functions only ever see valid JSON: a malformed line is a row, not an error
            base = f"""
                WITH l0 AS (SELECT raw, CASE WHEN json_valid(raw) THEN raw END AS j{pos}
                    FROM {lines}),
                l AS (SELECT raw, coalesce(json_type(j) = 'OBJECT', false) AS json_ok,
                    CASE WHEN json_type(j) = 'OBJECT' THEN j END AS obj{keep} FROM l0)
                SELECT raw, NULL::INTEGER AS n_fields, json_ok{keep}, {field("user")} AS user_text,
                    {field("item")} AS item_text, {field("time")} AS time_text,
                    {field("value")} AS value_text
                FROM l"""
            return self._rules_sql(
                base, spec, src, blank="raw IS NULL OR (NOT json_ok AND trim(raw) = '')"
            )
        # delimited text
        delim = spec.delimiter or ","
        split_source = "NULL::VARCHAR[]"
        if delim == " ":
            split = "regexp_split_to_array(trim(raw), '\\s+')"
        elif spec.quoted:
            d = re.escape(delim) if delim != "\t" else "\t"
            pattern = _lit(f'{d}("(?:[^"]|"")*"|[^{d}]*)')
            unquote = (
                "lambda x: CASE WHEN length(x) >= 2 AND starts_with(x, '\"') "
                "AND ends_with(x, '\"') THEN replace(x[2:-2], '\"\"', '\"') ELSE x END"
            )
            # Fast path: when every field is either quote-free or one quoted run with no quote
            # inside, no delimiter can hide in a quoted field, so a plain split is exact; only the
            # other lines pay for the regular expression.
            simple = (
                "list_bool_and(list_transform(s, lambda x: NOT contains(x, '\"') OR "
                "(length(x) >= 2 AND starts_with(x, '\"') AND ends_with(x, '\"') "
                "AND NOT contains(x[2:-2], '\"'))))"
            )
            split = (
                f"CASE WHEN NOT contains(raw, '\"') THEN s "
                f"WHEN {simple} THEN list_transform(s, {unquote}) "
                f"ELSE list_transform(regexp_extract_all("
                f"{_lit(delim)} || raw, {pattern}, 1), {unquote}) END"
            )
            split_source = f"string_split(raw, {_lit(delim)})"
        else:
            split = f"string_split(raw, {_lit(delim)})"

        def pick(role: str) -> str:
            pos = spec.position(role)
            return "NULL::VARCHAR" if pos is None else f"f[{pos + 1}]"

        base = f"""
            WITH l0 AS (SELECT raw, {split_source} AS s{pos} FROM {lines}),
            l AS (SELECT raw, {split} AS f{keep} FROM l0)
            SELECT raw, len(f) AS n_fields{keep}, TRUE AS json_ok, {pick("user")} AS user_text,
                {pick("item")} AS item_text, {pick("time")} AS time_text,
                {pick("value")} AS value_text
            FROM l"""
        expected = len(spec.columns)
        return self._rules_sql(
            base,
            spec,
            src,
            blank=f"raw IS NULL OR (n_fields <> {expected} AND trim(raw) = '')",
            expected=expected,
        )

    def _reader_rejects(self, src: int, tag: str) -> None:
        """Lines the reader refused, with the physical line numbers DuckDB reports."""
        self.con.execute(
            f"""INSERT INTO staged
            SELECT {src}, line, raw,
                CASE WHEN error_type = 'INVALID ENCODING' THEN 'bad_encoding' ELSE 'bad_line' END,
                CASE error_type WHEN 'INVALID ENCODING' THEN 'not valid UTF-8'
                    WHEN 'TOO MANY COLUMNS' THEN 'contains the control byte 0x01'
                    WHEN 'LINE SIZE OVER MAXIMUM' THEN 'longer than {self.buffer} bytes'
                    ELSE lower(error_type) || ': ' || error_message END,
                NULL, NULL, NULL, NULL, NULL, NULL
            FROM (SELECT line, any_value(csv_line) AS raw, min(error_type) AS error_type,
                         any_value(error_message) AS error_message
                  FROM {tag}_err GROUP BY line) ORDER BY line"""
        )
        self.con.execute(f"DROP TABLE IF EXISTS {tag}_err")
        self.con.execute(f"DROP TABLE IF EXISTS {tag}_scan")

    def _parquet_sql(self, spec: SourceSpec, src: int) -> str:
        types = spec.column_types
        # the file's columns are renamed _c0, _c1, ... so none can clash with a canonical column
        alias = {c: f"_c{j}" for j, c in enumerate(spec.columns)}

        def col(role: str) -> str | None:
            name = spec.roles.get(role)
            return None if name is None else alias[name]

        def text(role: str) -> str:
            c = col(role)
            return "NULL::VARCHAR" if c is None else f"CAST({c} AS VARCHAR)"

        overrides: dict[str, str] = {}
        for role, p in (("user", "u"), ("item", "i")):
            name = spec.roles[role]
            if name is not None and types.get(name) == "int":
                # integer ids need no text round trip
                overrides[f"{p}_cast"] = f"CAST({alias[name]} AS BIGINT)"
                overrides[f"{p}_int"] = f"{p}_cast"
                overrides[f"{p}_str"] = "NULL::VARCHAR"
        time_name = spec.roles.get("time")
        if time_name is not None:
            kind = types.get(time_name)
            c = alias[time_name]
            if kind == "int":
                overrides["ts"] = f"CAST({c} AS BIGINT)"
            elif kind == "float":
                overrides["ts"] = f"TRY_CAST(floor({c}) AS BIGINT)"
            elif kind == "timestamp":
                overrides["ts"] = f"CAST(epoch({c}) AS BIGINT)"
        value_name = spec.roles.get("value")
        if value_name is not None and types.get(value_name) in ("int", "float"):
            overrides["value"] = f"CAST({alias[value_name]} AS DOUBLE)"
        # raw is rendered in the final projection, so only for the rows that keep it (rejected)
        raw = _json_row(spec.columns, alias)
        base = f"""
            SELECT *, NULL::INTEGER AS n_fields, TRUE AS json_ok, {text("user")} AS user_text,
                {text("item")} AS item_text, {text("time")} AS time_text,
                {text("value")} AS value_text, ln AS pos
            FROM (SELECT file_row_number + 1 AS ln,
                    {", ".join(f"{_ident(c)} AS {a}" for c, a in alias.items())}
                  FROM read_parquet({_lit(str(spec.path))}, file_row_number = true))"""
        return self._rules_sql(
            base, spec, src, blank="FALSE", overrides=overrides, ln="ln", raw=raw
        )

    # ----------------------------------------------------------------- id maps

    def build_maps(self, existing: Dataset | None) -> None:
        """Provisional dense indices for every id of an accepted row."""
        for role, p in (("user", "u"), ("item", "i")):
            table = f"{p}map"
            old_n = 0
            old_sql = None
            if existing is not None:
                file = _lit(str(existing.path / f"{role}s.parquet"))
                old_n = int(self.sql1(f"SELECT count(*) FROM read_parquet({file})"))
                old_sql = f"SELECT {role}_idx AS idx, {role}_id AS id FROM read_parquet({file})"
            new_has_str = bool(
                self.sql1(
                    f"SELECT count(*) > 0 FROM (SELECT 1 FROM staged WHERE reason IS NULL "
                    f"AND {p}_str IS NOT NULL AND src <> {_OLD_SRC} LIMIT 1)"
                )
            )
            old_has_str = bool(
                old_sql is not None
                and self.sql1(f"SELECT count(*) > 0 FROM ({old_sql}) WHERE {_id_int('id')} IS NULL")
            )
            by_int = not new_has_str and not old_has_str
            key = _key(p, by_int)
            # new ids are ordered numerically when all of them are integers
            order = f"{p}_int" if not new_has_str else "k"
            distinct = f"""SELECT DISTINCT {key} AS k, {p}_int FROM staged
                WHERE reason IS NULL AND src <> {_OLD_SRC}"""
            if old_sql is not None:
                old_key = _id_int("id") if by_int else "id"
                self.con.execute(
                    f"CREATE TABLE {table}_old AS SELECT {old_key} AS k, idx FROM ({old_sql})"
                )
                distinct = f"SELECT * FROM ({distinct}) ANTI JOIN {table}_old USING (k)"
            new = f"""SELECT k, {old_n} + row_number() OVER (ORDER BY {order}) - 1 AS idx
                FROM ({distinct})"""
            if old_sql is not None:
                self.con.execute(
                    f"""CREATE TABLE {table} AS
                    SELECT k, CAST(idx AS INTEGER) AS idx FROM {table}_old
                    UNION ALL SELECT k, CAST(idx AS INTEGER) FROM ({new})"""
                )
            else:
                self.con.execute(
                    f"CREATE TABLE {table} AS SELECT k, CAST(idx AS INTEGER) AS idx FROM ({new})"
                )
            setattr(self, f"{p}_by_int", by_int)
            setattr(self, f"{p}_old_n", old_n)

    def _joined(self, where: str = "s.reason IS NULL") -> str:
        return f"""SELECT um.idx AS user_idx, im.idx AS item_idx, s.ts, s.value, s.src,
                s.rowid AS rid
            FROM staged s
            JOIN umap um ON um.k = {_key("u", self.u_by_int, "s")}
            JOIN imap im ON im.k = {_key("i", self.i_by_int, "s")}
            WHERE {where}"""

    # ----------------------------------------------------------------- dedupe, k-core

    def dedupe(self) -> None:
        policy = self.config.dedupe
        try:
            if policy in ("keep-last", "keep-first", "none"):
                tie = (
                    "ts DESC NULLS LAST, rid DESC"
                    if policy == "keep-last"
                    else "ts ASC NULLS FIRST, rid ASC"
                )
                self.con.execute(
                    f"CREATE TABLE sorted AS {self._joined()} ORDER BY user_idx, item_idx, {tie}"
                )
                first = (
                    ""
                    if policy == "none"
                    else "QUALIFY lag(user_idx) OVER () IS DISTINCT FROM user_idx "
                    "OR lag(item_idx) OVER () IS DISTINCT FROM item_idx"
                )
                self.con.execute(
                    f"""CREATE TABLE pairs AS SELECT user_idx, item_idx, ts, value, src,
                        NULL::INTEGER AS removed FROM sorted {first}"""
                )
                self.con.execute("DROP TABLE sorted")
            else:
                weight = (
                    "value"
                    if policy == "sum"
                    else f"CASE WHEN src = {_OLD_SRC} THEN value ELSE 1 END"
                )
                self.con.execute(
                    f"""CREATE TABLE pairs AS
                    SELECT user_idx, item_idx, max(ts) AS ts, sum({weight}) AS value,
                        arg_max(src, rid) AS src, NULL::INTEGER AS removed
                    FROM ({self._joined()}) GROUP BY user_idx, item_idx
                    ORDER BY user_idx, item_idx"""
                )
        except duckdb.OutOfMemoryException as exc:
            raise self._oom(exc) from None

    def kcore(self) -> int:
        """Mark pairs removed by the k-core filter; returns how many were removed."""
        min_u, min_i = self.config.min_user_interactions, self.config.min_item_interactions
        if min_u <= 1 and min_i <= 1:
            return 0
        protect = "TRUE"
        if self.sql1(f"SELECT count(*) FROM staged WHERE src = {_OLD_SRC}"):
            # existing interactions are never removed: their indices are fixed
            self.con.execute(
                f"""CREATE TABLE protected AS SELECT DISTINCT user_idx, item_idx
                FROM ({self._joined(f"s.src = {_OLD_SRC}")})"""
            )
            protect = (
                "NOT EXISTS (SELECT 1 FROM protected pr WHERE pr.user_idx = pairs.user_idx "
                "AND pr.item_idx = pairs.item_idx)"
            )
        removed = 0
        round_ = 0
        while True:
            round_ += 1
            changed = self.sql1(
                f"""UPDATE pairs SET removed = {round_}
                WHERE removed IS NULL AND {protect} AND (
                  user_idx IN (SELECT user_idx FROM pairs WHERE removed IS NULL
                               GROUP BY user_idx HAVING count(*) < {min_u})
                  OR item_idx IN (SELECT item_idx FROM pairs WHERE removed IS NULL
                                  GROUP BY item_idx HAVING count(*) < {min_i}))"""
            )
            if changed == 0:
                break
            removed += changed
        self.say(f"k-core: {removed:,} (user, item) pairs removed in {round_ - 1} rounds")
        return removed

    def finalize(self, removed: int) -> None:
        """``final`` (the interactions) and ``users``/``items`` maps with their final indices."""
        if removed == 0:
            self.con.execute(
                "CREATE VIEW final AS SELECT user_idx, item_idx, ts, value, src FROM pairs "
                "WHERE removed IS NULL"
            )
            for p in ("u", "i"):
                self.con.execute(f"CREATE VIEW {p}final AS SELECT k, idx, idx AS old FROM {p}map")
            return
        for p, role in (("u", "user"), ("i", "item")):
            old_n = getattr(self, f"{p}_old_n")
            self.con.execute(
                f"""CREATE TABLE {p}final AS
                SELECT k, CAST(row_number() OVER (ORDER BY idx) - 1 AS INTEGER) AS idx, idx AS old
                FROM {p}map WHERE idx < {old_n} OR idx IN
                    (SELECT DISTINCT {role}_idx FROM pairs WHERE removed IS NULL)"""
            )
        self.con.execute(
            """CREATE TABLE final AS
            SELECT uf.idx AS user_idx, jf.idx AS item_idx, p.ts, p.value, p.src
            FROM pairs p JOIN ufinal uf ON uf.old = p.user_idx JOIN ifinal jf ON jf.old = p.item_idx
            WHERE p.removed IS NULL ORDER BY user_idx, item_idx, p.ts NULLS FIRST, p.value"""
        )

    # ----------------------------------------------------------------- writing

    def reader(self, query: str, rows: int = _BATCH) -> Iterator[pa.RecordBatch]:
        """Batches of exactly ``rows`` rows (the last may be short): one batch = one row group.

        DuckDB hands out smaller batches than asked for, so they are regrouped here.
        """
        pending: list[pa.RecordBatch] = []
        size = 0
        for batch in self.con.sql(query).to_arrow_reader(rows):
            pending.append(batch)
            size += batch.num_rows
            while size >= rows:
                table = pa.Table.from_batches(pending)
                head, tail = table.slice(0, rows), table.slice(rows)
                yield head.combine_chunks().to_batches(max_chunksize=rows)[0]
                pending = tail.to_batches() if tail.num_rows else []
                size = tail.num_rows
        if size:
            yield pa.Table.from_batches(pending).combine_chunks().to_batches(max_chunksize=rows)[0]

    def write_interactions(self, directory: Path, where: str = "TRUE") -> int:
        rows = self.config.rows_per_group
        return write_parquet_parts(
            self.reader(
                f"SELECT user_idx, item_idx, ts, CAST(value AS FLOAT) AS value FROM final "
                f"WHERE {where}",
                rows,
            ),
            directory,
            INTERACTIONS_SCHEMA,
            rows_per_group=rows,
            rows_per_file=4 * rows,
        )

    def _meta_relation(self, meta: MetaSpec, priority: int) -> str:
        """SQL giving ``id``, ``_prio``, ``_row`` and the feature columns of a metadata file."""
        path = _lit(str(meta.path))
        if meta.kind == "ml100k-items":
            cols = "{" + ", ".join(f"'c{i}': 'VARCHAR'" for i in range(24)) + "}"
            flags = ", ".join(
                f"CASE WHEN c{5 + i} = '1' THEN {_lit(g)} END"
                for i, g in enumerate(meta.genre_names)
            )
            return f"""SELECT c0 AS id, {priority} AS _prio, row_number() OVER () AS _row, c1 AS title,
                list_filter([{flags}], lambda g: g IS NOT NULL) AS genres,
                CAST(try_strptime(c2, '%d-%b-%Y') AS DATE) AS release_date,
                nullif(c4, '') AS imdb_url
                FROM read_csv({path}, delim='|', header=false, quote='', escape='',
                    encoding='latin-1', auto_detect=false, columns={cols}, null_padding=true)"""
        if meta.kind == "ml100k-users":
            return f"""SELECT c0 AS id, {priority} AS _prio, row_number() OVER () AS _row,
                TRY_CAST(c1 AS INTEGER) AS age, c2 AS gender, c3 AS occupation, c4 AS zip_code
                FROM read_csv({path}, delim='|', header=false, quote='', escape='',
                    encoding='latin-1', auto_detect=false, null_padding=true,
                    columns={{'c0': 'VARCHAR', 'c1': 'VARCHAR', 'c2': 'VARCHAR',
                             'c3': 'VARCHAR', 'c4': 'VARCHAR'}})"""
        if meta.kind == "ml1m-items":
            return f"""SELECT c0 AS id, {priority} AS _prio, row_number() OVER () AS _row, c1 AS title,
                string_split(c2, '|') AS genres
                FROM read_csv({path}, delim='::', header=false, quote='', escape='',
                    encoding='latin-1', auto_detect=false, null_padding=true,
                    columns={{'c0': 'VARCHAR', 'c1': 'VARCHAR', 'c2': 'VARCHAR'}})"""
        if meta.kind == "ml1m-users":
            return f"""SELECT c0 AS id, {priority} AS _prio, row_number() OVER () AS _row, c1 AS gender,
                TRY_CAST(c2 AS INTEGER) AS age, TRY_CAST(c3 AS INTEGER) AS occupation,
                c4 AS zip_code
                FROM read_csv({path}, delim='::', header=false, quote='', escape='',
                    encoding='latin-1', auto_detect=false, null_padding=true,
                    columns={{'c0': 'VARCHAR', 'c1': 'VARCHAR', 'c2': 'VARCHAR',
                             'c3': 'VARCHAR', 'c4': 'VARCHAR'}})"""
        return self._table_meta(meta, priority)

    def _table_meta(self, meta: MetaSpec, priority: int) -> str:
        name = meta.path.name.lower().removesuffix(".gz")
        path = _lit(str(meta.path))
        if name.endswith((".parquet", ".pq")):
            source = f"read_parquet({path})"
        elif name.endswith((".jsonl", ".ndjson", ".json")):
            source = f"read_json({path}, format='newline_delimited')"
        else:
            source = f"read_csv({path}, header=true)"
            try:
                self.sql(f"DESCRIBE SELECT * FROM {source}")
                self.sql(f"SELECT count(*) FROM {source}")
            except duckdb.Error:
                # metadata files are often Latin-1 (MovieLens); retry before giving up
                source = f"read_csv({path}, header=true, encoding='latin-1')"
        try:
            described = self.sql(f"DESCRIBE SELECT * FROM {source}")
        except duckdb.Error as exc:
            raise FormatError(f"{meta.path}: cannot read this {meta.target} file: {exc}") from None
        columns = [row[0] for row in described]
        types = {row[0]: row[1] for row in described}
        role = "item" if meta.target == "items" else "user"
        wanted = meta.id_col or getattr(self.config, f"{role}_col")
        by_norm = {_norm(c): c for c in reversed(columns)}
        id_col = (
            wanted
            if wanted in columns
            else next((by_norm[n] for n in ROLE_NAMES[role] if n in by_norm), None)
            or by_norm.get("id")
        )
        if id_col is None:
            raise SchemaError(
                f"{meta.path}: no {role} id column in this {meta.target} file; its columns are: "
                f"{', '.join(columns)}; name it with {role}_col"
            )
        select = [f"CAST({_ident(id_col)} AS VARCHAR) AS id"]
        used = {"id", "_prio", "_row", f"{role}_idx", f"{role}_id"}
        for c in columns:
            if c == id_col:
                continue
            n = _norm(c)
            if n in ("title", "name", "itemname", "movietitle") and "title" not in used:
                select.append(f"{_ident(c)} AS title")
                used.add("title")
            elif n in ("genres", "genre", "tags", "categories") and "genres" not in used:
                expr = _ident(c)
                if types[c] == "VARCHAR":
                    expr = (
                        f"CASE WHEN {expr} IS NULL OR {expr} = '(no genres listed)' "
                        f"THEN []::VARCHAR[] ELSE string_split({expr}, '|') END"
                    )
                select.append(f"{expr} AS genres")
                used.add("genres")
            elif c.lower() not in used:
                select.append(_ident(c))
                used.add(c.lower())
        return (
            f"SELECT {', '.join(select)}, {priority} AS _prio, rowid AS _row "
            f"FROM (SELECT *, row_number() OVER () AS rowid FROM {source})"
        )

    def write_id_table(
        self,
        target: str,
        metas: Sequence[MetaSpec],
        existing: Dataset | None,
        path: Path,
    ) -> list[str]:
        """users.parquet / items.parquet: the final map joined with every metadata file."""
        p, role = ("u", "user") if target == "users" else ("i", "item")
        schema = USERS_SCHEMA if target == "users" else ITEMS_SCHEMA
        ids = f"SELECT idx AS {role}_idx, CAST(k AS VARCHAR) AS {role}_id FROM {p}final"
        relations = [self._meta_relation(meta, prio) for prio, meta in enumerate(metas)]
        if existing is not None:
            old = _lit(str(existing.path / f"{target}.parquet"))
            old_cols = [r[0] for r in self.sql(f"DESCRIBE SELECT * FROM read_parquet({old})")]
            feats = [c for c in old_cols if c not in (f"{role}_idx", f"{role}_id")]
            if feats:
                relations.append(
                    f"SELECT {role}_id AS id, {len(relations)} AS _prio, {role}_idx AS _row, "
                    + ", ".join(_ident(c) for c in feats)
                    + f" FROM read_parquet({old})"
                )
        if not relations:
            query = f"{ids} ORDER BY {role}_idx"
            features: list[str] = []
        else:
            try:
                self.con.execute(
                    f"CREATE TABLE meta_{target} AS "
                    + " UNION ALL BY NAME ".join(f"({r})" for r in relations)
                )
            except duckdb.Error as exc:
                files = ", ".join(str(m.path) for m in metas)
                raise FormatError(f"cannot read the {target} metadata ({files}): {exc}") from None
            features = [
                r[0]
                for r in self.sql(f"DESCRIBE meta_{target}")
                if r[0] not in ("id", "_prio", "_row")
            ]
            # per id, each feature from the first file (then first row) that has it
            aggs = ", ".join(
                f"arg_min({_ident(f)}, (_prio, _row)) FILTER (WHERE {_ident(f)} IS NOT NULL) "
                f"AS {_ident(f)}"
                for f in features
            )
            query = f"""SELECT ids.*, {", ".join("m." + _ident(f) for f in features)}
                FROM ({ids}) ids
                LEFT JOIN (SELECT id, {aggs} FROM meta_{target} GROUP BY id) m
                    ON m.id = ids.{role}_id
                ORDER BY {role}_idx"""
        table = self.con.sql(query).to_arrow_table()
        _write_with_prefix(table, path, schema, self.config.rows_per_group)
        return features

    def rejected(self, directory: Path, kcore_removed: int, sources: Sequence[SourceRun]) -> int:
        """rejected/part-*.parquet: every rejected row with its file, physical line and raw text."""
        self.con.execute(
            "CREATE TABLE srcinfo (src INTEGER, base BIGINT, skip INTEGER, path VARCHAR)"
        )
        if sources:
            self.con.execute(
                "INSERT INTO srcinfo VALUES "
                + ", ".join(
                    f"({r.src}, {r.base}, {r.spec.skip}, {_lit(str(r.spec.path))})" for r in sources
                )
            )
        reader_codes = ", ".join(_lit(c) for c in rules.READER_REASONS)
        # rn: the row's ordinal among the lines the reader kept (lines: as read; parquet: row)
        rows = f"""
            SELECT s.src, s.reason, s.detail, s.raw, s.rowid AS rid,
                CASE WHEN s.reason IN ({reader_codes}) THEN NULL
                     ELSE coalesce(s.ln, s.rowid - i.base + 1) END AS rn,
                CASE WHEN s.reason IN ({reader_codes}) THEN s.ln END AS direct_line
            FROM staged s JOIN srcinfo i USING (src)
            WHERE s.reason IS NOT NULL AND s.reason <> 'blank'"""
        if kcore_removed:
            self._kcore_rows(sources)
            rows += " UNION ALL SELECT src, reason, detail, raw, rid, rn, NULL FROM kc"
        # lines refused by the reader shift every later line: k = the line if none were refused
        self.con.execute(
            f"""CREATE TABLE rdr AS
            SELECT src, kept_before, max(j) AS j FROM (
                SELECT src, ln - row_number() OVER (PARTITION BY src ORDER BY ln) AS kept_before,
                       row_number() OVER (PARTITION BY src ORDER BY ln) AS j
                FROM staged WHERE reason IN ({reader_codes})) GROUP BY ALL"""
        )
        query = f"""
            WITH r AS (SELECT x.*, x.rn + i.skip AS k, i.path FROM ({rows}) x
                       JOIN srcinfo i USING (src))
            SELECT r.path AS source, coalesce(r.direct_line, r.k + coalesce(d.j, 0)) AS line,
                r.raw, r.reason, r.detail
            FROM r ASOF LEFT JOIN rdr d ON r.src = d.src AND r.k > d.kept_before
            ORDER BY r.src, line, r.rid"""
        return write_parquet_parts(self.reader(query), directory, REJECTED_SCHEMA)

    def _kcore_rows(self, sources: Sequence[SourceRun]) -> None:
        """Every accepted row of a removed pair, with its raw text fetched from its file again."""
        min_u, min_i = self.config.min_user_interactions, self.config.min_item_interactions
        detail = _lit(
            f"(user, item) pair removed by the k-core filter (min_user_interactions={min_u}, "
            f"min_item_interactions={min_i}) in round "
        )
        self.con.execute(
            f"""CREATE TABLE kc AS
            SELECT j.src, 'kcore' AS reason, {detail} || CAST(p.removed AS VARCHAR) AS detail,
                NULL::VARCHAR AS raw, j.rid, coalesce(s.ln, j.rid - i.base + 1) AS rn
            FROM ({self._joined(f"s.reason IS NULL AND s.src <> {_OLD_SRC}")}) j
            JOIN pairs p ON p.user_idx = j.user_idx AND p.item_idx = j.item_idx
            JOIN staged s ON s.rowid = j.rid
            JOIN srcinfo i ON i.src = j.src
            WHERE p.removed IS NOT NULL"""
        )
        with_rows = {int(r[0]) for r in self.sql("SELECT DISTINCT src FROM kc")}
        for run in sources:
            if run.src not in with_rows:
                continue
            spec = run.spec
            if spec.kind == "parquet":
                lines = (
                    f"SELECT file_row_number + 1 AS rn, "
                    f"{_json_row(spec.columns, {c: _ident(c) for c in spec.columns})} AS raw "
                    f"FROM read_parquet({_lit(str(spec.path))}, file_row_number = true)"
                )
            else:
                tag = f"rej_again_{run.src}"
                lines = (
                    f"SELECT row_number() OVER () AS rn, raw FROM "
                    f"{self._lines(spec.path, spec.skip, tag, run.strict)}"
                )
            self.con.execute(
                f"""UPDATE kc SET raw = l.raw FROM ({lines}) l
                WHERE kc.src = {run.src} AND kc.rn = l.rn"""
            )

    # ----------------------------------------------------------------- counts

    def counts(self) -> tuple[list[dict[str, int]], dict[str, int], dict[str, int]]:
        rows = self.sql(
            f"""SELECT src, reason, count(*) FROM staged WHERE src <> {_OLD_SRC}
            GROUP BY ALL"""
        )
        return tally(rows, [(r.src, r.spec) for r in self.runs])


def _json_row(columns: Sequence[str], alias: dict[str, str]) -> str:
    """A Parquet row as JSON text, the ``raw`` of a rejected Parquet row."""
    return (
        "CAST(to_json({" + ", ".join(f"{_lit(c)}: {alias[c]}" for c in columns) + "}) AS VARCHAR)"
    )


def _key(p: str, by_int: bool, alias: str = "") -> str:
    """The join key of an id: the integer itself, or the id as text when any id is text."""
    a = f"{alias}." if alias else ""
    return f"{a}{p}_int" if by_int else f"coalesce({a}{p}_str, CAST({a}{p}_int AS VARCHAR))"


def _id_int(expr: str) -> str:
    """The integer form of an id string, when it is written as a canonical integer."""
    return (
        f"CASE WHEN CAST(TRY_CAST({expr} AS BIGINT) AS VARCHAR) = {expr} "
        f"THEN TRY_CAST({expr} AS BIGINT) END"
    )


def _write_with_prefix(table: pa.Table, path: Path, prefix: pa.Schema, rows: int) -> None:
    """Write an id table whose first columns are ``prefix`` (the non-null idx and id)."""
    fields = [prefix.field(i) for i in range(len(prefix))] + list(table.schema)[len(prefix) :]
    schema = pa.schema(fields)
    pq.write_table(table.cast(schema), path, compression="zstd", row_group_size=rows)


def run_duckdb(
    plan: Plan,
    config: IngestConfig,
    out: Path,
    workdir: Path,
    *,
    existing: Dataset | None,
    progress: bool,
) -> EngineResult:
    """Ingest ``plan`` into the (empty) directory ``out``; see the module docstring."""
    from recscale.ingest import quality

    engine = DuckDBIngest(config, workdir, progress)
    try:
        engine.create_staged()
        n_old = engine.stage_existing(existing) if existing is not None else 0
        for src, spec in enumerate(plan.sources):
            engine.stage(spec, src)
        per_source, by_reason, skipped = engine.counts()
        n_input = sum(s["rows_in"] for s in per_source)
        if n_input == 0:
            files = ", ".join(str(s.path) for s in plan.sources)
            raise InputError(f"no input rows: the sources hold no data rows ({files})")
        n_accepted_rows = sum(s["accepted"] for s in per_source)
        if n_accepted_rows == 0 and n_old == 0:
            examples = engine.sql(
                """SELECT s.src, s.reason, s.detail FROM staged s
                WHERE s.reason IS NOT NULL AND s.reason <> 'blank' LIMIT 3"""
            )
            reasons = ", ".join(f"{k} {v:,}" for k, v in by_reason.items() if v)
            first = "; ".join(f"{plan.sources[s].path}: {r} ({d})" for s, r, d in examples)
            raise InputError(
                f"none of the {n_input:,} input rows was accepted (rejected: {reasons}); "
                f"for example {first}"
            )
        engine.build_maps(existing)
        engine.dedupe()
        n_pool = n_accepted_rows + n_old
        removed = engine.kcore()
        if removed and removed == int(engine.sql1("SELECT count(*) FROM pairs")):
            raise InputError(
                f"the k-core filter (min_user_interactions={config.min_user_interactions}, "
                f"min_item_interactions={config.min_item_interactions}) removed all {removed:,} "
                "interactions; lower the minimums"
            )
        engine.finalize(removed)
        n_kcore_rows = 0
        (out / "interactions").mkdir()
        n_inter = engine.write_interactions(out / "interactions")
        given = None
        if plan.given_split:
            given = {"counts": {"train": 0, "valid": 0, "test": 0}, "users": {}}
            for run in engine.runs:
                part = run.spec.part
                if part:
                    where = f"src = {run.src}"
                    given["counts"][part] = engine.write_interactions(
                        out / "splits" / "given" / part, where
                    )
                    given["users"][part] = int(
                        engine.sql1(f"SELECT count(DISTINCT user_idx) FROM final WHERE {where}")
                    )
        meta_cols = {
            "users": engine.write_id_table(
                "users", plan.users_meta, existing, out / "users.parquet"
            ),
            "items": engine.write_id_table(
                "items", plan.items_meta, existing, out / "items.parquet"
            ),
        }
        n_rej = engine.rejected(out / "rejected", removed, engine.runs)
        if removed:
            n_kcore_rows = int(engine.sql1("SELECT count(*) FROM kc"))
            by_reason["kcore"] = n_kcore_rows
            for run, entry in zip(engine.runs, per_source, strict=True):
                k = int(engine.sql1(f"SELECT count(*) FROM kc WHERE src = {run.src}"))
                entry["accepted"] -= k
                entry["rejected"] += k
        n_rejected = sum(by_reason.values())
        if n_rej != n_rejected:  # pragma: no cover - an engine bug, never user input
            raise RuntimeError(f"rejected rows written {n_rej} != counted {n_rejected}")
        n_users = int(engine.sql1("SELECT count(*) FROM ufinal"))
        n_items = int(engine.sql1("SELECT count(*) FROM ifinal"))
        folded = (n_pool - n_kcore_rows) - n_inter
        duplicates = folded
        if config.dedupe == "none":
            # every row is kept; duplicates are the rows beyond the first of their pair
            duplicates = n_inter - int(
                engine.sql1("SELECT count(*) FROM (SELECT DISTINCT user_idx, item_idx FROM final)")
            )
        stats = quality.interaction_stats(engine.con, "final", n_users, n_items)
        return EngineResult(
            source_rows=per_source,
            rejected_by_reason=by_reason,
            skipped_lines=skipped,
            n_input=n_input,
            n_rejected=n_rejected,
            n_interactions=n_inter,
            n_users=n_users,
            n_items=n_items,
            duplicates=duplicates,
            folded=folded,
            given_split=given,
            quality_stats=stats,
            meta_columns=meta_cols,
            warnings=engine.warnings,
        )
    finally:
        engine.close()
