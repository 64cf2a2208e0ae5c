"""LvmBackend against a fake runner fed real lvs/vgs/findmnt output captured in the guest
(tests/data/vm/, written by tests/vm/guest). Exact command lines, dry run, refusals."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mailsnap.backends import BACKENDS, make_backend
from mailsnap.backends import lvm as lvm_module
from mailsnap.backends.base import Snapshot, SnapshotBackend, Volume, snapshot_name
from mailsnap.backends.lvm import LvmBackend, parse_lvs, snapshot_bytes
from mailsnap.config import LvmJob, parse_config
from mailsnap.errors import BackendUnsuitable, MailsnapError, SnapshotInvalid, TeardownIncomplete
from tests.helpers.fake_runner import FakeRunner, data

RUN_ID = "20250102T030405Z"
NAME = snapshot_name("lvmail", RUN_ID)
SNAP_LV = f"mail_{NAME}"
LVS = ("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-a", "-o")
VGS = ("vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o")


def mounted_at(findmnt: str) -> Path:
    return Path(json.loads(data(findmnt))["filesystems"][0]["target"])


def make(
    kind: str = "ext4", *, dry_run: bool = False, **options: object
) -> tuple[LvmBackend, FakeRunner, Path]:
    """A backend whose source is ``<mount>/vmail`` on the LV captured for ``kind``."""
    runner = FakeRunner(dry_run=dry_run)
    source = mounted_at(f"findmnt-{kind}.json") / "vmail"
    runner.on("findmnt", "--json", "--nofsroot", "--target", stdout=data(f"findmnt-{kind}.json"))
    runner.on(*LVS, stdout=data(f"lvs-{kind}-origin.json"))
    runner.on(*VGS, stdout=data("vgs.json"))
    runner.on("findmnt", "--json", "--list", stdout='{"filesystems": []}')
    runner.on("findmnt", "--json", "--mountpoint", exit_code=1)
    runner.on("udevadm", "settle")
    job = LvmJob(backend="lvm", name="lvmail", source=source, target=Path("/backup"),
                 **options)  # type: ignore[arg-type]
    return LvmBackend(runner, job), runner, source


def test_satisfies_the_protocol_and_is_registered() -> None:
    backend, _runner, _source = make()
    assert isinstance(backend, SnapshotBackend)
    assert BACKENDS["lvm"] is LvmBackend
    assert (LvmBackend.name, LvmBackend.point_in_time, LvmBackend.needs_root) == (
        "lvm", True, True)


def test_discover_finds_lv_fs_and_vg_free_space() -> None:
    backend, runner, source = make("xfs")
    volume = backend.discover(source)
    assert volume.device == "/dev/mapper/vgmail-mail"
    assert volume.fstype == "xfs"
    assert volume.relative == Path("vmail")
    assert volume.details["vg"] == "vgmail" and volume.details["lv"] == "mail"
    assert volume.details["lv_size"] == "335544320"
    assert volume.details["vg_free"] == "4286578688"
    assert volume.details["segtype"] == "linear"
    assert runner.ran(mutating=True) == []


def test_discover_refuses_a_source_not_on_an_lv() -> None:
    backend, runner, source = make()
    # Same lvs output, but the source's mount is on a plain disk.
    plain = data("findmnt-ext4.json").replace("/dev/mapper/vgmail-mail", "/dev/vda")
    runner.on("findmnt", "--json", "--nofsroot", "--target", stdout=plain)
    with pytest.raises(BackendUnsuitable, match=r"/dev/vda .* not an LVM logical volume"):
        backend.discover(source)


def test_create_classic_snapshot_exact_command_default_10_percent() -> None:
    backend, runner, source = make()
    snapshot = backend.create(backend.discover(source), NAME)
    # 10% of 320 MiB = 32 MiB = 8 extents of 4 MiB.
    assert runner.ran(mutating=True) == [
        f"lvcreate --snapshot --name {SNAP_LV} --size 33554432b vgmail/mail"
    ]
    assert snapshot.name == NAME
    assert snapshot.details == {"vg": "vgmail", "lv": SNAP_LV, "origin": "mail", "thin": "no",
                                "size": "33554432"}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("10%ORIGIN", 33554432), ("2G", 2 * 1024**3), ("5M", 8 * 1024**2), ("1.5g", 1536 * 1024**2),
     ("100%ORIGIN", 335544320), ("1", 4 * 1024**2)],
)
def test_snapshot_size_is_rounded_up_to_extents(spec: str, expected: int) -> None:
    assert snapshot_bytes(spec, 335544320, 4 * 1024**2) == expected


def test_refuses_before_creating_when_the_vg_has_too_little_free_space() -> None:
    backend, runner, source = make(snapshot_size="100G")
    volume = backend.discover(source)
    with pytest.raises(BackendUnsuitable) as info:
        backend.create(volume, NAME)
    assert "volume group vgmail has 4.0 GiB free" in str(info.value)
    assert "needs 100.0 GiB" in str(info.value) and "nothing was created" in str(info.value)
    assert runner.ran(mutating=True) == []


def test_thin_snapshot_takes_no_size_and_is_activated() -> None:
    backend, runner, source = make("ext4-thin")
    volume = backend.discover(source)
    assert volume.details["segtype"] == "thin" and volume.details["thin_pool"] == "pool"
    runner.on(*LVS, stdout=data("lvs-ext4-thin-with-snapshot.json"))
    snapshot = backend.create(volume, NAME)
    assert runner.ran(mutating=True) == [
        f"lvcreate --snapshot --setactivationskip n --name {SNAP_LV} vgmail/mail"
    ]
    assert snapshot.details["thin"] == "yes"


def test_thin_snapshot_left_inactive_is_activated_with_K() -> None:
    backend, runner, source = make("ext4-thin")
    volume = backend.discover(source)
    report = json.loads(data("lvs-ext4-thin-with-snapshot.json"))
    for row in report["report"][0]["lv"]:
        if row["lv_name"] == SNAP_LV:  # as older LVM leaves it: skip flag set, inactive
            row.update(lv_attr="Vwi---tz-k", lv_active="", data_percent="")
    runner.on(*LVS, stdout=json.dumps(report))
    backend.create(volume, NAME)
    assert runner.ran(mutating=True)[-1] == f"lvchange -ay -K vgmail/{SNAP_LV}"


def test_failed_create_removes_a_half_made_lv() -> None:
    backend, runner, source = make()
    volume = backend.discover(source)
    runner.on("lvcreate", exit_code=5, stderr="  device-mapper: reload ioctl failed")
    runner.on(*LVS, stdout=data("lvs-ext4-with-snapshot.json"))
    with pytest.raises(MailsnapError, match="reload ioctl failed"):
        backend.create(volume, NAME)
    assert runner.ran(mutating=True)[-1] == f"lvremove -y vgmail/{SNAP_LV}"


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        # XFS: the snapshot has the origin's UUID (nouuid) and a dirty log (norecovery).
        ("xfs", "ro,nouuid,norecovery,nosuid,nodev,noexec"),
        # ext4: do not replay the journal into the snapshot (noload).
        ("ext4", "ro,noload,nosuid,nodev,noexec"),
    ],
)
def test_mount_read_only_with_fs_specific_options(kind: str, options: str) -> None:
    backend, runner, source = make(kind)
    snapshot = backend.create(backend.discover(source), NAME)
    path = backend.mount(snapshot, Path("/run/mailsnap/lvmail/snapshot"))
    assert path == Path("/run/mailsnap/lvmail/snapshot/vmail")
    assert runner.ran(mutating=True)[-1] == (
        f"mount -t {kind} -o {options} /dev/vgmail/{SNAP_LV} /run/mailsnap/lvmail/snapshot"
    )


def test_mount_options_override_keeps_the_safe_ones() -> None:
    backend, runner, source = make("xfs", mount_options=("nouuid", "rw", "inode64"))
    snapshot = backend.create(backend.discover(source), NAME)
    backend.mount(snapshot, Path("/mnt/s"))
    assert runner.ran(mutating=True)[-1] == (
        f"mount -t xfs -o ro,nouuid,inode64,nosuid,nodev,noexec /dev/vgmail/{SNAP_LV} /mnt/s"
    )


def test_dry_run_discovers_for_real_and_skips_every_change() -> None:
    backend, runner, source = make(dry_run=True)
    volume = backend.discover(source)
    snapshot = backend.create(volume, NAME)
    backend.mount(snapshot, Path("/mnt/s"))
    backend.check_healthy(snapshot)
    backend.unmount(snapshot, Path("/mnt/s"))
    backend.destroy(snapshot)
    assert runner.ran(mutating=True, executed=True) == []
    assert runner.ran(mutating=True, executed=False) == [
        f"lvcreate --snapshot --name {SNAP_LV} --size 33554432b vgmail/mail",
        f"mount -t ext4 -o ro,noload,nosuid,nodev,noexec /dev/vgmail/{SNAP_LV} /mnt/s",
        "umount /mnt/s",
        f"lvremove -y vgmail/{SNAP_LV}",
    ]
    assert any(line.startswith("lvs ") for line in runner.ran(executed=True))


def test_check_healthy_passes_on_a_healthy_snapshot() -> None:
    backend, runner, source = make()
    snapshot = backend.create(backend.discover(source), NAME)
    runner.on(*LVS, stdout=data("lvs-ext4-with-snapshot.json"))
    backend.check_healthy(snapshot)
    assert runner.ran(mutating=True) == [runner.ran(mutating=True)[0]]  # only the lvcreate


def test_check_healthy_raises_on_overflow() -> None:
    backend, runner, source = make(snapshot_size="8M")
    snapshot = backend.create(backend.discover(source), NAME)
    runner.on(*LVS, stdout=data("lvs-overflowed.json"))
    with pytest.raises(SnapshotInvalid, match=r"became invalid \(lv_attr swi-I-s---\)"):
        backend.check_healthy(snapshot)


def test_check_healthy_raises_when_the_snapshot_vanished() -> None:
    backend, _runner, source = make()
    snapshot = backend.create(backend.discover(source), NAME)
    with pytest.raises(SnapshotInvalid, match="disappeared"):
        backend.check_healthy(snapshot)  # lvs still shows only the origin


def cow_percent(name: str) -> float:
    """The snapshot's COW fill in a captured lvs report."""
    [row] = [r for r in parse_lvs(data(name)) if r.name == SNAP_LV]
    assert row.data_percent is not None
    return row.data_percent


