"""The extension loads with mimalloc off transparent huge pages, the process keeping them
(decision 0009)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

PROBE = """
import os
import ferroparallel
session = ferroparallel.Session(key=b"k")
for _ in range(1000):  # the extension allocates
    session.serialize("apply_request", {"a": 1})
status = open('/proc/self/status').read()
thp = status.split('THP_enabled:')[1].split()[0] if 'THP_enabled:' in status else '?'
# mappings advised for huge pages (VmFlags "hg"): only mimalloc's would be, in this process
flags = [line for line in open('/proc/self/smaps') if line.startswith('VmFlags')]
advised = sum(1 for line in flags if ' hg' in line)
print(thp, os.environ.get('MIMALLOC_ALLOW_THP', '-'), advised)
"""


def _run(env_extra: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "MIMALLOC_ALLOW_THP"}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_process_keeps_huge_pages_and_the_option_is_not_inherited() -> None:
    thp, option, advised = _run({})
    assert advised == "0"  # mimalloc did not ask for huge pages
    assert option == "-"  # not left in the environment for subprocesses
    if thp != "?":  # kernels without the status field
        assert thp == "1"


def test_a_users_own_setting_is_kept() -> None:
    thp, option, _ = _run({"MIMALLOC_ALLOW_THP": "0"})
    assert option == "0"
    if thp != "?":
        assert thp == "0"  # mimalloc's own process-wide switch, as the user asked
    _, option, advised = _run({"MIMALLOC_ALLOW_THP": "1"})
    assert option == "1" and advised != "0"  # the probe does see advised mappings
