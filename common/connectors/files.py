"""Files source: model files under one or more root directories, matched by a naming pattern.

The source URL names the roots: `file:///data/models`, several separated by commas
(`file:///data/models,/mnt/old-models`). Every worker must see the roots at the same paths as the
producer (a shared volume or network mount): a chunk names files by root and relative path.

Reading rules, each a reject with the file's path and the reason, never an error of the run:
- a symlink (or a path through one) that resolves outside every root is never opened;
- anything that is not a regular file, an unreadable file, an empty file, a file over the size limit;
- a file whose first bytes are not a pickle (protocol 2–5) or a joblib compression header. Only the
  header is looked at: the migrator never unpickles anything (unpickling runs arbitrary code).

Contents are read in blocks and hashed (SHA-256) as they are read. A file up to `buffer_bytes` is
held in memory once (read once, hashed once); a larger one is streamed twice (hash, then write) and
must hash the same the second time, so memory is bounded by that buffer whatever the file or tree size.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from common.connectors.base import Source as BaseSource
from common.errors import ConfigError, DataError, ServiceUnavailable, TransientError

SCHEME = "file://"
DEFAULT_PATTERN = "{name}__{event}__{model_type}.{ext}"
EXTENSIONS = ("joblib", "pkl")
FIELDS = ("name", "event", "model_type")
BLOCK = 1 << 20

#  first bytes                       what they are (joblib.dump writes a pickle, or one of these compressions)
MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b",                    "joblib, gzip-compressed"),
    (b"BZh",                         "joblib, bz2-compressed"),
    (b"\xfd7zXZ\x00",                "joblib, xz-compressed"),
    (b"]\x00\x00",                   "joblib, lzma-compressed"),
    (b"\x04\x22\x4d\x18",            "joblib, lz4-compressed"),
    (b"ZF",                          "joblib, zlib-compressed (joblib < 0.10)"),
)
ZLIB_SECOND_BYTES = (0x01, 0x5E, 0x9C, 0xDA)  # 0x78 then one of these: a zlib stream (joblib compress=True)


def sniff(head: bytes) -> str | None:
    """What a file is by its first bytes, or None when it is neither a pickle nor a joblib file."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"pickle protocol {head[1]}"
    if len(head) >= 2 and head[0] == 0x78 and head[1] in ZLIB_SECOND_BYTES:
        return "joblib, zlib-compressed"
    for magic, kind in MAGIC:
        if head.startswith(magic):
            return kind
    return None


def roots_from_url(url: str) -> tuple[str, ...]:
    """The root directories of a `file://` URL (several separated by commas), as absolute real paths."""
    if not url.startswith(SCHEME):
        raise ConfigError(f"a files source URL starts with file://, got {url!r}; e.g. file:///data/models")
    roots = []
    for item in url[len(SCHEME):].split(","):
        path = item.strip()
        path = path[len(SCHEME):] if path.startswith(SCHEME) else path
        if not path.startswith("/"):
            raise ConfigError(f"root {path!r} in {url!r} is not an absolute path; write file:///absolute/path")
        roots.append(os.path.realpath(path))
    roots = list(dict.fromkeys(roots))
    for inner in roots:
        for outer in roots:
            if inner != outer and inner.startswith(outer.rstrip("/") + "/"):
                raise ConfigError(f"root {inner} is inside root {outer}: its files would be read twice; "
                                  "give only the outer one")
    return tuple(roots)


