"""A model under measurement in its own process, driven over JSON lines on stdin / stdout.

Benchmarks run each model in a child process so it has its own thread pool, its own memory and its
own peak RSS, and the parent can interleave several. Both drivers (`minicpmv-edge bench` and
`tools/bench_peers.py`) speak the same protocol, written once here:

* the parent sends one JSON object per line; the first is the worker's spec, `{"op": "stop"}` ends it;
* the worker answers every line with one JSON object, `{"error": ..., ...}` when the request failed;
* the worker's own stdout is its stderr, so a library that prints cannot corrupt the protocol, and the
  parent keeps the stderr to name the cause when a worker dies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

Reply = dict[str, Any]


class WorkerDied(RuntimeError):
    """The worker process exited or closed its protocol before answering."""


class WorkerProcess:
    """The parent's end: start `command`, send it `spec`, then request / reply until close().
    `label` names the worker in errors ("bench worker for int4 died: <its last stderr line>")."""

    def __init__(
        self,
        command: Sequence[str],
        spec: Reply,
        label: str,
        on_error: Callable[[Reply], Exception],
        env: dict[str, str] | None = None,
    ):
        self.label = label
        self._on_error = on_error
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        self.send(spec)  # the worker loads while the parent starts others

    def request(self, message: Reply) -> Reply:
        self.send(message)
        return self.receive()

    def send(self, message: Reply) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # receive() reports why the worker is gone

    def receive(self) -> Reply:
        """The next reply; a reply carrying "error" raises `on_error(reply)`."""
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise WorkerDied(f"{self.label} died: {self.stderr_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise self._on_error(reply)
        return reply

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else f"exit code {self._proc.poll()}"

    def close(self) -> None:
        try:
            if self._proc.poll() is None and self._proc.stdin is not None:
                self._proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
                self._proc.stdin.close()
            self._proc.wait(timeout=30)
        except (BrokenPipeError, OSError, ValueError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


def serve(
    handle: Callable[[Reply], Reply | None],
    describe_error: Callable[[Exception], Reply | None],
) -> int:
    """The worker's end: answer each line with `handle(message)` until {"op": "stop"}, end of input,
    or a None reply. `describe_error(exc)` turns a failed request into its error reply, or None for
    an exception the worker should not survive (it propagates)."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("op") == "stop":
            return 0
        try:
            reply = handle(message)
        except Exception as exc:  # noqa: BLE001 - describe_error decides which ones are answers
            reply = describe_error(exc)
            if reply is None:
                raise
        if reply is None:
            return 0
        protocol.write(json.dumps(reply) + "\n")
    return 0


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for error replies."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
