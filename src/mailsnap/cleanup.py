"""``mailsnap cleanup``: on demand, the tidying every run of a job does when it starts.

A run killed with ``kill -9`` (or by the OOM killer, or a power cut) leaves its snapshot, its
mount and its unpublished ``.partial`` backup behind; the job's next run removes them anyway. An
admin who wants them gone now, say because the snapshot pins space on the volume, runs this.
It takes the same session lock as ``backup`` (so a running job makes it exit 3) and removes only
what carries the job's marker.
"""

from __future__ import annotations

import logging

from mailsnap.config import Job
from mailsnap.errors import SourceRejected
from mailsnap.runner import Runner
from mailsnap.session import job_session
from mailsnap.signals import signals_unwind
from mailsnap.store import BackupStore

log = logging.getLogger(__name__)


def run_cleanup(job: Job, runner: Runner) -> list[str]:
    """Sweep ``job``: leftover mounts (after stopping its own orphaned processes; a foreign
    reader makes it refuse with the pid) and snapshots, the store's ``.partial`` directories,
    and a ``latest`` link a killed run did not switch. Returns one line per thing removed.
    The source need not hold mail (the point may be to tidy after the mail volume vanished),
    but it must exist: the snapshots are found through the volume behind it.
    Dry run: returns what it would remove and removes nothing."""
    if not job.source.exists():
        raise SourceRejected(
            f"source {job.source} does not exist, so the volume holding job {job.name!r}'s "
            "snapshots cannot be found: mount it again (or fix `source`) and rerun cleanup; "
            "nothing was removed"
        )
    with signals_unwind() as guard, \
            job_session(job, runner, guard, purpose="cleanup") as session:
        removed = list(session.swept)
        store = BackupStore(job.target / job.name, dry_run=runner.dry_run)
        if store.root.is_dir():  # no backup yet: nothing to sweep, and nothing to create
            if not runner.dry_run:
                session.enter(store.locked())
            removed += [f"partial backup {p}" for p in store.sweep_partials()]
            removed += [f"half-pruned backup {n}" for n in store.finish_deletions()]
            repaired = store.repair_latest()
            if repaired:
                removed.append(f"stale link {repaired}")
    return removed
