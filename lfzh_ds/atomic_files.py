"""The one way the toolkit replaces a file: write a temporary file beside it, fsync, rename over it, fsync the
folder. A kill at any moment leaves either the old file or the new one, never half of one; readers never see a
partial manifest, shard, checkpoint marker or metrics file.

Temporary names are ``.NAME.tmp-PID`` (hidden, unique per process), so a folder's leftovers can be swept with the
glob ``TEMPORARY_GLOB``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

TEMPORARY_GLOB = ".*.tmp-*"


def write_atomic(path, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (``str`` is written as UTF-8) atomically and durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def json_bytes(obj) -> bytes:
    """``obj`` as the toolkit's JSON files hold it: indented, UTF-8 (Chinese kept readable), newline-terminated."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_json_atomic(path, obj) -> None:
    write_atomic(path, json_bytes(obj))
