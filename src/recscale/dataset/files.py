"""Writing dataset files safely: atomic directories and streaming-sized Parquet parts.

Every stage writes into a temporary sibling directory and renames it into place only when all of
it is written, so a failure (bad input, a crash, Ctrl-C) leaves what was stored before untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["atomic_directory", "file_sha256", "write_parquet_parts"]

ROWS_PER_GROUP = 1_000_000


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``final`` when the block succeeds.

    If ``final`` exists it is replaced only after the new directory is complete; on any
    exception the temporary directory is removed and ``final`` is left exactly as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(final)
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_parquet_parts(
    batches: pa.Table | Iterable[pa.RecordBatch],
    directory: str | Path,
    schema: pa.Schema,
    *,
    rows_per_file: int = 4 * ROWS_PER_GROUP,
    rows_per_group: int = ROWS_PER_GROUP,
) -> int:
    """Write ``batches`` as ``directory/part-00000.parquet``, ... and return the row count.

    Row groups of about ``rows_per_group`` rows let readers stream a part without loading it.
    At least one (possibly empty) part is always written so readers never face an empty folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = (
        batches.to_batches(max_chunksize=rows_per_group)
        if isinstance(batches, pa.Table)
        else batches
    )
    total = 0
    part = 0
    writer: pq.ParquetWriter | None = None
    in_file = 0

    def open_part() -> pq.ParquetWriter:
        return pq.ParquetWriter(directory / f"part-{part:05d}.parquet", schema, compression="zstd")

    def write(table: pa.Table) -> None:
        nonlocal writer, part, in_file, total
        offset = 0
        while offset < table.num_rows:
            if writer is None:
                writer = open_part()
            take = min(table.num_rows - offset, rows_per_file - in_file)
            writer.write_table(table.slice(offset, take), row_group_size=rows_per_group)
            offset += take
            in_file += take
            total += take
            if in_file >= rows_per_file:
                writer.close()
                writer = None
                part += 1
                in_file = 0

    # Engines hand out batches of whatever size suits them (DuckDB: ~120k rows); buffer them so
    # every row group but the last holds ``rows_per_group`` rows, the unit streaming readers read.
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    try:
        for batch in source:
            if batch.num_rows == 0:
                continue
            pending.extend(pa.Table.from_batches([batch]).cast(schema).to_batches())
            pending_rows += batch.num_rows
            if pending_rows >= rows_per_group:
                table = pa.Table.from_batches(pending, schema=schema)
                cut = pending_rows - pending_rows % rows_per_group
                write(table.slice(0, cut))
                rest = table.slice(cut)
                pending = rest.to_batches() if rest.num_rows else []
                pending_rows = rest.num_rows
        if pending_rows:
            write(pa.Table.from_batches(pending, schema=schema))
        if writer is None and total == 0:
            open_part().close()
    finally:
        if writer is not None:
            writer.close()
    return total


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
