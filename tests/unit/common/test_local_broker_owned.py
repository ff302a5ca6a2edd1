"""An owned local broker (benches, tests) must not outlive a process killed hard:
its child gets SIGTERM from the kernel when the parent dies (PR_SET_PDEATHSIG).
Checked with a stand-in child (``sleep``) started exactly as the broker is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from services.common.kafka.local_broker import _alive

PARENT = """
import subprocess, sys, time
from services.common.kafka.local_broker import die_with_parent
child = subprocess.Popen(
    ["sleep", "60"], start_new_session=True, preexec_fn=die_with_parent() if sys.argv[1] == "owned" else None
)
print(child.pid, flush=True)
time.sleep(60)
"""


def _child_after_parent_killed(mode: str) -> int:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        return child
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_an_owned_child_dies_with_its_parent() -> None:
    child = _child_after_parent_killed("owned")
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_child_that_is_not_owned_outlives_its_parent() -> None:
    child = _child_after_parent_killed("free")
    try:
        time.sleep(0.3)
        assert _alive(child)
    finally:
        os.kill(child, signal.SIGKILL)