class NamingPattern:
    """`{name}__{event}__{model_type}.{ext}`-style patterns compiled to a regular expression.

    `{name}`, `{event}` and `{model_type}` are required and match within one path segment; `{ext}`
    matches one of the model extensions. A pattern without `/` matches a file's own name in any
    directory under a root; with `/` it matches the whole path relative to the root.
    """

    def __init__(self, pattern: str = DEFAULT_PATTERN, extensions: tuple[str, ...] = EXTENSIONS) -> None:
        placeholders = re.findall(r"{(\w*)}", pattern)
        missing = [f for f in FIELDS if f not in placeholders]
        unknown = sorted(set(placeholders) - {*FIELDS, "ext"})
        if missing or unknown or len(placeholders) != len(set(placeholders)):
            raise ConfigError(f"naming pattern {pattern!r} must hold {{name}}, {{event}} and {{model_type}} once each "
                              f"(and optionally {{ext}}); missing: {missing or '-'}, unknown: {unknown or '-'}")
        regex, pos = "", 0
        for m in re.finditer(r"{(\w+)}", pattern):
            regex += re.escape(pattern[pos:m.start()])
            field = m.group(1)
            regex += (f"(?P<ext>{'|'.join(map(re.escape, extensions))})" if field == "ext"
                      else f"(?P<{field}>[^/]+?)")
            pos = m.end()
        regex += re.escape(pattern[pos:])
        self.pattern = pattern
        self.whole_path = "/" in pattern
        self._regex = re.compile(regex)

    def match(self, relpath: str) -> tuple[str, str, str] | None:
        """(name, event, model_type) of a relative path, or None when the path does not fit."""
        m = self._regex.fullmatch(relpath if self.whole_path else relpath.rsplit("/", 1)[-1])
        return (m["name"], m["event"], m["model_type"]) if m else None


@dataclass(frozen=True)
class ModelFile:
    """One file that fits the pattern: where it is (root, relative path) and what it names."""

    root: str
    relpath: str
    name: str
    event: str
    model_type: str
    size: int  # as listed (lstat for a symlink); the read measures again

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.relpath)

    def sort_key(self, roots: tuple[str, ...]) -> tuple[str, int]:
        """Files of a chunk are read in relative-path order, the first root first on a tie."""
        return self.relpath, roots.index(self.root)


@dataclass(frozen=True)
class Content:
    """A file as read: its size and SHA-256, and its bytes when it fit the buffer."""

    file: ModelFile
    real_path: str
    size: int
    sha256: str
    kind: str
    data: bytes | bytearray | None  # None: larger than the buffer; `blocks()` streams it again
    mtime_ns: int = 0  # as stat said before the read

    def blocks(self) -> Iterator[bytes | bytearray]:
        """The bytes again, in blocks; a file that changed since it was hashed is a TransientError."""
        if self.data is not None:
            yield self.data
            return
        digest, seen = hashlib.sha256(), 0
        try:
            opened = _open_regular(self.real_path)
        except (OSError, DataError) as exc:  # replaced or removed since it was hashed: the chunk reads it again
            raise TransientError(f"{self.file.path} changed while it was being read ({exc}); the chunk will "
                                 "read it again") from None
        with opened as f:
            while seen < self.size:
                block = f.read(min(BLOCK, self.size - seen))
                if not block:
                    break
                digest.update(block)
                seen += len(block)
                yield block
            extra = f.read(1)
        if seen != self.size or extra or digest.hexdigest() != self.sha256:
            raise TransientError(f"{self.file.path} changed while it was being read; the chunk will read it again")


