"""The DeepSpeed configs that ship with the toolkit, found the same way from a checkout and from an install.

They live in ``ds_configs/`` at the repository root; ``pyproject.toml`` installs that folder as
``lfzh_ds/ds_configs/`` (a ``package-dir`` mapping), so a wheel carries them beside this module.
"""
from __future__ import annotations

from pathlib import Path

from .errors import MissingFileError

_HERE = Path(__file__).resolve().parent


def deepspeed_configs_dir() -> Path:
    """``lfzh_ds/ds_configs/`` in an installed wheel, else ``ds_configs/`` of the checkout (or editable install)."""
    installed = _HERE / "ds_configs"
    return installed if installed.is_dir() else _HERE.parent / "ds_configs"


def deepspeed_config_path(name: str) -> Path:
    """The shipped DeepSpeed config ``name`` (e.g. ``"cpu.json"``, ``"zero2.json"``); a name that does not ship
    is a MissingFileError (a FileNotFoundError) listing the ones that do."""
    folder = deepspeed_configs_dir()
    path = folder / name
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in folder.glob("*.json"))) or "none"
        raise MissingFileError(f"no DeepSpeed config {name!r} ships with the toolkit (in {folder}: {shipped})")
    return path
