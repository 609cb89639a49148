"""Validation rules of ingest, declared once for every engine.

A raw row becomes a set of *canonical columns* (below); each rule is a SQL predicate over them.
The rules are tried in order and the first that holds gives the row's reason code; a row that
fails none is accepted. The SQL is the common subset of DuckDB and Spark SQL (``TRY_CAST``,
``trim``, ``length``, ``||``); the few engine-specific spellings are listed in
:data:`ENGINE_FUNCTIONS` so a second engine can translate them with plain string substitution.
``TRY_CAST(x AS BIGINT)`` is applied to text only (numbers become integers by ``CAST`` after a
range check), because Spark translates it differently (see :func:`to_spark`).

Canonical columns, computed per row by the engine's reader for its format:

=================  =======  ====================================================================
column             type     meaning
=================  =======  ====================================================================
``raw``            text     the row as read (the physical line; a JSON rendering for Parquet)
``n_fields``       int      fields found on the line (delimited text only, else NULL)
``json_ok``        bool     the line is a JSON object (JSON Lines only, else TRUE)
``user_text``      text     the user field as read (NULL if absent)
``item_text``      text     the item field as read
``time_text``      text     the time field as read (NULL when the source has no time column)
``value_text``     text     the value field as read (NULL when the source has no value column)
``u_int``          bigint   the user id as an integer, when it is written as one (see below)
``u_str``          text     the trimmed user id when it is not an integer (NULL otherwise)
``i_int/i_str``             the same for the item id
``ts``             bigint   the parsed time in unix seconds (NULL if absent or unparseable)
``value``          double   the parsed value; 1.0 when the source has no value column
=================  =======  ====================================================================

An id is kept as an integer (``u_int``) when its trimmed text is the canonical decimal form of a
64-bit integer ("42", "-7"; not "007", "+7" or "4.0"), and as text (``u_str``) otherwise, so the
original id string is always recoverable and the numeric fast path never merges two different
strings. When ids must be integers (MovieLens, LightGCN, or ``id_type = "int"``) the lenient
forms "007" and "+7" are read as integers and anything else is ``bad_user``/``bad_item``.

Parameters (``{name}`` in the SQL, filled in by :func:`render`):

- ``expected_fields``: fields per line of a delimited file (header or the sample's mode)
- ``user_int`` / ``item_int``: TRUE when ids must be integers
- ``has_time`` / ``has_value``: whether the source has a time / value column
- ``positive_threshold``: rows with a value below it are ``below_threshold`` (NULL = no rule)
- ``max_id_length``: longest id accepted
- ``time_format``: the strptime format of text times (:data:`TIME_FORMAT_SQL`), else
  :data:`TIME_SQL` reads unix seconds or ISO-8601; ``time_expected`` names it in details
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

__all__ = [
    "DERIVED",
    "ENGINE_FUNCTIONS",
    "ENGINE_TYPES",
    "ISO_RE",
    "NUMBER_RE",
    "POST_REASONS",
    "READER_REASONS",
    "REASONS",
    "RULES",
    "TIME_FORMAT_SQL",
    "TIME_SQL",
    "VALUE_SQL",
    "Rule",
    "render",
    "strptime_to_java",
    "to_spark",
]

#: Every reason code a rejected row can carry, with its meaning (documented in dataset/README.md).
REASONS: dict[str, str] = {
    "bad_encoding": "the line is not valid UTF-8",
    "bad_line": "the line cannot be read (longer than the maximum line size, or a control byte)",
    "bad_json": "the line of a JSON Lines file is not a JSON object",
    "field_count": "the line has more or fewer fields than the header (or the file's usual count)",
    "missing_user": "the user field is missing or empty",
    "missing_item": "the item field is missing or empty (a LightGCN line with no items)",
    "bad_user": "the user id is not a valid id (not an integer where ids must be; control "
    "characters; too long)",
    "bad_item": "the item id is not a valid id",
    "bad_timestamp": "the time is not unix seconds, ISO-8601 or the configured time_format",
    "bad_value": "the value is missing, not a number, or not finite",
    "below_threshold": "the value is below positive_threshold",
    "kcore": "removed by the k-core filter (min_user_interactions / min_item_interactions)",
}

#: Reasons the reader assigns before any rule runs (the row has no fields to test).
READER_REASONS = ("bad_encoding", "bad_line")
#: Reasons assigned after deduplication, to whole (user, item) pairs.
POST_REASONS = ("kcore",)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row rule: ``reason`` when ``when`` holds; ``detail`` names the field and bad value."""

    reason: str
    when: str
    detail: str


