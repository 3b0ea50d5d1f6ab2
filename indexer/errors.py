"""The errors an indexing job raises for problems its user can fix (exit status 2 at the CLI).

Every module of the pipeline (:mod:`indexer.guards`, :mod:`indexer.plan`, :mod:`indexer.parts`,
:mod:`indexer.publish`, :mod:`indexer.jobs`, the engines) raises these, so this module imports
nothing from the others.
"""

from __future__ import annotations


class JobError(ValueError):
    """A job cannot start or finish as asked (a user-fixable problem, not a crash)."""


def part_corrupt(part: int, vectors: int, items: int, recorded: int, manifest: object) -> JobError:
    """A committed part whose vector file, item list and manifest disagree on its size."""
    return JobError(
        f"part {part} is corrupt ({vectors} vectors, {items} items, manifest says {recorded}); "
        f"delete {manifest} and resume to redo it"
    )
