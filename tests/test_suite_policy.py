"""The hooks of tests/conftest.py, run in an inner pytest session: a `server` or `browser` test that skips fails
unless HARNESS_ALLOW_SKIP names one of its marks (other skips and xfails are left alone), and slow tests get a
longer timeout than the ini's."""

from __future__ import annotations

from pathlib import Path

import pytest

INNER_TESTS = '''
import pytest

@pytest.mark.browser
@pytest.mark.server
def test_chromium_page():
    pytest.skip("chromium is not installed")

@pytest.mark.server
@pytest.mark.skipif(True, reason="initdb not found")
def test_postgres_study():
    pass

def test_unmarked():
    pytest.skip("no prerequisite of ours")

@pytest.mark.server
@pytest.mark.xfail(reason="known bug", strict=True)
def test_known_bug():
    assert False
'''


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """Runs INNER_TESTS under this suite's conftest with HARNESS_ALLOW_SKIP set to `allow` (None: unset)."""
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    server: x\n    browser: x\n")
    pytester.makepyfile(test_inner=INNER_TESTS)

    def run(allow: str | None) -> pytest.RunResult:
        if allow is None:
            monkeypatch.delenv("HARNESS_ALLOW_SKIP", raising=False)
        else:
            monkeypatch.setenv("HARNESS_ALLOW_SKIP", allow)
        return pytester.runpytest("-p", "no:cacheprovider", "-rA")

    return run


def test_a_prerequisite_skip_fails_by_default(inner):
    result = inner(None)
    # the body's skip fails the test; the skipif (setup phase) is reported as an error
    result.assert_outcomes(failed=1, errors=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(["*a browser and server test skipped: chromium is not installed*",
                                 "*HARNESS_ALLOW_SKIP=browser*"])
    result.stdout.fnmatch_lines(["*a server test skipped: initdb not found*"])


def test_naming_a_mark_allows_its_skips_only(inner):
    inner("browser").assert_outcomes(errors=1, skipped=2, xfailed=1)
    inner(" server ").assert_outcomes(skipped=3, xfailed=1)  # the browser test is a server test too


def test_all_allows_every_prerequisite_skip(inner):
    inner("all").assert_outcomes(skipped=3, xfailed=1)


def test_slow_tests_outlive_the_ini_timeout(pytester: pytest.Pytester):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makeini("[pytest]\ntimeout = 1\nmarkers =\n    slow: x\n")
    pytester.makepyfile(test_inner='''
import time
import pytest

@pytest.mark.slow
def test_slow():
    time.sleep(1.5)

def test_unmarked():
    time.sleep(1.5)

@pytest.mark.slow
@pytest.mark.timeout(1)
def test_slow_with_its_own_timeout():
    time.sleep(1.5)
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*FAILED test_inner.py::test_unmarked*",
                                 "*FAILED test_inner.py::test_slow_with_its_own_timeout*"])


def test_the_scheduling_lists_name_tests_that_exist(request: pytest.FixtureRequest):
    """LONGEST_FIRST and SHARED_FIXTURE_GROUPS (tests/conftest.py, used under `pytest -n 2`) name real test files and
    functions: a renamed test would otherwise lose its place silently (handed out last, or its shared fixture built
    once per worker)."""
    root = Path(__file__).parent
    (conftest,) = [plugin for plugin in request.config.pluginmanager.get_plugins()
                   if getattr(plugin, "__file__", None) == str(root / "conftest.py")]
    for name in [*conftest.LONGEST_FIRST, *conftest.SHARED_FIXTURE_GROUPS]:
        path, _, function = name.partition("::")
        source = (root.parent / path).read_text()
        assert not function or f"\ndef {function}(" in source, name
