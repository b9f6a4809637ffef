"""Runs the toy training but SIGKILLs itself in the middle of writing its N-th checkpoint (N from CRASH_AT_SAVE)."""
import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import infra.checkpoint as checkpoint  # noqa: E402

calls = {"n": 0}
original = checkpoint._fsync_tree


def fsync_then_maybe_die(root):
    original(root)
    calls["n"] += 1
    if calls["n"] == int(os.environ["CRASH_AT_SAVE"]):
        os.kill(os.getpid(), signal.SIGKILL)  # files written, COMPLETE marker not yet: a torn checkpoint


checkpoint._fsync_tree = fsync_then_maybe_die
sys.argv = [str(Path(__file__).with_name("toy_task.py"))] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
