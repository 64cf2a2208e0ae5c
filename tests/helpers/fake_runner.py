"""A recording fake ``Runner`` for backend unit tests: scripted answers, exact argv, dry run.

Tests script answers with ``on(prefix…, stdout=…)`` (real captured output from tests/data/vm/) and
then assert the exact command lines in ``calls``. A read-only command nobody scripted fails the
test (discovery must be deliberate); a mutating one succeeds silently. Dry run behaves like the
real runner: mutating commands are recorded as skipped and never answered.

To refresh tests/data/vm/ (e.g. for a newer LVM or ZFS): ``MAILSNAP_VM_OUT=DIR
scripts/vm/run-tests``, then copy ``DIR/captured/*`` there; the guest tests write them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
import os
from pathlib import Path

from mailsnap.errors import CommandFailed
from mailsnap.runner import Result, Runner

DATA = Path(__file__).resolve().parents[1] / "data" / "vm"


def data(name: str) -> str:
    """A file of real command output captured in the LVM/ZFS guest (tests/data/vm/)."""
    return (DATA / name).read_text()


@dataclass
class Call:
    argv: tuple[str, ...]
    mutates: bool
    skipped: bool


@dataclass
class _Rule:
    prefix: tuple[str, ...]
    stdout: str
    stderr: str
    exit_code: int
    times: int | None  # None: forever
    effect: Callable[[], None] | None


@dataclass
class FakeRunner(Runner):
    calls: list[Call] = field(default_factory=list)
    rules: list[_Rule] = field(default_factory=list)

    def on(
        self,
        *prefix: str,
        stdout: str = "",
        stderr: str = "",
        exit_code: int = 0,
        times: int | None = None,
        effect: Callable[[], None] | None = None,
    ) -> None:
        """Answer commands starting with ``prefix``. Later rules win over earlier ones, and a
        rule with ``times`` answers that many calls, then steps aside."""
        self.rules.insert(0, _Rule(tuple(prefix), stdout, stderr, exit_code, times, effect))

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        mutates: bool,
        timeout: float | None = 120.0,
        ok_codes: Sequence[int] = (0,),
        env: Mapping[str, str] | None = None,
        hint: str = "",
        on_wait: Callable[[], None] | None = None,
        poll_interval: float = 5.0,
        passthrough: bool = False,
        on_output: Callable[[str], None] | None = None,
    ) -> Result:
        args = tuple(os.fspath(a) for a in argv)
        if mutates and self.dry_run:
            self.calls.append(Call(args, mutates, skipped=True))
            result = Result(args, "", "", 0, 0.0, skipped=True)
            self.history.append(result)
            return result
        self.calls.append(Call(args, mutates, skipped=False))
        for rule in self.rules:
            if args[: len(rule.prefix)] != rule.prefix or rule.times == 0:
                continue
            if rule.times is not None:
                rule.times -= 1
            if rule.effect is not None:
                rule.effect()
            if rule.exit_code not in ok_codes:
                raise CommandFailed(args, rule.exit_code, rule.stderr, hint=hint)
            result = Result(args, rule.stdout, rule.stderr, rule.exit_code, 0.0)
            self.history.append(result)
            return result
        if not mutates:
            raise AssertionError(f"unscripted read-only command: {' '.join(args)}")
        result = Result(args, "", "", 0, 0.0)
        self.history.append(result)
        return result

    def ran(self, *, mutating: bool | None = None, executed: bool | None = None) -> list[str]:
        """Command lines (space-joined), optionally only mutating ones / only executed ones."""
        return [
            " ".join(c.argv)
            for c in self.calls
            if (mutating is None or c.mutates == mutating)
            and (executed is None or c.skipped != executed)
        ]
