"""A store whose backups are snapshots of one ZFS dataset per job (``mailsnap.datasets``),
at the command level: the exact ``zfs`` command lines, and what the store does with the files
around them (the dated views, ``latest``, the sweep after a crash).

This kernel has no ZFS, so ``FakeZfs`` plays the dataset: a snapshot is a copy of the mirror
under ``.mirror/.zfs/snapshot/<id>``, a rollback copies it back. The same store runs on real
ZFS, through ``mailsnap backup``, in the guest (tests/vm/guest/test_zfs_target.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil

import pytest

from mailsnap import datasets
from mailsnap.errors import MailsnapError
from mailsnap.manifest import MANIFEST_FILE
from mailsnap.store import CONTENT, MANIFEST, BackupStore
from tests.helpers.fake_runner import FakeRunner

PARENT = "tank/backup"
ID1, ID2, ID3 = "20261201T020000Z", "20261202T020000Z", "20261203T020000Z"


def findmnt(target: Path, source: str) -> str:
    return json.dumps({"filesystems": [{"target": str(target), "source": source,
                                        "fstype": "zfs", "fsroot": "/",
                                        "options": "rw,noatime,xattr,noacl"}]})


class FakeZfs:
    """The job dataset ``tank/backup/mailsnap-mail`` as far as the store can see it."""

    def __init__(self, runner: FakeRunner, root: Path, *, owner: str | None = None) -> None:
        self.runner, self.root = runner, root
        self.name = f"{PARENT}/{datasets.PREFIX}{root.name}"
        self.mirror = root / datasets.MIRROR
        self.snaps: list[str] = []
        self.owner = str(root) if owner is None else owner
        root.mkdir(parents=True, exist_ok=True)
        runner.on("findmnt", "--json", "--nofsroot", "--target", str(root),
                  stdout=findmnt(root.parent, PARENT))
        runner.on("zfs", "list", "-H", "-o", "name", self.name, exit_code=1,
                  stderr=f"cannot open '{self.name}': dataset does not exist")
        runner.on("zfs", "create", effect=self._create)
        runner.on("zfs", "snapshot", effect=self._snapshot)
        runner.on("zfs", "rollback", effect=self._rollback)
        runner.on("zfs", "destroy", effect=self._destroy)
        runner.on("zfs", "get", "-H", "-p", "-o", "value", effect=self._get)
        self._get_rule = runner.rules[0]
        runner.on("umount", exit_code=32, stderr="umount: not mounted.")
        runner.on("findmnt", "--json", "--mountpoint", exit_code=1)
        self._list()

    def _argv(self) -> tuple[str, ...]:
        return self.runner.calls[-1].argv

    def _create(self) -> None:
        self.mirror.mkdir(exist_ok=True)
        self.runner.on("findmnt", "--json", "--nofsroot", "--target", str(self.mirror),
                       stdout=findmnt(self.mirror, self.name))
        self.runner.on("zfs", "list", "-H", "-o", "name", self.name, stdout=self.name + "\n")
        self.runner.on("zfs", "get", "-H", "-p", "-o", "value", datasets.STORE_PROPERTY,
                       self.name, stdout=self.owner + "\n")

    def _get(self) -> None:
        """``written@<snapshot>``: 0 while the mirror is what the snapshot holds."""
        prop = self._argv()[-2]
        if prop.startswith("written@"):
            same = tree_of(self.mirror) == tree_of(self.snapdir(prop.split("@")[1]))
            self._get_rule.stdout = "0\n" if same else "131072\n"

    def snapdir(self, run_id: str) -> Path:
        return self.mirror / datasets.SNAPSHOT_DIR / run_id

    def _snapshot(self) -> None:
        run_id = self._argv()[-1].split("@")[1]
        shutil.copytree(self.mirror, self.snapdir(run_id), symlinks=True,
                        ignore=lambda d, names: [".zfs"] if Path(d) == self.mirror else [])
        self.snaps.append(run_id)
        self._list()

    def _rollback(self) -> None:
        run_id = self._argv()[-1].split("@")[1]
        assert run_id == self.snaps[-1], "zfs rollback without -r: only to the newest snapshot"
        self._clear()
        shutil.copytree(self.snapdir(run_id), self.mirror, symlinks=True, dirs_exist_ok=True)

    def _destroy(self) -> None:
        target = self._argv()[-1]
        if "@" in target:
            run_id = target.split("@")[1]
            shutil.rmtree(self.snapdir(run_id))
            self.snaps.remove(run_id)
            self._list()
        else:
            assert not self.snaps, "zfs destroy of a dataset with snapshots needs -r"
            self._clear()

    def _clear(self) -> None:
        for entry in self.mirror.iterdir():
            if entry.name != ".zfs":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def _list(self) -> None:
        self.runner.on("zfs", "list", "-H", "-p", "-t", "snapshot",
                       stdout="".join(f"{self.name}@{s}\n" for s in self.snaps))


def tree_of(root: Path) -> dict[str, bytes | None]:
    """Every file's content and every directory (None) below ``root``, ``.zfs`` left out."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in root.rglob("*") if ".zfs" not in p.relative_to(root).parts}


