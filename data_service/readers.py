"""Corpus readers: formats, auto-detection, transparent decompression, byte-range chunks.

Formats (one JSON object per line unless noted):

| format | text of a document | required field |
| --- | --- | --- |
| ``wiki2019zh`` | ``text`` (it starts with the title already) | ``text`` |
| ``news2016zh`` | ``title``, ``desc`` (unless already in the content), ``content`` | ``content`` |
| ``webtext2019zh`` | ``title``, ``desc``, ``content`` (a question and one answer) | ``content`` |
| ``baike2018qa`` | ``title``, ``desc``, ``answer`` | ``answer`` |
| ``jsonl`` | the ``--field`` (default ``text``) | that field |
| ``text`` | one document per line, per blank-line separated block (``text_docs="blocks"``), or per file (``"file"``) | |

Inputs compressed with gzip, bzip2 or xz are recognised by their magic bytes and read
transparently; a compressed stream that breaks (a truncated or corrupt file) ends the file there:
the records before the break are used and the break is one ``bad_compression`` reject. The driver
cuts every (decompressed) input into chunks of about ``chunk_bytes`` that end on a record boundary;
chunk ``k`` of a file covers bytes ``[start, start + len(data))``, so one big file is processed in
parallel and every record keeps its file, line and byte offset (with ``text_docs="file"`` a file is
one chunk). Chunks are shipped to the workers as bytes, or read by them from their byte range when
they see the input files (shared storage).

An input is a file, a folder (its files, recursively, in sorted order of their path in the folder;
files and folders whose name starts with ``.`` are skipped), a glob, or a ``pyarrow.fs`` URI of any
of these.
"""
from __future__ import annotations

import bz2
import contextlib
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator

from pyarrow import fs

from lfzh_ds.errors import InputError

FORMATS = ("auto", "wiki2019zh", "news2016zh", "baike2018qa", "webtext2019zh", "text", "jsonl")
TEXT_DOCS = ("lines", "blocks", "file")

# Reject reasons (keys of the rejects report).
BAD_JSON = "bad_json"
BAD_ENCODING = "bad_encoding"
NUL_BYTES = "nul_bytes"
MISSING_FIELD = "missing_field"
NOT_TEXT = "field_not_text"
EMPTY_FILE = "empty_file"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
PROCESSING_ERROR = "processing_error"
BAD_COMPRESSION = "bad_compression"

_BODY_FIELD = {"wiki2019zh": "text", "news2016zh": "content", "webtext2019zh": "content",
               "baike2018qa": "answer"}
_MAGIC = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))
# what reading a truncated or corrupt compressed file raises (gzip.BadGzipFile is an OSError)
STREAM_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error)


@dataclasses.dataclass(frozen=True)
class Chunk:
    file_index: int
    path: str
    format: str
    field: str | None
    text_docs: str
    start_offset: int  # byte offset of data[0] in the decompressed file
    start_line: int  # 1-based number of the first line in data
    data: bytes | None  # None: only the range is known; ``read_range`` reads it where the worker runs
    stream_error: str = ""  # the input breaks right after data (its last chunk): what broke
    length: int = 0  # bytes in the chunk
    source: str = ""  # what a worker opens to read the range: an absolute path or a URI


@dataclasses.dataclass(frozen=True)
class Record:
    line: int
    offset: int
    text: str | None  # None for a rejected record
    reject: str | None = None
    detail: str = ""


def is_uri(name) -> bool:
    """A ``pyarrow.fs`` URI rather than a local path."""
    return "://" in str(name)


def _open_raw(name) -> io.BufferedReader:
    if is_uri(name):
        filesystem, path = fs.FileSystem.from_uri(str(name))
        return io.BufferedReader(filesystem.open_input_file(path), buffer_size=1 << 20)
    return open(name, "rb")


def _compression(raw: io.BufferedReader):
    magic = raw.peek(6)[:6]
    return next((opener for prefix, opener in _MAGIC if magic.startswith(prefix)), None)


def is_compressed(name) -> bool:
    with _open_raw(name) as raw:
        return _compression(raw) is not None


@contextlib.contextmanager
def open_binary(name):
    """The file's bytes, decompressed if it starts with gzip, bzip2 or xz magic bytes."""
    with _open_raw(name) as raw:
        opener = _compression(raw)
        if opener is None:
            yield raw
        else:
            with opener(raw, "rb") as stream:
                yield stream


