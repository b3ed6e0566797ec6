"""The study's Optuna journal (`<store>/optuna.journal`): opened for the writer, repaired after a kill (a torn last
record is cut; a stale lock is removed), a damaged line elsewhere is named."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import optuna

from featurestore.errors import UserError
from featurestore.store import FeatureStore

log = logging.getLogger(__name__)


def _repair_journal(path: Path) -> None:
    """A kill mid-append leaves a torn last line, which Optuna refuses with a bare JSON error. That line is a
    record that never completed: cut it (its candidate is evaluated again). A bad line elsewhere is not ours to
    guess about: refuse, naming it."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: cutting a torn last record (%d bytes) left by an interrupted run", path, len(data) - keep)
        with path.open("r+b") as fh:
            fh.truncate(keep)
        data = data[:keep]
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            json.loads(line)
        except ValueError:
            raise UserError(f"{path}, line {number}: not a JSON record; the Optuna journal is damaged. Delete it "
                            "to restart the stack's study from scratch (base learners are kept)") from None


def journal_storage(store: FeatureStore) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend

    _repair_journal(store.journal_path)
    # Optuna's journal lock (a symlink) left by a killed `stack` made the next one wait its 30 s grace period.
    # Only the writer (this command, under the store's writer lock) uses the journal, so a lock found now is stale.
    stale_lock = Path(f"{store.journal_path}.lock")
    if os.path.lexists(stale_lock):
        log.info("removing %s left by a `stack` that did not finish", stale_lock)
        stale_lock.unlink()
    return optuna.storages.JournalStorage(JournalFileBackend(str(store.journal_path)))
