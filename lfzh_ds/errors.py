"""A user's mistake, as one class.

Every error a user can fix (a missing or corrupt file, a bad value, a config key that cannot work, bad data) is a
``UserError``: the command lines catch this class alone, print its message as one line and exit with status 2.
Anything else raised inside the library is a bug and keeps its traceback. Messages name the file, record or key
and, where there is one, the fix.

The subclasses say which kind of input was wrong; each also derives from the built-in error a Python caller would
expect (``ValueError``, ``FileNotFoundError``), so ``except ValueError`` in a caller's code keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave: the message says what and where, in one line."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work: a command-line flag, a DeepSpeed config, a model config, masking options."""


class InputError(UserError, ValueError):
    """Input documents that cannot be read: a corpus file, a task's jsonl, a record in either."""


class MissingFieldError(InputError, KeyError):
    """A record without the field the user named (``--text-field``, ``--label-field``); a ``KeyError`` too."""

    __str__ = UserError.__str__  # the message as given, not KeyError's quoted repr


class ModelFolderError(UserError, ValueError):
    """A model or checkpoint folder whose files do not fit together or the command: weights that do not match
    their ``config.json``, a classifier with other classes than the task's, a checkpoint that is not a BERT."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or one a run folder should hold) is not there."""


class ShardError(UserError):
    """A shard folder or Arrow shard that is missing, corrupt or does not match what the run expects."""
