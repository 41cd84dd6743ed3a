"""`make test` fails when a test is skipped for a reason tests/conftest.py does not allow, or xfails."""

from __future__ import annotations

import os
import subprocess
import sys

from idp_pipelines.settings import REPO_ROOT

CASES = '''
import pytest

def test_skipped_by_hand():
    pytest.skip("the build is missing")

@pytest.mark.skipif(True, reason="run as root")
def test_skipif():
    pass

@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False

def test_runs():
    pass
'''


def _pytest(tmp_path, name: str, text: str) -> subprocess.CompletedProcess:
    (tmp_path / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    # tests/conftest.py as a plugin, on files outside the tree (its own conftest would be found otherwise)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "-q", "--rootdir", str(tmp_path), str(tmp_path / name)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_skip_without_an_allowed_reason_fails_the_run(tmp_path):
    out = _pytest(tmp_path, "test_cases.py", CASES)
    assert out.returncode == 1, out.stdout
    text = out.stdout
    assert "skipped for a reason not in ALLOWED_SKIPS (tests/conftest.py, listed in the README): " \
           "'the build is missing'" in text
    assert "'run as root'" in text
    assert "xfail is not allowed in this project" in text and "known bug" in text
    assert "1 passed" in text and " skipped" not in text.splitlines()[-1]


def test_a_module_skipped_at_import_fails_the_run(tmp_path):
    out = _pytest(tmp_path, "test_importorskip.py",
                  "import pytest\npytest.importorskip('no_such_module_idp')\n\ndef test_x():\n    pass\n")
    assert out.returncode != 0, out.stdout
    assert "could not import 'no_such_module_idp'" in out.stdout and "ALLOWED_SKIPS" in out.stdout
