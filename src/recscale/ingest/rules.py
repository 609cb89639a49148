"""Validation rules of ingest, declared once for every engine.

A raw row becomes a set of *canonical columns* (below); each rule is a SQL predicate over them.
The rules are tried in order and the first that holds gives the row's reason code; a row that
fails none is accepted. The SQL is the common subset of DuckDB and Spark SQL (``TRY_CAST``,
``trim``, ``length``, ``||``); the few engine-specific spellings are listed in
:data:`ENGINE_FUNCTIONS` so a second engine can translate them with plain string substitution.

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
from collections.abc import Mapping

__all__ = [
    "DERIVED",
    "ENGINE_FUNCTIONS",
    "POST_REASONS",
    "READER_REASONS",
    "REASONS",
    "RULES",
    "TIME_FORMAT_SQL",
    "TIME_SQL",
    "Rule",
    "render",
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

#: Parsing of the time field (``{time_format}`` set: only that strptime format is accepted).
TIME_SQL = (
    "CASE WHEN time_text IS NULL THEN NULL"
    " ELSE coalesce(TRY_CAST(time_text AS BIGINT),"
    " TRY_CAST(floor(TRY_CAST(time_text AS DOUBLE)) AS BIGINT),"
    " TRY_CAST(epoch(TRY_CAST(trim(time_text) AS TIMESTAMPTZ)) AS BIGINT)) END"
)
TIME_FORMAT_SQL = "CAST(epoch(try_strptime(trim(time_text), {time_format})) AS BIGINT)"

#: DuckDB spellings used above and their Spark SQL equivalents.
ENGINE_FUNCTIONS: dict[str, str] = {
    "regexp_full_match(x, p)": "x RLIKE '^(?:' || p || ')$'",
    "regexp_matches(x, p)": "x RLIKE p",
    "isfinite(x)": "NOT (isnan(x) OR abs(x) = double('inf'))",
    "epoch(t)": "unix_timestamp(t)",
    "try_strptime(x, f)": "try_to_timestamp(x, f)",
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