#: Derived canonical columns, in dependency order (each may use the ones before it).
DERIVED: tuple[tuple[str, str], ...] = (
    ("u_cast", "TRY_CAST(user_text AS BIGINT)"),
    ("i_cast", "TRY_CAST(item_text AS BIGINT)"),
    (
        "u_int",
        "CASE WHEN u_cast IS NULL THEN NULL"
        " WHEN CAST(u_cast AS VARCHAR) = user_text THEN u_cast"
        " WHEN CAST(u_cast AS VARCHAR) = trim(user_text) THEN u_cast"
        " WHEN {user_int} AND regexp_full_match(trim(user_text), '[+-]?[0-9]+') THEN u_cast END",
    ),
    (
        "i_int",
        "CASE WHEN i_cast IS NULL THEN NULL"
        " WHEN CAST(i_cast AS VARCHAR) = item_text THEN i_cast"
        " WHEN CAST(i_cast AS VARCHAR) = trim(item_text) THEN i_cast"
        " WHEN {item_int} AND regexp_full_match(trim(item_text), '[+-]?[0-9]+') THEN i_cast END",
    ),
    ("u_str", "CASE WHEN u_int IS NULL THEN trim(user_text) END"),
    ("i_str", "CASE WHEN i_int IS NULL THEN trim(item_text) END"),
)

_ID_RULE = (
    "{p}_int IS NULL AND ({{{role}_int}} OR length({p}_str) > {{max_id_length}}"
    " OR regexp_matches({p}_str, '[\\x00-\\x1f\\x7f]'))"
)

#: The row rules, in the order they are tried.
RULES: tuple[Rule, ...] = (
    Rule("bad_json", "NOT json_ok", "'not a JSON object'"),
    Rule(
        "field_count",
        "n_fields <> {expected_fields}",
        "CAST(n_fields AS VARCHAR) || ' fields, expected {expected_fields}'",
    ),
    Rule(
        "missing_user",
        "u_int IS NULL AND coalesce(u_str, '') = ''",
        "'user field is empty'",
    ),
    Rule(
        "missing_item",
        "i_int IS NULL AND coalesce(i_str, '') = ''",
        "'item field is empty'",
    ),
    Rule(
        "bad_user",
        _ID_RULE.format(p="u", role="user"),
        "'user id ''' || u_str || ''' is not a valid id'",
    ),
    Rule(
        "bad_item",
        _ID_RULE.format(p="i", role="item"),
        "'item id ''' || i_str || ''' is not a valid id'",
    ),
    Rule(
        "bad_timestamp",
        "{has_time} AND ts IS NULL AND time_text IS NOT NULL AND trim(time_text) <> ''",
        "'time ''' || time_text || ''' is not {time_expected}'",
    ),
    Rule(
        "bad_value",
        "{has_value} AND (value IS NULL OR NOT isfinite(value))",
        "CASE WHEN value_text IS NULL OR trim(value_text) = '' THEN 'value is missing' "
        "ELSE 'value ''' || value_text || ''' is not a finite number' END",
    ),
    Rule(
        "below_threshold",
        "{positive_threshold} IS NOT NULL AND value < {positive_threshold}",
        "'value ' || CAST(value AS VARCHAR) || ' < positive_threshold {positive_threshold}'",
    ),
)

#: A decimal number as text (what ``value`` and numeric times accept); the casts of the two
#: engines differ outside it (DuckDB also reads "1_000", "0x10"), so both test it first.
NUMBER_RE = "[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?"
#: ISO-8601 date or date-time with an optional zone, the shapes both engines' casts read alike.
ISO_RE = (
    "[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}"
    "([T ][0-9]{1,2}:[0-9]{2}(:[0-9]{2}([.][0-9]{1,6})?)?)?(Z|[+-][0-9]{2}(:?[0-9]{2})?)?"
)

#: Parsing of the value field: a finite or infinite number, else NULL (a ``bad_value``).
VALUE_SQL = (
    f"CASE WHEN regexp_full_match(trim(value_text), '{NUMBER_RE}') "
    "THEN TRY_CAST(trim(value_text) AS DOUBLE) END"
)

