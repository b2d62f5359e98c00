"""Reading a migration file: TOML → `MigrationSpec`, every error naming the file, the line and the key.

`tomllib` gives values without positions, so a line scan of the same text finds where each key was
written (`key_lines`): section headers, `key = …` lines, and the keys inside an inline table such as
`score = { from = "payload", cast = "float" }`, which all answer to that one line.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

from common.declarative.spec import MigrationSpec, SpecProblem, build_spec
from common.errors import ConfigError

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(r"""^\s*("[^"]+"|'[^']+'|[A-Za-z0-9_-]+)\s*=""")
_INLINE_KEY = re.compile(r"""[{,]\s*("[^"]+"|'[^']+'|[A-Za-z0-9_-]+)\s*=""")
_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Where each key path is written: (section, key) and (section, key, inner key) → line number (1-based)."""
    lines: dict[tuple[str, ...], int] = {}
    section: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            section = tuple(part.strip().strip("\"'") for part in header.group(1).split("."))
            lines.setdefault(section, number)
            continue
        key = _KEY.match(line)
        if not key:
            continue
        path = (*section, key.group(1).strip("\"'"))
        lines.setdefault(path, number)
        rest = line[key.end():]
        for inner in _INLINE_KEY.finditer(rest):
            lines.setdefault((*path, inner.group(1).strip("\"'")), number)
    return lines


def line_of(lines: dict[tuple[str, ...], int], path: tuple[str, ...]) -> int | None:
    """The line of the longest written prefix of `path` (a missing key answers with its section's line)."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def parse_spec(text: str, origin: str) -> MigrationSpec:
    """The spec in `text`; `origin` names the file in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_POSITION.search(str(exc))
        where = f"{origin}:{found.group(1)}" if found else origin
        message = _TOML_POSITION.sub("", str(exc)).strip()
        raise ConfigError(f"{where}: not valid TOML: {message}") from None
    try:
        return build_spec(data)
    except SpecProblem as problem:
        line = line_of(key_lines(text), problem.path)
        where = f"{origin}:{line}" if line else origin
        key = ".".join(problem.path)
        raise ConfigError(f"{where}: {key + ': ' if key else ''}{problem.message}") from None


def load_spec(path: str | Path) -> MigrationSpec:
    """Read and validate one migration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"migration file {path}: cannot be read ({exc.strerror}); check the path") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"migration file {path}: not UTF-8 text (byte {exc.start})") from None
    return parse_spec(text, str(path))


def expand_env(url: str | None, what: str, required: bool = True) -> str | None:
    """`${NAME}` in a URL replaced from the environment; a variable that is not set is a ConfigError
    naming it (or, with `required=False`, the URL is returned as it is)."""
    if url is None:
        return None
    missing = [name for name in _ENV.findall(url) if name not in os.environ]
    if missing:
        if not required:
            return None
        raise ConfigError(f"{what} uses ${{{missing[0]}}}, which is not set in the environment; export it "
                          f"or pass the URL on the command line")
    return _ENV.sub(lambda m: os.environ[m.group(1)], url)
