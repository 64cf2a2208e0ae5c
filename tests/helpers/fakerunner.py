"""A runner that records argv and answers from canned output, for command-line tests of the
parts that cannot run here (or to inject a failure). Real output captured from the tools lives
beside the tests; a command with no canned answer fails the test loudly."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import os
import shlex
from typing import Any

from mailsnap.errors import CommandFailed
from mailsnap.runner import Result, Runner

Answer = str | Callable[[tuple[str, ...]], str] | CommandFailed


class FakeRunner(Runner):
    def __init__(self, answers: Mapping[str, Answer] | None = None, *, dry_run: bool = False):
        super().__init__(dry_run=dry_run)
        self.answers = dict(answers or {})
        self.calls: list[tuple[str, ...]] = []
        self.mutating: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str | os.PathLike[str]], *, mutates: bool,
            **kwargs: Any) -> Result:
        args = tuple(os.fspath(a) for a in argv)
        line = shlex.join(args)
        if mutates and self.dry_run:
            self.calls.append(args)
            return Result(args, "", "", 0, 0.0, skipped=True)
        self.calls.append(args)
        if mutates:
            self.mutating.append(args)
        answer = next((a for prefix, a in self.answers.items() if line.startswith(prefix)), None)
        if answer is None:
            if mutates:
                return Result(args, "", "", 0, 0.0)
            raise AssertionError(f"no canned answer for read-only command: {line}")
        if isinstance(answer, CommandFailed):
            raise answer
        out = answer(args) if callable(answer) else answer
        return Result(args, out, "", 0, 0.0)

    def lines(self) -> list[str]:
        return [shlex.join(c) for c in self.calls]
