"""Errors a user can fix: bad input, a bad config, the state of the store.

The CLI prints any of these as one red line and exits 1 (`--debug` shows the traceback). Everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave us or asked for, with the fix in the message."""


class ConfigError(UserError, ValueError):
    """A config file names an unknown key or a value of the wrong type, or settings that cannot work together."""


class MissingTable(UserError, FileNotFoundError):
    """A table, trained learner or stack the command needs has not been built yet."""


class InputError(UserError, ValueError):
    """Data or a request that cannot be used as given (too few rows for the folds, non-finite predictions, SQL
    that does not parse)."""


class DeviceError(UserError, RuntimeError):
    """A device or runtime dependency that is asked for but not there (CUDA, an optional package)."""


class StoreNotFound(UserError):
    """A command that only reads the store was pointed at a folder that holds none."""


class StoreBusy(UserError):
    """Another process is writing to the store."""


class StaleTable(UserError):
    """A table no longer matches its inputs (a changed train file, changed settings)."""


class IntegrityError(UserError):
    """A stored file (table, model, meta-learner, ONNX export) no longer has the bytes recorded when it was
    written: bit rot, a partial copy, a hand edit. Never loaded; the message says what rebuilds it."""


class EngineError(UserError, RuntimeError):
    """The execution engine could not run a unit: a Ray worker or node died past its retries, the cluster cannot
    be reached, or a worker tried to open the store (workers get data; the main process alone writes)."""