@pytest.fixture
def zfs(tmp_path: Path) -> FakeZfs:
    return FakeZfs(FakeRunner(), tmp_path / "target" / "mail")


def store_of(zfs: FakeZfs) -> BackupStore:
    return BackupStore(zfs.root, runner=zfs.runner)


def night(store: BackupStore, run_id: str, files: dict[str, str], *, base: bool = True) -> Path:
    """One run: begin in the dataset, make ``mail/`` hold ``files``, publish."""
    previous = store.latest() if base else None
    mirror = store.begin(run_id, kind="dataset", base=previous)
    content = mirror / CONTENT
    for old in [p for p in content.rglob("*") if p.is_file()]:
        if str(old.relative_to(content)) not in files:
            old.unlink()
    for rel, text in files.items():
        (content / rel).parent.mkdir(parents=True, exist_ok=True)
        (content / rel).write_text(text)
    (mirror / MANIFEST_FILE).write_bytes(b"")  # the copier's; the pipeline needs one to follow
    store.publish(mirror, {"run_id": run_id, "messages": len(files)})
    return store.root / run_id


def files_in(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*"))
            if p.is_file()}


def mutating(zfs: FakeZfs) -> list[str]:
    return [line for line in zfs.runner.ran(mutating=True) if not line.startswith("umount")]


def test_nights_are_snapshots_of_one_dataset_with_dated_read_only_names(zfs: FakeZfs) -> None:
    store = store_of(zfs)
    night(store, ID1, {"cur/1:2,S": "one", "cur/2:2,S": "two"})
    store.discard(zfs.mirror)  # the pipeline's undo, run after every publish: nothing to do
    assert mutating(zfs) == [
        f"zfs create -o mountpoint={zfs.mirror} -o atime=off -o com.sun:auto-snapshot=false "
        f"-o mailsnap:store={zfs.root} {zfs.name}",
        f"zfs snapshot {zfs.name}@{ID1}",
    ]
    assert os.stat(zfs.mirror).st_mode & 0o777 == 0o700
    zfs.runner.calls.clear()
    night(store, ID2, {"cur/1:2,RS": "one", "new/3": "three"})
    # The mirror is as the last night left it (its mailsnap.json names ID1): no rollback.
    assert mutating(zfs) == [f"zfs snapshot {zfs.name}@{ID2}"]
    assert os.readlink(zfs.root / ID1) == f".mirror/.zfs/snapshot/{ID1}"
    assert os.readlink(zfs.root / "latest") == ID2
    assert [b.run_id for b in store.backups()] == [ID1, ID2]
    assert files_in(store.backups()[0].content) == {"cur/1:2,S": "one", "cur/2:2,S": "two"}
    assert files_in(store.backups()[1].content) == {"cur/1:2,RS": "one", "new/3": "three"}
    assert json.loads((zfs.root / ID2 / MANIFEST).read_text())["run_id"] == ID2