def test_check_healthy_warns_at_threshold(caplog: pytest.LogCaptureFixture) -> None:
    percent = cow_percent("lvs-cow-filling.json")
    backend, runner, source = make(snapshot_size="16M", cow_warn_percent=percent - 5)
    snapshot = backend.create(backend.discover(source), NAME)
    runner.on(*LVS, stdout=data("lvs-cow-filling.json"))
    with caplog.at_level(logging.WARNING):
        backend.check_healthy(snapshot)
    assert f"COW space of vgmail/{SNAP_LV} is {percent:.1f}% full" in caplog.text
    assert not any(line.startswith("lvextend") for line in runner.ran())


def test_no_warning_below_threshold(caplog: pytest.LogCaptureFixture) -> None:
    percent = cow_percent("lvs-cow-filling.json")
    backend, runner, source = make(snapshot_size="16M", cow_warn_percent=percent + 5,
                                   auto_extend=True)
    snapshot = backend.create(backend.discover(source), NAME)
    runner.on(*LVS, stdout=data("lvs-cow-filling.json"))
    with caplog.at_level(logging.WARNING):
        backend.check_healthy(snapshot)
    assert caplog.text == ""
    assert len(runner.ran(mutating=True)) == 1  # only the lvcreate


def test_auto_extend_grows_by_its_own_size(caplog: pytest.LogCaptureFixture) -> None:
    percent = cow_percent("lvs-cow-filling.json")
    backend, runner, source = make(snapshot_size="16M", cow_warn_percent=percent - 5,
                                   auto_extend=True)
    snapshot = backend.create(backend.discover(source), NAME)
    runner.on(*LVS, stdout=data("lvs-cow-filling.json"))
    with caplog.at_level(logging.WARNING):
        backend.check_healthy(snapshot)
    assert runner.ran(mutating=True)[-1] == f"lvextend --size +16777216b vgmail/{SNAP_LV}"
    assert "auto_extend: mailsnap grows snapshot" in caplog.text