class Source(BaseSource):
    """Model files under the roots of a `file://` URL."""

    kind: ClassVar[str] = "files"

    def __init__(self, url: str, pattern: str = DEFAULT_PATTERN) -> None:
        self.url = url
        self.roots = roots_from_url(url)
        self.pattern = NamingPattern(pattern)
        self.unmatched = 0  # files seen by the last listing that do not fit the pattern

    def check_reachable(self) -> None:
        for root in self.roots:
            if not os.path.isdir(root) or not os.access(root, os.R_OK | os.X_OK):
                raise ServiceUnavailable(
                    f"model files root {root} is not a readable directory here; every worker and the producer "
                    "must see the roots at the same path (a shared volume or mount)")

    def files(self, names: set[str] | None = None, lo: str | None = None, hi: str | None = None) -> Iterator[ModelFile]:
        """Files fitting the pattern, optionally only these names and relative paths in [lo, hi].

        Directories that cannot hold a path in [lo, hi] are not entered; a symlinked directory is never
        entered (its files would have two paths); a symlinked file is listed and checked when read.
        """
        self.unmatched = 0
        for root in self.roots:
            yield from self._walk(root, "", names, lo, hi)

    def _walk(self, root: str, rel_dir: str, names: set[str] | None, lo: str | None,
              hi: str | None) -> Iterator[ModelFile]:
        try:
            entries = list(os.scandir(os.path.join(root, rel_dir)))
        except OSError:
            return  # a directory that vanished or cannot be listed: its files are simply not there
        for entry in sorted(entries, key=lambda e: e.name):
            relpath = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                is_link = entry.is_symlink()
            except OSError:
                continue
            if is_dir:
                # every path inside starts with relpath + "/", i.e. lies in [relpath + "/", relpath + "0")
                if (hi is None or relpath + "/" <= hi) and (lo is None or lo < relpath + "0"):
                    yield from self._walk(root, relpath, names, lo, hi)
                continue
            if (lo is not None and relpath < lo) or (hi is not None and relpath > hi):
                continue
            fields = self.pattern.match(relpath)
            if fields is None:
                self.unmatched += 1
                continue
            if names is not None and fields[0] not in names:
                continue
            try:
                size = entry.stat(follow_symlinks=False).st_size if not is_link else 0
            except OSError:
                size = 0
            yield ModelFile(root, relpath, *fields, size)

    def check(self, file: ModelFile, max_bytes: int) -> tuple[str, os.stat_result]:
        """The file's real path and status, without opening it; a DataError names why it cannot be migrated
        (out of the roots, not a regular file, unreadable, empty, too large)."""
        real = os.path.realpath(file.path)
        if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in self.roots):
            raise DataError(f"symlink out of the roots: resolves to {real}")
        try:
            info = os.stat(real)
        except OSError as exc:
            raise DataError(f"unreadable: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise DataError("not a regular file")
        if info.st_size == 0:
            raise DataError("empty file")
        if info.st_size > max_bytes:
            raise DataError(f"{info.st_size:,} bytes, over the limit of {max_bytes:,} (--max-file-mb)")
        return real, info

    def read(self, file: ModelFile, max_bytes: int, buffer_bytes: int,
             checked: tuple[str, os.stat_result] | None = None) -> Content:
        """Check and hash one file; a file that cannot be migrated is a DataError naming the reason.

        `checked` is `check(file)`'s answer when the caller has it already. Its modification time, taken
        before the first byte is read, is the one recorded: a file changed while read looks changed next time."""
        real, info = checked or self.check(file, max_bytes)
        digest = hashlib.sha256()
        # A file that fits the buffer is read straight into one buffer of its size (no second copy).
        buffer = bytearray(info.st_size) if info.st_size <= buffer_bytes else None
        try:
            with _open_regular(real) as f:
                head = f.read(8)
                kind = sniff(head)
                if kind is None:
                    raise DataError(f"not a joblib or pickle file by its header (starts with {head[:8].hex()})")
                digest.update(head)
                size = len(head)
                if buffer is not None:
                    view = memoryview(buffer)
                    view[:size] = head
                    while size < len(buffer) and (n := f.readinto(view[size:size + BLOCK])):
                        digest.update(view[size:size + n])
                        size += n
                    view.release()
                    if size < len(buffer):  # shrank since it was measured: its bytes are streamed again
                        buffer = None
                while block := f.read(BLOCK):  # grew since it was measured (or larger than the buffer)
                    buffer = None
                    digest.update(block)
                    size += len(block)
                    if size > max_bytes:
                        raise DataError(f"grew over the limit of {max_bytes:,} bytes (--max-file-mb) while read")
        except OSError as exc:
            raise DataError(f"unreadable: {exc.strerror or exc}") from None
        data = buffer
        return Content(file, real, size, digest.hexdigest(), kind, data, info.st_mtime_ns)

    def close(self) -> None:
        """Nothing stays open between reads."""


def _open_regular(path: str):
    """Open for reading without following a final symlink (the path is already resolved) and without
    blocking on a FIFO swapped in since it was listed."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError("not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb", buffering=0)
