"""Config: every example validates; every mistake is one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsnap.config import (
    BACKEND_NAMES,
    AutoJob,
    BtrfsJob,
    LiveJob,
    job_as,
    load_config,
    one_off_job,
    parse_config,
)
from mailsnap.errors import ConfigError

EXAMPLES = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.toml"))


def job(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "mail", "source": "/srv/mail", "target": "/backup", "backend": "live"
    }
    data.update(overrides)
    return data


def errors(*jobs: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"job": list(jobs)}, origin="test.toml")
    return info.value.lines


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_validates(path: Path) -> None:
    assert load_config(path).job


def test_backend_picks_the_model() -> None:
    config = parse_config({"job": [job(backend="btrfs"), job(name="b", backend="auto"),
                                   job(name="c")]})
    assert [type(j) for j in config.job] == [BtrfsJob, AutoJob, LiveJob]


def test_unknown_key_names_the_field() -> None:
    assert errors(job(snapshot_size="10%")) == [
        "test.toml: job[0].snapshot_size: unknown key; remove it (see examples/mailsnap.toml "
        "for the keys)"
    ]


def test_one_line_per_bad_field() -> None:
    lines = errors(job(), job(name="bad name", target="relative/path"))
    assert len(lines) == 2
    assert lines[0].startswith("test.toml: job[1].name: ")
    assert lines[1] == "test.toml: job[1].target: must be an absolute path, got 'relative/path'"


def test_unknown_backend() -> None:
    assert errors(job(backend="tape")) == [
        f"test.toml: job[0]: backend must be one of {', '.join(BACKEND_NAMES)}"
    ]


def test_missing_backend() -> None:
    data = job()
    del data["backend"]
    assert errors(data) == [
        f"test.toml: job[0]: missing key 'backend' (one of {', '.join(BACKEND_NAMES)})"
    ]


@pytest.mark.parametrize(
    ("source", "target"),
    [("/srv/mail", "/srv/mail/backups"), ("/srv/mail", "/srv/mail"), ("/srv/mail/x", "/srv")],
)
def test_target_and_source_must_not_nest(source: str, target: str) -> None:
    (line,) = errors(job(source=source, target=target))
    assert line.startswith("test.toml: job[0]: ") and "inside" in line


def test_duplicate_job_names() -> None:
    (line,) = errors(job(), job())
    assert "used twice" in line


def test_empty_file_needs_a_job() -> None:
    with pytest.raises(ConfigError, match="job"):
        parse_config({})


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config FILE, or --source DIR --target DIR"):
        load_config(tmp_path / "nope.toml")


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[[job]\nname = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(path)


def test_one_off_job_resolves_relative_paths(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    made = one_off_job(name="mail", source=Path("Maildir"), target=Path("out"), backend="live")
    assert made.source == tmp_path / "Maildir" and made.target == tmp_path / "out"


def test_select_unknown_job() -> None:
    config = parse_config({"job": [job()]})
    with pytest.raises(ConfigError, match="no job named 'x'"):
        config.select("x")


def test_run_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MAILSNAP_RUN_DIR", str(tmp_path))
    assert parse_config({"job": [job()]}).job[0].work_dir == tmp_path / "mail"


def test_job_as_keeps_common_keys_and_takes_backend_defaults() -> None:
    auto = parse_config({"job": [job(backend="auto", exclude=["*.bak"])]}).job[0]
    btrfs = job_as(BtrfsJob, auto)
    assert isinstance(btrfs, BtrfsJob) and btrfs.backend == "btrfs"
    assert (btrfs.name, btrfs.source, btrfs.exclude) == (auto.name, auto.source, auto.exclude)
    assert job_as(AutoJob, auto) is auto
