"""Registering the model with transformers' Auto classes on ``import lfzh_ds``, without importing torch there.

``lfzh_ds.modeling`` registers its classes with ``AutoConfig``, ``AutoModel``, ``AutoModelForMaskedLM`` and
``AutoModelForSequenceClassification`` when it is imported (transformers' documented way for custom models).
Importing it costs torch and transformers, seconds that processes which only tokenize, mask or read shards
should not pay. So ``import lfzh_ds`` calls ``register_with_auto_classes``: if transformers' Auto classes are
already loaded, it imports ``lfzh_ds.modeling`` at once; otherwise it waits on the import system and does it
right after the import that loads them (``from transformers import AutoModelForMaskedLM``, or anything that
pulls them in). Not in the middle of it: an import of transformers or of this package that is still running
may lack names ``lfzh_ds.modeling`` needs, so the model is imported when the outermost such import has finished.
"""
from __future__ import annotations

import importlib
import sys
import threading

__all__ = ["register_with_auto_classes"]

_AUTO_CLASSES = "transformers.models.auto.configuration_auto"  # loaded with any of the Auto classes
_MODEL = "lfzh_ds.modeling"
_WATCHED = ("transformers", "lfzh_ds")


def register_with_auto_classes() -> None:
    """Registers the model now if transformers' Auto classes are loaded, else as soon as they are."""
    if _MODEL in sys.modules:
        return
    if _AUTO_CLASSES in sys.modules:
        importlib.import_module(_MODEL)
    elif not any(isinstance(finder, _AfterAutoClassesLoad) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterAutoClassesLoad())


class _AfterAutoClassesLoad:
    """A meta path finder that finds nothing itself: it hands the imports of transformers and of this package to
    the other finders and wraps their loaders to count, per thread, the imports still running. When the count
    falls back to zero with the Auto classes loaded, it takes itself off ``sys.meta_path`` and imports the model."""

    def __init__(self):
        self.running = threading.local()

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CountingLoader(spec.loader, self)
                return spec
        return None

    def enter(self) -> None:
        self.running.depth = getattr(self.running, "depth", 0) + 1

    def leave(self, failed: bool = False) -> None:
        self.running.depth -= 1
        if failed or self.running.depth or (_AUTO_CLASSES not in sys.modules and _MODEL not in sys.modules):
            return
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        importlib.import_module(_MODEL)


class _CountingLoader:
    """A loader that runs the real one inside ``enter``/``leave``; everything else is the real loader's."""

    def __init__(self, loader, watcher: _AfterAutoClassesLoad):
        self._loader, self._watcher = loader, watcher

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._watcher.enter()
        try:
            self._loader.exec_module(module)
        except BaseException:
            self._watcher.leave(failed=True)
            raise
        self._watcher.leave()

    def __getattr__(self, name):
        return getattr(self._loader, name)