def read_range(chunk: Chunk) -> Chunk:
    """The chunk with its bytes, read from ``chunk.source`` (an uncompressed input) where this runs."""
    with _open_raw(chunk.source) as f:
        f.seek(chunk.start_offset)
        data = f.read(chunk.length)
    if len(data) != chunk.length:
        raise InputError(f"{chunk.path}: {len(data):,} bytes at byte offset {chunk.start_offset:,} where the job "
                         f"planned {chunk.length:,}: the file changed while the job ran")
    return dataclasses.replace(chunk, data=data)


def describe_input(name) -> dict:
    """``{path, bytes, sha256}`` of one input (``path``: the absolute path, or the URI as given)."""
    h, size = hashlib.sha256(), 0
    with _open_raw(name) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            size += len(block)
    return {"path": source(name), "bytes": size, "sha256": h.hexdigest()}


def source(name) -> str:
    """What a worker opens to read ``name``: its absolute path (workers may run elsewhere), or the URI."""
    return str(name) if is_uri(name) else str(Path(name).resolve())


_NOT_JSON = object()


def _json_value(line: bytes):
    """The JSON value of one line, or ``_NOT_JSON``."""
    try:
        return json.loads(line.decode("utf-8").lstrip("\ufeff"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deeply
        return _NOT_JSON


def detect_format(path, field: str | None = None, probe_lines: int = 20) -> str:
    """The format of one file from the fields of its first JSON objects (``text`` if none parse).

    Returns ``"empty"`` for a file without a single non-blank line. A file of JSON that is not JSON
    lines (a line holding only ``[`` or ``{``, or a whole JSON array, and no JSON object line: a
    pretty-printed or one-line JSON array) is refused. Lines that do not decode or parse (plain text,
    a GBK file) leave the file to ``text`` and its records to the rejects. A compressed stream that
    breaks is judged by the lines before the break (``iter_chunks`` reports the break as a reject).
    """
    keys: set[str] | None = None
    seen, json_not_lines, broken = 0, False, False
    with open_binary(path) as f:
        try:
            for raw in f:
                line = raw.strip()
                if not line:
                    continue
                seen += 1
                value = _json_value(line)
                if isinstance(value, dict):
                    keys = set(value)
                    break
                lone_bracket = line.lstrip(b"\xef\xbb\xbf") in (b"[", b"{")
                json_not_lines = json_not_lines or lone_bracket or isinstance(value, list)
                if seen >= probe_lines:
                    break
        except STREAM_ERRORS:
            broken = True
    if seen == 0:
        return "text" if broken else "empty"
    if keys is None and json_not_lines:
        raise InputError(f"{path}: looks like JSON but is not JSON lines: none of its first {seen} non-blank lines is "
                         f"a JSON object, and one is a lone '[' or '{{' or a whole JSON array; write one JSON object "
                         f"per line (e.g. from a JSON array with jq -c '.[]')")
    if keys is None:
        return "text"
    if field is not None:
        return "jsonl"
    if "answer" in keys:
        return "baike2018qa"
    if "content" in keys:
        return "webtext2019zh" if keys & {"qid", "topic", "star"} else "news2016zh"
    if "text" in keys:
        return "wiki2019zh"
    raise InputError(f"{path}: JSON lines with fields {sorted(keys)}, none of which is a known corpus "
                     f"layout; pass --format jsonl --field NAME to say which field holds the text")


def _ends_with_blank_line(data: bytes) -> bool:
    if not data.endswith(b"\n"):
        return False
    return data[:-1].rsplit(b"\n", 1)[-1].strip() == b""


def _read(f, size: int | None = None):
    """(bytes, None): up to ``size`` bytes, or the rest of the line. On a broken stream (a truncated
    or corrupt compressed file): (the bytes read before the break, the error)."""
    parts = []
    try:
        if size is None:
            parts.append(f.readline())
        # read1 returns what one step decompressed, so a break loses nothing read before it
        while size and (piece := f.read1(size)):
            parts.append(piece)
            size -= len(piece)
    except STREAM_ERRORS as err:
        return b"".join(parts), err
    return b"".join(parts), None


def iter_chunks(path, file_index: int, fmt: str, field: str | None, text_docs: str,
                chunk_bytes: int) -> Iterator[Chunk]:
    """Cut one input into chunks of about ``chunk_bytes`` ending on a record boundary (a plain-text
    file that is one document, ``text_docs="file"``, is one chunk).

    If the stream breaks, the last chunk ends at the last complete line before the break and
    carries the break in ``stream_error`` (``iter_records`` turns it into a reject).
    """
    blocks = fmt == "text" and text_docs == "blocks"
    whole = fmt == "text" and text_docs == "file"
    offset, line = 0, 1
    where = source(path)

    def chunk(data, detail=""):
        return Chunk(file_index, str(path), fmt, field, text_docs, offset, line, data, detail, len(data), where)
    with open_binary(path) as f:
        while True:
            data, error = _read(f, chunk_bytes)
            if error is None and data and not data.endswith(b"\n"):
                more, error = _read(f)
                data += more
            while error is None and blocks and data and not _ends_with_blank_line(data):
                more, error = _read(f)
                if not more:
                    break
                data += more
            while error is None and whole and data:
                more, error = _read(f, chunk_bytes)
                if not more:
                    break
                data += more
            if error is not None:
                data = data[:data.rfind(b"\n") + 1]  # a line cut by the break is lost with the rest
                end, lines = offset + len(data), line - 1 + data.count(b"\n")
                detail = (f"the compressed stream breaks after {end:,} decompressed bytes ({lines:,} complete "
                          f"lines); the rest of the file is lost ({type(error).__name__}: {error})")
                yield chunk(data, detail)
                return
            if not data:
                return
            yield chunk(data)
            offset += len(data)
            line += data.count(b"\n")


def _iter_lines(chunk: Chunk):
    """(line number, byte offset, raw line without the newline) for every line in the chunk."""
    data, pos, line = chunk.data, 0, chunk.start_line
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            end = len(data)
        raw = data[pos:end]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if chunk.start_offset + pos == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        yield line, chunk.start_offset + pos, raw
        pos, line = end + 1, line + 1


def _decode(raw: bytes):
    if b"\x00" in raw:
        column = raw.index(b"\x00") + 1
        return None, NUL_BYTES, f"NUL byte at column {column}"
    try:
        return raw.decode("utf-8"), None, ""
    except UnicodeDecodeError as err:
        return None, BAD_ENCODING, f"not UTF-8 ({err.reason} at byte {err.start})"


def document_text(obj: dict, fmt: str, field: str | None):
    """(text, reject reason, detail) for one JSON record of a known format."""
    body_field = (field or "text") if fmt == "jsonl" else _BODY_FIELD[fmt]
    body = obj.get(body_field)
    if body is None or body == "":
        return None, MISSING_FIELD, f"no {body_field!r} field (fields: {sorted(obj)[:8]})"
    if not isinstance(body, str):
        return None, NOT_TEXT, f"field {body_field!r} is {type(body).__name__}, not a string"
    if fmt in ("jsonl", "wiki2019zh"):
        return body, None, ""
    parts = []
    title, desc = obj.get("title"), obj.get("desc")
    if isinstance(title, str) and title.strip():
        parts.append(title.strip())
    if isinstance(desc, str) and desc.strip() and desc.strip() not in body and desc.strip() != title:
        parts.append(desc.strip())
    parts.append(body)
    return "\n".join(parts), None, ""


def iter_records(chunk: Chunk) -> Iterator[Record]:
    """Every document or rejected record that starts in the chunk, in order."""
    if chunk.format == "text" and chunk.text_docs in ("blocks", "file"):
        yield from _iter_blocks(chunk, whole=chunk.text_docs == "file")
    else:
        for line, offset, raw in _iter_lines(chunk):
            if not raw.strip():
                continue
            text, reason, detail = _decode(raw)
            if reason is None and chunk.format != "text":
                try:
                    obj = json.loads(text)
                except ValueError as err:
                    obj, reason, detail = None, BAD_JSON, f"invalid JSON ({err})"
                except RecursionError:
                    obj, reason, detail = None, BAD_JSON, "invalid JSON (nested too deeply to parse)"
                if reason is None and not isinstance(obj, dict):
                    reason, detail = BAD_JSON, f"a JSON {type(obj).__name__}, not an object"
                if reason is None:
                    text, reason, detail = document_text(obj, chunk.format, chunk.field)
            yield Record(line, offset, text if reason is None else None, reason, detail)
    if chunk.stream_error:
        yield Record(chunk.start_line + chunk.data.count(b"\n"), chunk.start_offset + len(chunk.data), None,
                     BAD_COMPRESSION, chunk.stream_error)


def _iter_blocks(chunk: Chunk, whole: bool) -> Iterator[Record]:
    """One record per blank-line separated block, or (``whole``) one for the chunk's lines from its first
    non-blank line to its last, blank lines inside kept."""
    start = None
    lines: list[bytes] = []
    blank: list[bytes] = []  # blank lines after the last non-blank one (whole: they stay if text follows)

    def flush():
        raw = b"\n".join(lines)
        text, reason, detail = _decode(raw)
        return Record(start[0], start[1], text, reason, detail)

    for line, offset, raw in _iter_lines(chunk):
        if raw.strip():
            if start is None:
                start = (line, offset)
            lines += blank + [raw]
            blank = []
        elif start is not None and whole:
            blank.append(raw)
        elif start is not None:
            yield flush()
            start, lines = None, []
    if start is not None:
        yield flush()


def _sorted_in_folder(paths, parts_in_folder) -> list[str]:
    """``paths`` in a folder that are not hidden (no part of ``parts_in_folder(path)``, their path in the
    folder, starts with ``.``), sorted by those parts (a folder's files where its name sorts, as in a
    sorted walk)."""
    relative = [(tuple(parts_in_folder(p)), p) for p in paths]
    return [p for parts, p in sorted(relative) if not any(part.startswith(".") for part in parts)]


def _folder_files(folder: str) -> list[str]:
    """The files under a local folder, recursively, sorted, hidden files and folders skipped."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden folders are not even walked
        files += [os.path.join(root, name) for name in names]
    return _sorted_in_folder([f for f in files if os.path.isfile(f)],
                             lambda p: Path(os.path.relpath(p, folder)).parts)


def _expand_uri(pattern: str) -> list[str]:
    """The files a URI names: itself, the files of the folder it names (as ``_folder_files``), or the
    matches of its glob (``*``, ``[...]`` within one segment)."""
    try:
        filesystem, path = fs.FileSystem.from_uri(pattern)
    except (OSError, ValueError) as err:  # an unknown scheme, a filesystem pyarrow was built without
        raise InputError(f"--input {pattern}: pyarrow cannot open this URI ({err})") from None
    prefix, found, rest = pattern.partition(path)
    if not glob.has_magic(path):
        kind = filesystem.get_file_info(path).type
        if kind == fs.FileType.Directory and found:
            infos = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
            files = [info.path for info in infos if info.type == fs.FileType.File]
            rest = rest.removeprefix("/")  # a folder URI written with a trailing slash
            in_folder = _sorted_in_folder(files, lambda p: PurePosixPath(p).relative_to(path).parts)
            return [prefix + f + rest for f in in_folder]
        return [pattern] if kind == fs.FileType.File else []
    parts = PurePosixPath(path).parts
    literal = next(k for k, part in enumerate(parts) if glob.has_magic(part))
    if not found or literal == 0:
        raise InputError(f"--input {pattern}: a URI's glob needs a literal folder before its first pattern")
    base = str(PurePosixPath(*parts[:literal]))
    infos = filesystem.get_file_info(fs.FileSelector(base, allow_not_found=True, recursive=literal < len(parts) - 1))
    return [prefix + info.path + rest for info in sorted(infos, key=lambda info: info.path)
            if info.type == fs.FileType.File and len(PurePosixPath(info.path).parts) == len(parts)
            and PurePosixPath(info.path).match(path)]


def expand_inputs(patterns) -> list[str]:
    """Files named by paths, folders, URIs or glob patterns, in the order given (each glob sorted, each
    folder's files as ``_folder_files``)."""
    files: list[str] = []
    for pattern in map(str, patterns):
        if is_uri(pattern):
            matches = _expand_uri(pattern)
        else:
            matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
            # a folder stands for its files (once, if a glob also matches some of them)
            matches = list(dict.fromkeys(f for m in matches for f in (_folder_files(m) if os.path.isdir(m) else [m])))
        if not matches and os.path.isdir(pattern):
            raise InputError(f"--input {pattern} is a folder without files (hidden files and folders are skipped)")
        if not matches:
            raise InputError(f"--input {pattern} matches no file")
        for m in matches:
            if not is_uri(m) and not os.path.exists(m):
                raise InputError(f"--input {m}: no such file or folder")
            if not is_uri(m) and not os.path.isfile(m):
                raise InputError(f"--input {m} is not a file")
            files.append(m)
    return files