#: Parsing of the time field (``{time_format}`` set: only that strptime format is accepted):
#: integer unix seconds, then decimal seconds (floored), then ISO-8601 (floored to the second).
#: The three shapes are disjoint (an ISO date has a '-' after four digits, which neither an
#: integer nor NUMBER_RE allows), so ISO is tried first, behind a test for '-': an ISO text then
#: skips the integer test, whose failed cast cost DuckDB more than both regular expressions.
TIME_SQL = (
    "CASE WHEN time_text IS NULL THEN NULL"
    f" WHEN contains(time_text, '-') AND regexp_full_match(trim(time_text), '{ISO_RE}')"
    " THEN CAST(floor(epoch(TRY_CAST(trim(time_text) AS TIMESTAMPTZ))) AS BIGINT)"
    " WHEN CAST(TRY_CAST(trim(time_text) AS BIGINT) AS VARCHAR) = trim(time_text)"
    " THEN TRY_CAST(trim(time_text) AS BIGINT)"
    f" WHEN regexp_full_match(trim(time_text), '{NUMBER_RE}')"
    " THEN CASE WHEN abs(TRY_CAST(trim(time_text) AS DOUBLE)) < 9.0e18"
    " THEN CAST(floor(TRY_CAST(trim(time_text) AS DOUBLE)) AS BIGINT) END END"
)
TIME_FORMAT_SQL = "CAST(floor(epoch(try_strptime(trim(time_text), {time_format}))) AS BIGINT)"

#: DuckDB spellings used above and their Spark SQL equivalents (``x``, ``p``, ``t``, ``f`` stand
#: for the call's arguments; :func:`to_spark` substitutes them).
ENGINE_FUNCTIONS: dict[str, str] = {
    "regexp_full_match(x, p)": "((x) RLIKE ('^(?:' || (p) || ')$'))",
    "regexp_matches(x, p)": "((x) RLIKE (p))",
    "isfinite(x)": "(NOT (isnan(x) OR abs(x) = double('inf')))",
    "epoch(t)": "(unix_micros(t) / 1000000.0D)",
    "try_strptime(x, f)": "try_to_timestamp(x, f)",
}
#: DuckDB type names without a Spark spelling of the same name.
ENGINE_TYPES: dict[str, str] = {"VARCHAR": "STRING", "TIMESTAMPTZ": "TIMESTAMP"}

#: strptime codes (DuckDB's ``time_format``) and their Java DateTimeFormatter patterns (Spark's).
STRPTIME_TO_JAVA: dict[str, str] = {
    "%Y": "yyyy",
    "%m": "MM",
    "%d": "dd",
    "%H": "HH",
    "%M": "mm",
    "%S": "ss",
    "%y": "yy",
    "%b": "MMM",
    "%B": "MMMM",
    "%f": "SSSSSS",
    "%z": "Z",
    "%%": "%",
}


def _literal(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, float)):
        return repr(float(value)) if isinstance(value, float) else str(value)
    return "'" + str(value).replace("'", "''") + "'"


def render(sql: str, params: Mapping[str, object]) -> str:
    """Fill ``{name}`` parameters of a rule with SQL literals.

    ``time_expected`` is prose placed inside a string literal, so it is escaped, not quoted.
    """
    return sql.format(
        **{
            k: str(v).replace("'", "''") if k == "time_expected" else _literal(v)
            for k, v in params.items()
        }
    )


def _split_args(text: str, start: int) -> tuple[list[str], int]:
    """The comma-separated arguments of a call whose "(" is at ``start``; and the index after ")"."""
    args: list[str] = []
    depth, begin, i = 0, start + 1, start
    while i < len(text):
        ch = text[i]
        if ch == "'":
            # skip the literal, '' included
            i = text.index("'", i + 1)
            while i + 1 < len(text) and text[i + 1] == "'":
                i = text.index("'", i + 2)
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                args.append(text[begin:i].strip())
                return args, i + 1
        elif ch == "," and depth == 1:
            args.append(text[begin:i].strip())
            begin = i + 1
        i += 1
    raise ValueError(f"unbalanced parentheses in {text!r}")


