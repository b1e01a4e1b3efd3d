"""Small shared helpers: atomic file writes, JSON I/O."""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from the rest of a lab
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 whatever the locale; a path Python holds with surrogate escapes (see :func:`text_form`)
    is written as its own bytes."""
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def text_form(value: Any) -> Any:
    """Strings (in dicts and lists too) as the characters they name. Under a non-UTF-8 locale
    (LC_ALL=C with UTF-8 mode off) Python holds a path's UTF-8 bytes from argv or the environment as
    surrogate escapes ('\\udcc3\\udca9' for 'é'), which YAML and JSON would write as escapes no
    reader accepts. The inverse of :func:`os_form`."""
    if isinstance(value, str):
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeError:  # bytes that are no UTF-8 at all: left as Python holds them
            return value
    if isinstance(value, dict):
        return {k: text_form(v) for k, v in value.items()}
    if isinstance(value, list):
        return [text_form(v) for v in value]
    return value


def os_form(value: Any) -> Any:
    """Strings as this process's file-system calls need them (identity under a UTF-8 locale): what
    a text file read back holds, made usable as a path again. The inverse of :func:`text_form`."""
    if isinstance(value, str):
        try:
            return os.fsdecode(value.encode("utf-8", "surrogateescape"))
        except UnicodeError:
            return value
    if isinstance(value, dict):
        return {k: os_form(v) for k, v in value.items()}
    if isinstance(value, list):
        return [os_form(v) for v in value]
    return value


@contextlib.contextmanager
def exclusive(lock_path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (waiting for another holder) and leave nothing
    behind: the lock file, and the folders made for it, are removed on release. A waiter that wakes
    on a file its holder has just removed takes the lock again on the current one."""
    import fcntl

    path = Path(lock_path)
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # its folder was removed by a holder's release in between
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        for d in made:  # innermost first; a folder that now holds something stays
            try:
                d.rmdir()
            except OSError:
                break
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- hostile input
class InputError(ValueError):
    """A file that cannot be what it should be (binary, not UTF-8, a YAML bomb, garbage JSON); the
    message is one line naming the file and what was expected."""


# Recipes, specs and config files are a few KB; JSON files of a run directory a few hundred bytes.
MAX_YAML_BYTES = 1 << 20
MAX_JSON_BYTES = 16 << 20
ECHO_CHARS = 40


