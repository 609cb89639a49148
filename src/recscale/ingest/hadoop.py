"""Files as the Spark engine sees them: Hadoop's ``FileSystem``, reached through the session's JVM.

The Spark engine's driver lists, sniffs, checksums, renames and writes files through the same
filesystem layer its executors read and write with, so a source or dataset path means the same
thing to both: a URI of any scheme the session's Hadoop configuration knows (``hdfs://``,
``s3a://``, ``file://``, ...) or a plain path on the default filesystem (the local disk in local
mode, ``fs.defaultFS`` on a cluster). Nothing here looks at a scheme.

:class:`HadoopPath` has the part of :class:`pathlib.Path`'s interface that source detection and
dataset reading use (``/``, ``name``, ``parent``, ``exists``, ``is_file``, ``iterdir``, ``glob``,
``open``, ``read_text``...), so the same code runs on local paths and on these. Bytes move through
the JVM (py4j) slowly (about 10 MB/s), so only small things pass through Python: the first bytes of
a source, Parquet footers, JSON files, id tables; checksums and copies run inside the JVM.

Hadoop's local filesystem writes a ``.crc`` file beside every file; the driver writes, renames
and deletes through the raw filesystem below such a checksumming layer, so a dataset holds only
its own files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

from recscale.errors import InputError, SourceNotFoundError

__all__ = ["HadoopFS", "HadoopPath"]

# scheme ":" then "//authority" and/or an absolute path; one letter before ':' is a drive
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):(//[^/]*)?(/.*)?$")


def _split(text: str) -> tuple[str, PurePosixPath]:
    """``hdfs://nn:8020/a/b`` -> (``hdfs://nn:8020``, ``/a/b``); a plain path has the root ''."""
    m = _URI.match(text)
    if m and (m.group(2) is not None or m.group(3) is not None):
        root = f"{m.group(1)}:{m.group(2) or ''}"
        return root, PurePosixPath(m.group(3) or "/")
    return "", PurePosixPath(text)