def test_a_run_starts_from_the_newest_backup_whatever_a_failed_run_left(zfs: FakeZfs) -> None:
    store = store_of(zfs)
    night(store, ID1, {"cur/1": "one"})
    mirror = store.begin(ID2, kind="dataset", base=store.latest())
    assert not (mirror / MANIFEST).exists()  # the previous backup's, not this one's
    (mirror / CONTENT / "cur/junk").write_text("half a copy")
    store.discard(mirror)  # the pipeline's undo for an unpublished run
    assert f"zfs rollback {zfs.name}@{ID1}" in zfs.runner.ran()[-1]
    assert files_in(mirror / CONTENT) == {"cur/1": "one"}
    assert not os.path.lexists(zfs.root / ID2)
    # A run killed outright (no undo ran): the next one rolls back before it copies.
    store.begin(ID2, kind="dataset", base=store.latest())
    (mirror / CONTENT / "cur/junk").write_text("half a copy")
    zfs.runner.calls.clear()
    fresh = BackupStore(zfs.root, runner=zfs.runner)
    mirror = fresh.begin(ID3, kind="dataset", base=fresh.latest())
    assert mutating(zfs) == [f"zfs rollback {zfs.name}@{ID1}"]
    assert files_in(mirror / CONTENT) == {"cur/1": "one"}


def test_a_mirror_changed_by_hand_is_rolled_back_before_the_night(zfs: FakeZfs) -> None:
    store = store_of(zfs)
    night(store, ID1, {"cur/1:2,S": "one", "cur/2:2,S": "two"})
    (zfs.mirror / CONTENT / "cur/2:2,S").unlink()  # its mailsnap.json still names ID1
    zfs.runner.calls.clear()
    mirror = store.begin(ID2, kind="dataset", base=store.latest())
    assert mutating(zfs) == [f"zfs rollback {zfs.name}@{ID1}"]
    assert files_in(mirror / CONTENT) == {"cur/1:2,S": "one", "cur/2:2,S": "two"}


def test_a_snapshot_someone_else_took_later_does_not_stop_a_night(zfs: FakeZfs) -> None:
    store = store_of(zfs)
    night(store, ID1, {"cur/1": "one"})
    zfs.runner.run(["zfs", "snapshot", f"{zfs.name}@zfs-auto-snap_hourly-2026-12-01-0317"],
                   mutates=True)
    night(store, ID2, {"cur/1": "one", "cur/2": "two"})  # the fake refuses a rollback now
    assert [b.run_id for b in store.backups()] == [ID1, ID2]
    assert files_in(zfs.snapdir(ID2) / CONTENT) == {"cur/1": "one", "cur/2": "two"}


def test_after_a_crashed_first_run_the_dataset_starts_empty(zfs: FakeZfs) -> None:
    store = store_of(zfs)
    mirror = store.begin(ID1, kind="dataset")
    (mirror / CONTENT / "junk").write_text("a killed first copy")
    zfs.runner.calls.clear()
    night(BackupStore(zfs.root, runner=zfs.runner), ID2, {"cur/1": "one"})
    assert mutating(zfs)[:2] == [
        f"zfs destroy {zfs.name}",
        f"zfs create -o mountpoint={zfs.mirror} -o atime=off -o com.sun:auto-snapshot=false "
        f"-o mailsnap:store={zfs.root} {zfs.name}",
    ]
    assert files_in(zfs.root / ID2 / CONTENT) == {"cur/1": "one"}


def test_prune_destroys_the_snapshot_then_its_name(zfs: FakeZfs) -> None:
    store = store_of(zfs)
    night(store, ID1, {"cur/1": "one"})
    night(store, ID2, {"cur/2": "two"})
    zfs.runner.calls.clear()
    store.remove(ID1)
    assert zfs.runner.ran(mutating=True) == [
        f"umount {zfs.mirror}/.zfs/snapshot/{ID1}",  # a browsed view is automounted
        f"zfs destroy {zfs.name}@{ID1}",
    ]
    assert not os.path.lexists(zfs.root / ID1)
    assert [b.run_id for b in store.backups()] == [ID2]
    assert zfs.snaps == [ID2]