def clip(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error echoes what it refuses, never megabytes."""
    if isinstance(value, (str, bytes)) and len(value) > 4 * limit:
        value = value[:4 * limit]  # repr of a 50 MB string would be built only to be cut
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def read_text(path: str | Path, what: str, max_bytes: int) -> str:
    """A small UTF-8 text file, or :class:`InputError` saying why it is not one."""
    path = Path(path)
    if "\0" in str(path):  # os.stat would say only "embedded null byte"
        raise InputError(f"{shown(path)}: holds a NUL byte, which no path can hold; expected {what}")
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"{shown(path)}: {size:,} bytes, too large for {what} (at most {max_bytes:,})")
    raw = path.read_bytes()[:max_bytes + 1]
    if b"\0" in raw:
        hint = " (UTF-16?)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise InputError(f"{shown(path)}: binary data{hint}, expected {what} as UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{shown(path)}: not UTF-8 text (byte {e.start}), expected {what} as UTF-8 text") from None


def shown(text: Any) -> str:
    """``text`` for a one-line message: control characters (a NUL, a newline, an escape sequence)
    written as repr writes them, so a hostile path or key can neither hide nor break the line."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@functools.lru_cache(maxsize=None)
def _yaml_loader():
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class UniqueKeyLoader(base):
        """The safe loader, refusing a mapping that repeats a key: PyYAML keeps the last value
        silently, so a recipe's second ``epochs:`` would undo its first without a word."""

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                first: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # '<<: *base' merges; the keys it brings may be overridden
                    key = self.construct_object(key_node, deep=True)
                    try:
                        line = first.get(key)
                        first.setdefault(key, key_node.start_mark.line)
                    except TypeError:  # an unhashable key: the base loader names it
                        continue
                    if line is not None:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {clip(key)} (lines {line + 1} and "
                            f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


# Nodes a YAML document may hold with its aliases expanded: the largest table spec holds ~2,000;
# a 505-byte alias bomb expands to 10^9.
MAX_YAML_NODES = 200_000


def _check_aliases(text: str, where: str) -> None:
    """Walk the event stream counting nodes with every alias expanded; refuse a recursive alias
    and a document that expands beyond MAX_YAML_NODES (an alias bomb), before anything is built."""
    import yaml

    sizes: dict[str, int] = {}
    stack: list[list] = [[None, 0]]  # [anchor, nodes so far] per open collection
    for event in yaml.parse(text, Loader=_yaml_loader()):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            stack.append([event.anchor, 1])
            continue
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, n = stack.pop()
            if anchor:
                sizes[anchor] = n
        elif isinstance(event, yaml.ScalarEvent):
            n = 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            if any(frame[0] == event.anchor for frame in stack):
                raise InputError(f"{shown(where)} (line {event.start_mark.line + 1}): recursive YAML alias "
                                 f"*{event.anchor[:20]} refers to the collection that holds it")
            n = sizes.get(event.anchor, 1)
        else:
            continue
        stack[-1][1] += n
        if sum(frame[1] for frame in stack) > MAX_YAML_NODES:
            raise InputError(f"{shown(where)} (line {event.start_mark.line + 1}): YAML aliases expand beyond "
                             f"{MAX_YAML_NODES:,} values (an alias bomb?); write the values out")


def parse_yaml(text: str, where: str) -> Any:
    """YAML through the safe loader, with aliases bounded: no alias bomb can expand and no
    recursive structure can be built."""
    import yaml

    try:
        if "*" in text:  # no alias without one
            _check_aliases(text, where)
        return yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"{shown(where)}{line}: not valid YAML: {shown(problem)}") from None
    except RecursionError:
        raise InputError(f"{shown(where)}: YAML nested too deeply") from None


def read_yaml(path: str | Path, what: str = "YAML") -> Any:
    """A YAML file (bounded: size, encoding, no aliases); :class:`InputError` names the file."""
    path = Path(path)
    return parse_yaml(read_text(path, what, MAX_YAML_BYTES), str(path))


def read_json_object(path: str | Path, what: str = "a JSON object") -> dict[str, Any]:
    """A JSON object file (what imgclf writes into a run directory), or :class:`InputError`."""
    path = Path(path)
    text = read_text(path, what, MAX_JSON_BYTES)
    try:
        data = json.loads(text)
    except ValueError as e:
        where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise InputError(f"{shown(path)}: not valid JSON{where}, expected {what}") from None
    except RecursionError:
        raise InputError(f"{shown(path)}: JSON nested too deeply, expected {what}") from None
    if not isinstance(data, dict):
        raise InputError(f"{shown(path)}: holds a JSON {type(data).__name__}, expected {what}")
    return data


def check_folder(path: str | Path, what: str) -> None:
    """Refuse, in one line naming ``what`` (a key or option), a folder path that cannot be used:
    a NUL byte, a symlink loop, a dangling symlink or a file on the way. A missing tail is fine
    (it is created). Without this, mkdir says only "[Errno 17] File exists"."""
    path = Path(path)
    here = f"{what} {clip(str(path), 80)}"
    if "\0" in str(path):
        raise InputError(f"{here}: holds a NUL byte, which no path can hold")
    for part in [*reversed(path.parents), path]:  # from the root down: the first bad component
        try:
            st = os.stat(part)
        except FileNotFoundError:
            if os.path.islink(part):
                raise InputError(f"{here}: {shown(part)} is a dangling symlink (to "
                                 f"{shown(os.readlink(part))}); fix or remove it") from None
            return
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise InputError(f"{here}: {shown(part)} is a symlink loop (its links never reach a file or folder); "
                                 "fix or remove it") from None
            raise InputError(f"{here}: {shown(part)}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise InputError(f"{here}: {shown(part)} is a file, not a folder")