class HadoopFS:
    """The Hadoop filesystems of a Spark session, for the driver."""

    def __init__(self, spark: Any) -> None:
        self._jvm = spark._jvm
        self._conf = spark._jsc.hadoopConfiguration()
        self._checksummed = self._jvm.java.lang.Class.forName(
            "org.apache.hadoop.fs.ChecksumFileSystem"
        )

    # ----------------------------------------------------------------- paths

    def path(self, text: str | Path | HadoopPath) -> HadoopPath:
        """``text`` as a :class:`HadoopPath`; an unreadable URI is an :class:`InputError`."""
        if isinstance(text, HadoopPath):
            return text
        p = HadoopPath(self, str(text))
        self._fs(p)  # an unknown scheme or a malformed URI fails here, naming the path
        return p

    def _jpath(self, p: HadoopPath) -> Any:
        return self._call(p, lambda: self._jvm.org.apache.hadoop.fs.Path(str(p)))

    def _fs(self, p: HadoopPath) -> Any:
        """The raw filesystem of ``p`` (below a checksumming layer, if any)."""
        jp = self._jpath(p)
        fs = self._call(p, lambda: jp.getFileSystem(self._conf))
        if self._checksummed.isInstance(fs):
            fs = fs.getRawFileSystem()
        return fs

    def _call(self, p: HadoopPath | str, fn: Any) -> Any:
        """``fn()``, with a Java exception turned into an :class:`InputError` naming ``p``."""
        from py4j.protocol import Py4JJavaError

        try:
            return fn()
        except Py4JJavaError as exc:
            java = exc.java_exception
            name = java.getClass().getName()
            message = java.getMessage() or name
            if name.endswith("FileNotFoundException"):
                raise SourceNotFoundError(f"{p}: no such file or directory") from None
            text = f"{p}: {message.splitlines()[0]}"
            if name.endswith("UnsupportedFileSystemException") or "ClassNotFound" in message:
                text += (
                    "; the Spark session has no Hadoop filesystem for this scheme: add its "
                    "connector to the session (e.g. --packages org.apache.hadoop:hadoop-aws for "
                    "s3a://) or check the URI's spelling"
                )
            raise InputError(text) from None

    def _status(self, p: HadoopPath) -> Any | None:
        fs = self._fs(p)
        jp = self._jpath(p)
        if not self._call(p, lambda: fs.exists(jp)):
            return None
        return self._call(p, lambda: fs.getFileStatus(jp))

    # ----------------------------------------------------------------- queries

    def glob(self, pattern: str) -> list[HadoopPath]:
        """Files and folders matching ``pattern``, as :func:`glob.glob` (``recursive=True``) does.

        ``*``, ``?`` and ``[...]`` match within a name and not a leading dot; ``**`` is any number
        of folders. Matches keep the pattern's spelling (``file:///a/*.csv`` gives
        ``file:///a/x.csv``), so a plain path reads the same whichever engine lists it.
        """
        root, pure = _split(pattern)
        parts = list(pure.parts)
        start = root + parts.pop(0) if pure.is_absolute() else root or "."
        found = [HadoopPath(self, start)]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt: list[HadoopPath] = []
            for base in found:
                if part == "**":
                    nxt.extend(self._walk_dirs(base, include_files=last))
                elif not _MAGIC.search(part):
                    child = base / part
                    if child.exists():
                        nxt.append(child)
                elif base.is_dir():
                    for child in base.iterdir():
                        if _match(child.name, part):
                            nxt.append(child)
            found = nxt
        return found

    def _walk_dirs(self, base: HadoopPath, *, include_files: bool) -> Iterator[HadoopPath]:
        """``base`` and every folder under it (and, with ``include_files``, every file), no dot names."""
        if not base.is_dir():
            return
        yield base
        for child in base.iterdir():
            if child.name.startswith("."):
                continue
            if child.is_dir():
                yield from self._walk_dirs(child, include_files=include_files)
            elif include_files:
                yield child

    def sha256(self, p: HadoopPath) -> str:
        """Hex SHA-256 of the file's bytes, computed in the JVM (no bytes pass through Python)."""
        fs, jp = self._fs(p), self._jpath(p)

        def digest() -> str:
            stream = fs.open(jp)
            try:
                return str(self._jvm.org.apache.commons.codec.digest.DigestUtils.sha256Hex(stream))
            finally:
                stream.close()

        return self._call(p, digest)

    # ----------------------------------------------------------------- changes

    def mkdirs(self, p: HadoopPath) -> None:
        fs, jp = self._fs(p), self._jpath(p)
        if not self._call(p, lambda: fs.mkdirs(jp)):
            raise InputError(f"{p}: cannot create the folder")

    def delete(self, p: HadoopPath) -> None:
        """Remove ``p`` and everything under it (nothing if it does not exist)."""
        fs, jp = self._fs(p), self._jpath(p)
        self._call(p, lambda: fs.delete(jp, True))

    def rename(self, src: HadoopPath, dst: HadoopPath) -> None:
        fs = self._fs(src)
        if not self._call(src, lambda: fs.rename(self._jpath(src), self._jpath(dst))):
            raise InputError(f"cannot rename {src} to {dst}")

    def write_bytes(self, p: HadoopPath, data: bytes) -> None:
        fs, jp = self._fs(p), self._jpath(p)

        def write() -> None:
            out = fs.create(jp, True)
            try:
                step = 1 << 22
                for start in range(0, len(data), step):
                    out.write(bytearray(data[start : start + step]))
            finally:
                out.close()

        self._call(p, write)

    def copy_from_local(self, local: Path, p: HadoopPath) -> None:
        """Copy the local file ``local`` to ``p`` inside the JVM."""
        fs = self._fs(p)
        src = self._jvm.org.apache.hadoop.fs.Path(local.resolve().as_uri())
        self._call(p, lambda: fs.copyFromLocalFile(False, True, src, self._jpath(p)))

    def copy_to_local(self, p: HadoopPath, local: Path) -> None:
        """Copy ``p`` to the local file ``local`` inside the JVM."""
        fs = self._fs(p)
        dst = self._jvm.org.apache.hadoop.fs.Path(local.resolve().as_uri())
        self._call(p, lambda: fs.copyToLocalFile(False, self._jpath(p), dst, True))

    @contextlib.contextmanager
    def atomic_directory(self, final: HadoopPath) -> Iterator[HadoopPath]:
        """A fresh sibling folder that becomes ``final`` when the block succeeds.

        As :func:`recscale.dataset.atomic_directory`: on any exception the new folder is removed
        and ``final`` is left as it was; an existing ``final`` is replaced only at the end.
        """
        self.mkdirs(final.parent)
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.mkdirs(tmp)
        try:
            yield tmp
        except BaseException:
            self.delete(tmp)
            raise
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            self.rename(final, old)
            self.rename(tmp, final)
            self.delete(old)
        else:
            self.rename(tmp, final)

    def make_temp_dir(self, parent: HadoopPath, prefix: str) -> HadoopPath:
        folder = parent / f"{prefix}{uuid.uuid4().hex[:8]}"
        self.mkdirs(folder)
        return folder

    def remove_tree(self, path: HadoopPath) -> None:
        self.delete(path)

    @contextlib.contextmanager
    def local_copy(self, p: HadoopPath) -> Iterator[Path]:
        """``p`` copied to a local temporary file for the block (for readers of local files)."""
        with tempfile.TemporaryDirectory(prefix="recscale-") as tmp:
            local = Path(tmp) / p.name
            self.copy_to_local(p, local)
            yield local


