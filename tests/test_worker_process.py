"""The JSON-lines worker protocol both benchmarks use (edge_runtime/worker_process.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edge_runtime.worker_process import WorkerDied, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
ECHO_WORKER = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from edge_runtime.worker_process import one_line, serve

def handle(message):
    if message.get("op") == "boom":
        raise ValueError("bad request\\nsecond line")
    if message.get("op") == "die":
        print("worker is going down", file=sys.stderr, flush=True)
        raise SystemExit(3)
    print("library chatter on stdout")  # must not reach the protocol
    return {{"echo": message}}

sys.exit(serve(handle, lambda exc: {{"error": one_line(exc)}} if isinstance(exc, ValueError) else None))
"""


@pytest.fixture
def worker():
    """An echo worker whose spec reply has been read."""
    process = WorkerProcess(
        [sys.executable, "-c", ECHO_WORKER],
        {"spec": 1},
        "echo worker",
        lambda reply: RuntimeError(reply["error"]),
    )
    try:
        assert process.receive() == {"echo": {"spec": 1}}
        yield process
    finally:
        process.close()


def test_replies_in_order_and_stdout_noise_stays_out_of_the_protocol(worker):
    assert worker.request({"op": "x", "n": 2}) == {"echo": {"op": "x", "n": 2}}


def test_an_error_reply_raises_the_callers_exception_and_the_worker_lives_on(worker):
    with pytest.raises(RuntimeError, match=r"^ValueError: bad request$"):
        worker.request({"op": "boom"})
    assert worker.request({"op": "again"}) == {"echo": {"op": "again"}}


def test_a_dead_worker_is_named_with_its_last_stderr_line(worker):
    with pytest.raises(WorkerDied, match="^echo worker died: worker is going down$"):
        worker.request({"op": "die"})