def test_the_sweep_finishes_a_publish_or_a_prune_a_crash_interrupted(zfs: FakeZfs) -> None:
    store = store_of(zfs)
    night(store, ID1, {"cur/1": "one"})
    # Killed after `zfs snapshot` (the commit point), before its dated name was made:
    mirror = store.begin(ID2, kind="dataset", base=store.latest())
    (mirror / CONTENT / "cur/2").write_text("two")
    (mirror / MANIFEST).write_text(json.dumps({"run_id": ID2}))
    zfs.runner.run(["zfs", "snapshot", f"{zfs.name}@{ID2}"], mutates=True)
    # … and a prune killed between `zfs destroy` and removing the name:
    os.symlink(datasets.view_target("20261130T020000Z"), zfs.root / "20261130T020000Z")
    fresh = BackupStore(zfs.root, runner=zfs.runner)
    assert [b.run_id for b in fresh.backups()] == [ID1]
    fresh.sweep_partials()
    assert [b.run_id for b in fresh.backups()] == [ID1, ID2]
    assert os.readlink(zfs.root / "latest") == ID2
    assert not os.path.lexists(zfs.root / "20261130T020000Z")
    assert files_in(fresh.latest().content) == {"cur/1": "one", "cur/2": "two"}  # type: ignore[union-attr]


def test_another_stores_dataset_is_never_touched(tmp_path: Path) -> None:
    zfs = FakeZfs(FakeRunner(), tmp_path / "target" / "mail", owner="/elsewhere/mail")
    store = store_of(zfs)
    zfs.runner.run(["zfs", "create", zfs.name], mutates=True)  # someone else's, same name
    with pytest.raises(MailsnapError, match=r"mailsnap:store is '/elsewhere/mail'.*will not"):
        store.begin(ID1, kind="dataset")
    assert not any(line.startswith(("zfs rollback", "zfs destroy", "zfs snapshot"))
                   for line in zfs.runner.ran())


def test_symlinks_that_are_not_views_are_no_backups(zfs: FakeZfs, tmp_path: Path) -> None:
    store = store_of(zfs)
    night(store, ID1, {"cur/1": "one"})
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / CONTENT).mkdir(parents=True)
    (elsewhere / MANIFEST).write_text("{}")
    os.symlink(elsewhere, zfs.root / ID2)
    os.symlink(f"../{datasets.view_target(ID1)}", zfs.root / ID3)  # not its own snapshot
    assert [b.run_id for b in store.backups()] == [ID1]
    with pytest.raises(MailsnapError, match="not a directory"):
        store.remove(ID2)
    assert elsewhere.exists()


def test_the_pipeline_chooses_zfs_snapshots_on_a_zfs_target(zfs: FakeZfs) -> None:
    from types import SimpleNamespace

    from mailsnap.pipeline import target_snapshots

    store = store_of(zfs)
    job = SimpleNamespace(target_snapshots="auto", name="mail")
    view = SimpleNamespace(point_in_time=True)
    assert target_snapshots(job, store, view, "maildir", None) == (  # type: ignore[arg-type]
        "dataset", None)
    night(store, ID1, {"cur/1": "one"})
    previous = store.latest()
    assert target_snapshots(job, store, view, "maildir", previous) == (  # type: ignore[arg-type]
        "dataset", previous)
    never = SimpleNamespace(target_snapshots="never", name="mail")
    assert target_snapshots(never, store, view, "maildir", previous) == (  # type: ignore[arg-type]
        "tree", None)


def test_check_says_a_zfs_targets_backups_are_snapshots(zfs: FakeZfs) -> None:
    from mailsnap.cli.inspect import _store_kind
    from mailsnap.config import BtrfsJob

    job = BtrfsJob(backend="btrfs", name="mail", source=Path("/srv/mail"),
                   target=zfs.root.parent)
    assert _store_kind(job, zfs.runner, zfs.root, True).startswith(
        "ZFS snapshots of the dataset mailsnap-mail: the night's changes applied to it, then "
        "`zfs snapshot`, pruned by `zfs destroy`")
    assert _store_kind(job, zfs.runner, zfs.root, False).startswith(
        "hard-link trees (a live copy)")
