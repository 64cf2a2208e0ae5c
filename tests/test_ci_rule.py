"""The CI rule itself: with MAILSNAP_REQUIRE_PRIVILEGED=1 a skipped privileged test fails."""

from __future__ import annotations

from pathlib import Path
import shutil

import pytest

pytest_plugins = ["pytester"]

TEST = '''
import pytest

@pytest.mark.privileged
def test_needs_root():
    pytest.skip("no loop devices here")

def test_plain():
    pytest.skip("not privileged: may skip")
'''


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    root = Path(__file__).parent
    shutil.copy(root / "conftest.py", pytester.path / "conftest.py")
    (pytester.path / "tests").mkdir()
    shutil.copytree(root / "helpers", pytester.path / "tests" / "helpers")
    (pytester.path / "tests" / "__init__.py").write_text("")
    pytester.makepyfile(test_rule=TEST)
    pytester.makeini("[pytest]\nmarkers =\n    privileged: x\n    dovecot: x\n")
    return pytester


def test_privileged_skip_fails_in_ci(suite: pytest.Pytester,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILSNAP_REQUIRE_PRIVILEGED", "1")
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*privileged test was skipped in CI*no loop devices here*"])


def test_privileged_skip_is_a_skip_elsewhere(suite: pytest.Pytester,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILSNAP_REQUIRE_PRIVILEGED", raising=False)
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(skipped=2)