def test_destroy_removes_and_is_idempotent() -> None:
    backend, runner, source = make()
    snapshot = backend.create(backend.discover(source), NAME)
    runner.on(*LVS, stdout=data("lvs-ext4-with-snapshot.json"), times=1)
    backend.destroy(snapshot)
    assert runner.ran(mutating=True)[-1] == f"lvremove -y vgmail/{SNAP_LV}"
    before = len(runner.ran(mutating=True))
    backend.destroy(snapshot)  # lvs shows only the origin now: already gone is success
    assert len(runner.ran(mutating=True)) == before


def test_destroy_refuses_an_lv_without_the_marker() -> None:
    backend, runner, source = make()
    volume = backend.discover(source)
    for lv in ("mail", "mail_mailsnap-lvmail", "mail_backup", "mail_mailsnap-x-2025"):
        foreign = Snapshot("lvm", lv, volume, details={"vg": "vgmail", "lv": lv})
        with pytest.raises(MailsnapError, match="refusing to remove"):
            backend.destroy(foreign)
    assert runner.ran(mutating=True) == []


def test_destroy_that_keeps_failing_names_what_remains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lvm_module, "REMOVE_DELAY", 0.0)
    backend, runner, source = make()
    snapshot = backend.create(backend.discover(source), NAME)
    runner.on(*LVS, stdout=data("lvs-ext4-with-snapshot.json"))
    runner.on("lvremove", exit_code=5,
              stderr=f"  Logical volume vgmail/{SNAP_LV} contains a filesystem in use.")
    with pytest.raises(TeardownIncomplete) as info:
        backend.destroy(snapshot)
    assert f"snapshot LV vgmail/{SNAP_LV} still exists after 4 attempts" in str(info.value)
    assert f"lvremove -y vgmail/{SNAP_LV}" in str(info.value)