_MAGIC = re.compile(r"[*?\[]")


def _match(name: str, pattern: str) -> bool:
    """fnmatch as glob applies it: a leading dot is matched only by a pattern that starts with one."""
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


class HadoopPath:
    """A path on a Hadoop filesystem, with the part of :class:`pathlib.Path` recscale uses.

    ``str()`` is the path as given (joined with ``/``), never rewritten into a qualified URI, so
    the paths recorded in a dataset are the ones the user wrote.
    """

    def __init__(self, fs: HadoopFS, text: str) -> None:
        self._fs = fs
        self._root, self._pure = _split(text)

    # ----------------------------------------------------------------- pure

    def __str__(self) -> str:
        return self._root + str(self._pure)

    def __repr__(self) -> str:
        return f"HadoopPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HadoopPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: HadoopPath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, name: str) -> HadoopPath:
        return HadoopPath(self._fs, self._root + str(self._pure / name))

    @property
    def name(self) -> str:
        return self._pure.name

    @property
    def parent(self) -> HadoopPath:
        return HadoopPath(self._fs, self._root + str(self._pure.parent))

    @property
    def fs(self) -> HadoopFS:
        return self._fs

    def resolve(self) -> HadoopPath:
        """The fully qualified path (scheme, authority, absolute path): one name per file."""
        jp = self._fs._jpath(self)
        qualified = self._fs._call(self, lambda: self._fs._fs(self).makeQualified(jp))
        return HadoopPath(self._fs, str(qualified.toString()))

    # ----------------------------------------------------------------- queries

    def exists(self) -> bool:
        return self._fs._status(self) is not None

    def is_file(self) -> bool:
        status = self._fs._status(self)
        return status is not None and bool(status.isFile())

    def is_dir(self) -> bool:
        status = self._fs._status(self)
        return status is not None and bool(status.isDirectory())

    def stat(self) -> SimpleNamespace:
        status = self._fs._status(self)
        if status is None:
            raise SourceNotFoundError(f"{self}: no such file or directory")
        return SimpleNamespace(st_size=int(status.getLen()))

    def iterdir(self) -> Iterator[HadoopPath]:
        fs = self._fs._fs(self)
        jp = self._fs._jpath(self)
        statuses = self._fs._call(self, lambda: fs.listStatus(jp))
        for name in sorted(str(s.getPath().getName()) for s in statuses):
            yield self / name

    def glob(self, pattern: str) -> Iterator[HadoopPath]:
        """Children whose name matches ``pattern`` (one level, as :meth:`pathlib.Path.glob`)."""
        if not self.is_dir():
            return iter(())
        return (c for c in self.iterdir() if fnmatch.fnmatchcase(c.name, pattern))

    def rglob(self, pattern: str) -> Iterator[HadoopPath]:
        """Files and folders under this folder, at any depth, whose name matches ``pattern``."""
        if not self.is_dir():
            return
        for child in self.iterdir():
            if fnmatch.fnmatchcase(child.name, pattern):
                yield child
            if child.is_dir():
                yield from child.rglob(pattern)

    # ----------------------------------------------------------------- contents

    def open(self, mode: str = "rb") -> io.BufferedReader:
        """The file for reading (binary only): seekable, so Parquet footers can be read."""
        if mode != "rb":
            raise ValueError(f"HadoopPath.open: only mode 'rb' is supported, not {mode!r}")
        return io.BufferedReader(_Input(self), buffer_size=1 << 16)

    def read_bytes(self) -> bytes:
        with self.open("rb") as fh:
            return fh.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        self._fs.write_bytes(self, data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self._fs.write_bytes(self, text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        if self.exists() and not exist_ok:
            raise FileExistsError(str(self))
        self._fs.mkdirs(self)


class _Input(io.RawIOBase):
    """A Hadoop input stream as a seekable raw Python file."""

    def __init__(self, path: HadoopPath) -> None:
        fs = path.fs
        self._path = path
        self._jvm = fs._jvm
        jfs, jp = fs._fs(path), fs._jpath(path)
        self._size = int(fs._call(path, lambda: jfs.getFileStatus(jp)).getLen())
        self._stream = fs._call(path, lambda: jfs.open(jp))
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        path, stream, pos = self._path, self._stream, self._pos
        data = path.fs._call(path, lambda: self._read(stream, pos, want))
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def _read(self, stream: Any, pos: int, want: int) -> bytes:
        # py4j copies every byte[] into Python, so a Java buffer cannot be filled in place: the
        # JVM reads into an array of its own and hands over a copy
        stream.seek(pos)
        return bytes(stream.readNBytes(want))

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._stream.close()
        super().close()