def _tokens(sql: str) -> list[tuple[bool, str]]:
    """``sql`` cut into (is_literal, text) pieces; literals keep their quotes, ``''`` inside."""
    out: list[tuple[bool, str]] = []
    i = 0
    while i < len(sql):
        j = sql.find("'", i)
        if j < 0:
            out.append((False, sql[i:]))
            break
        out.append((False, sql[i:j]))
        k = j + 1
        while True:
            k = sql.index("'", k)
            if k + 1 < len(sql) and sql[k + 1] == "'":
                k += 2
                continue
            break
        out.append((True, sql[j : k + 1]))
        i = k + 1
    return out


def _spark_literal(literal: str) -> str:
    """A DuckDB string literal (no backslash escapes, ``''`` for a quote) in Spark's syntax."""
    body = literal[1:-1].replace("''", "'")
    return "'" + body.replace("\\", "\\\\").replace("'", "\\'") + "'"


_TRY_CAST = re.compile(r"\bTRY_CAST\(")


def _spark_text_to_bigint(sql: str) -> str:
    """``TRY_CAST(text AS BIGINT)`` as Spark's non-ANSI ``CAST``, which gives the same values.

    Spark's TRY_CAST of text to an integer raises and catches a Java exception for every text that
    is not one (about 5 us a row: with string ids, more than all the other rules together). The
    non-ANSI CAST returns NULL instead, and differs only in reading decimals ("1.5" as 1), which
    the test for '.' refuses. The Spark engine runs with ``spark.sql.ansi.enabled=false``.
    """
    start = 0
    while True:
        pos, offset = None, 0
        for is_lit, piece in _tokens(sql):
            if not is_lit and offset + len(piece) > start:
                m = _TRY_CAST.search(piece, max(0, start - offset))
                if m:
                    pos = offset + m.start()
                    break
            offset += len(piece)
        if pos is None:
            return sql
        (arg,), end = _split_args(sql, pos + len("TRY_CAST"))
        m = re.fullmatch(r"(.*)\s+AS\s+BIGINT", arg, re.DOTALL)
        if m is None:
            start = pos + len("TRY_CAST(")
            continue
        x = m.group(1)
        sql = (
            sql[:pos] + f"(CASE WHEN instr({x}, '.') = 0 THEN CAST({x} AS BIGINT) END)" + sql[end:]
        )
        start = pos + 1  # x may hold further casts


def to_spark(sql: str) -> str:
    """A rendered rule (DuckDB spelling) as Spark SQL, through :data:`ENGINE_FUNCTIONS`."""
    sql = _spark_text_to_bigint(sql)
    for template, spark in ENGINE_FUNCTIONS.items():
        name, _, rest = template.partition("(")
        params = [p.strip() for p in rest.rstrip(")").split(",")]
        pattern = re.compile(rf"\b{name}\(")
        while True:
            # calls are found outside literals only
            pos, offset = None, 0
            for is_lit, piece in _tokens(sql):
                if not is_lit:
                    m = pattern.search(piece)
                    if m:
                        pos = offset + m.start()
                        break
                offset += len(piece)
            if pos is None:
                break
            args, end = _split_args(sql, pos + len(name))
            given = dict(zip(params, args, strict=True))
            body = re.sub(
                r"\b(" + "|".join(params) + r")\b", lambda m, g=given: g[m.group(1)], spark
            )
            sql = sql[:pos] + body + sql[end:]
    pieces = []
    for is_lit, piece in _tokens(sql):
        if is_lit:
            pieces.append(_spark_literal(piece))
        else:
            for duck, spark_type in ENGINE_TYPES.items():
                piece = re.sub(rf"\bAS {duck}\b", f"AS {spark_type}", piece)
            pieces.append(piece)
    return "".join(pieces)


def strptime_to_java(fmt: str) -> str:
    """A strptime format as a Java DateTimeFormatter pattern; unknown codes are a ValueError."""
    out, i = [], 0
    while i < len(fmt):
        if fmt[i] == "%":
            code = fmt[i : i + 2]
            if code not in STRPTIME_TO_JAVA:
                raise ValueError(
                    f"time_format code {code!r} has no Spark equivalent; codes allowed: "
                    + ", ".join(STRPTIME_TO_JAVA)
                )
            out.append(STRPTIME_TO_JAVA[code])
            i += 2
            continue
        j = i
        while j < len(fmt) and fmt[j] != "%":
            j += 1
        text = fmt[i:j]
        # letters are pattern letters in Java: quote them
        out.append("'" + text.replace("'", "''") + "'" if re.search("[A-Za-z']", text) else text)
        i = j
    return "".join(out)