def test_list_owned_only_this_jobs_snapshots_of_this_lv() -> None:
    backend, runner, source = make()
    volume = backend.discover(source)
    runner.on(*LVS, stdout=data("lvs-two-jobs.json"))
    owned = backend.list_owned(volume, "lvmail")
    assert [(s.name, s.details["lv"]) for s in owned] == [(NAME, SNAP_LV)]
    other = backend.list_owned(volume, "lvmail-archive")
    assert [s.name for s in other] == ["mailsnap-lvmail-archive-20250102T030405Z"]


def test_parse_lvs_reads_hidden_and_thin_rows() -> None:
    rows = {lv.name: lv for lv in parse_lvs(data("lvs-ext4-thin-with-snapshot.json"))}
    raw = {r["lv_name"]: r for r in json.loads(data("lvs-ext4-thin-with-snapshot.json"))
           ["report"][0]["lv"]}
    assert rows["pool"].segtype == "thin-pool"
    assert rows["pool"].data_percent == float(raw["pool"]["data_percent"])
    assert rows[SNAP_LV].thin and rows[SNAP_LV].origin == "mail" and rows[SNAP_LV].active
    assert "[pool_tdata]" in rows


def test_config_accepts_lvm_keys_and_reports_bad_ones() -> None:
    good = parse_config({"job": [{"name": "m", "backend": "lvm", "source": "/srv/mail",
                                  "target": "/b", "snapshot_size": "2G", "auto_extend": True}]})
    assert isinstance(good.job[0], LvmJob)
    with pytest.raises(MailsnapError) as info:
        parse_config({"job": [{"name": "m", "backend": "lvm", "source": "/srv/mail",
                               "target": "/b", "snapshot_size": "lots", "recursive": True}]})
    lines = str(info.value).splitlines()
    assert "config: job[0].snapshot_size: must be a size like '2G'" in lines[0]
    assert lines[1].startswith("config: job[0].recursive: unknown key")


def test_volume_round_trips_through_details() -> None:
    backend, _runner, source = make()
    volume = backend.discover(source)
    assert isinstance(volume, Volume) and all(isinstance(v, str) for v in volume.details.values())


@pytest.mark.parametrize(("findmnt", "expected"), [
    ("findmnt-ext4.json", "lvm"),
    ("findmnt-zfs-single.json", "zfs"),
])
def test_auto_picks_lvm_or_zfs_as_root(
    findmnt: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mailsnap.backends.os.geteuid", lambda: 0)
    runner = FakeRunner()
    runner.on("findmnt", "--json", "--nofsroot", "--target", stdout=data(findmnt))
    runner.on(*LVS, stdout=data("lvs-ext4-origin.json"))
    job = parse_config({"job": [{"name": "m", "backend": "auto", "source": str(tmp_path),
                                 "target": "/backup"}]}).job[0]
    backend = make_backend(job, runner)
    assert backend.name == expected
    assert runner.ran(mutating=True) == []


def test_destroy_refuses_a_bare_record_without_the_marker() -> None:
    backend, runner, source = make()
    volume = backend.discover(source)
    with pytest.raises(MailsnapError, match="refusing to remove LV vgmail/mail_nightly"):
        backend.destroy(Snapshot("lvm", "nightly-2026-11-28", volume))
    assert runner.ran(mutating=True) == []
