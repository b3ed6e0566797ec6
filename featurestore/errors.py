"""Errors a user can fix: bad input, a bad config, the state of the store.

The CLI prints any of these as one red line and exits 1 (`--debug` shows the traceback). Everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave us or asked for, with the fix in the message."""


class StoreNotFound(UserError):
    """A command that only reads the store was pointed at a folder that holds none."""


class StoreBusy(UserError):
    """Another process is writing to the store."""


class StaleTable(UserError):
    """A table no longer matches its inputs (a changed train file, changed settings)."""


class IntegrityError(UserError):
    """A stored file (table, model, meta-learner, ONNX export) no longer has the bytes recorded when it was
    written: bit rot, a partial copy, a hand edit. Never loaded; the message says what rebuilds it."""
