"""Waiting for a tracking server: every MLflow call of the runner goes through :func:`retry`,
which retries a lost race for SQLite's write lock and waits, with back-off and a line on the
launch's terminal, for a server that does not answer; :func:`say` and :class:`EventTail` carry
those lines from trials to the driver's terminal.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from timematch.errors import TimeMatchError


T = TypeVar("T")
#: How long a trial or the driver waits for a tracking server that does not answer before it
#: gives up naming it ($TIMEMATCH_TRACKING_PATIENCE_S); the trial then fails (Tune retries it)
#: and ``--resume`` finishes the sweep once the server is back.
PATIENCE_S = 600.0
PATIENCE_VARIABLE = "TIMEMATCH_TRACKING_PATIENCE_S"
#: The file a trial appends its tracking messages to (the driver shows them: worker output is
#: not forwarded without --verbose); unset in the driver, which prints them itself.
EVENTS_VARIABLE = "TIMEMATCH_EVENTS_FILE"


def say(message: str) -> None:
    """Show ``message`` on the launch's terminal, from the driver or from a trial."""
    events = os.environ.get(EVENTS_VARIABLE)
    if not events:
        print(message, file=sys.stderr, flush=True)
        return
    line = f"{message} (on {socket.gethostname()}, pid {os.getpid()})\n"
    try:
        with open(events, "a") as handle:  # one short append: whole lines, whatever the writers
            handle.write(line)
    except OSError:
        print(message, file=sys.stderr, flush=True)


class EventTail:
    """The driver's side of :func:`say`: a thread printing the lines trials append to ``path``."""

    def __init__(self, path: Path, show: Callable[[str], None], every_s: float = 1.0) -> None:
        self.path, self.show, self.every_s = Path(path), show, every_s
        self.offset = self.path.stat().st_size if self.path.is_file() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="timematch-events", daemon=True)

    def __enter__(self) -> "EventTail":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._read()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._read()

    def _read(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as handle:
            handle.seek(self.offset)
            text = handle.read()
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            self.show(f"[trial] {line}")


class TrackingUnavailable(TimeMatchError):
    """The tracking server did not answer within the patience."""


def _server_down(err: BaseException) -> bool:
    """Whether ``err`` says the tracking server did not answer (not that it refused a request)."""
    text = f"{type(err).__name__}: {err}".lower()
    return any(word in text for word in ("connection refused", "max retries exceeded", "connectionerror",
                                         "failed to establish a new connection", "read timed out",
                                         "remote end closed connection", "connection reset", "bad gateway",
                                         "service unavailable")) or bool(
        re.search(r"(error code|status code|status|http) 50[234]\b", text))


def patience() -> float:
    """``$TIMEMATCH_TRACKING_PATIENCE_S``, else :data:`PATIENCE_S`."""
    try:
        return float(os.environ.get(PATIENCE_VARIABLE, PATIENCE_S))
    except ValueError:
        return PATIENCE_S


def retry(call: Callable[[], T], attempts: int = 6, what: str = "") -> T:
    """Run a tracking call; retry one that lost a race for the SQLite write lock (trials log
    concurrently), and one that found the tracking server down: back-off 2, 4, ... 30 s, each
    wait said on the terminal, for up to ``$TIMEMATCH_TRACKING_PATIENCE_S`` (600 s), then
    :class:`TrackingUnavailable` naming the server."""
    delay = 0.2
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - only lock and connection errors are retried
            if _server_down(err):
                return _wait_for_server(call, err, what)
            if "locked" not in str(err).lower() or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _wait_for_server(call: Callable[[], T], first: BaseException, what: str) -> T:
    server = os.environ.get("MLFLOW_TRACKING_URI") or "the tracking server"
    patience_s = patience()
    started = time.monotonic()
    delay, err = 2.0, first
    while True:
        waited = time.monotonic() - started
        if waited + delay > patience_s:
            raise TrackingUnavailable(
                f"the MLflow server {server} has not answered for {waited:.0f} s "
                f"({type(err).__name__}); giving up{f' on {what}' if what else ''}. Start it again and "
                "continue with: python launch.py --resume"
            ) from None
        say(f"[tracking] the MLflow server {server} does not answer ({short_error(err)}); retrying in {delay:.0f} s "
            f"(waited {waited:.0f} s of {patience_s:.0f} s)")
        time.sleep(delay)
        try:
            result = call()
        except Exception as again:  # noqa: BLE001
            if not _server_down(again):
                raise
            err = again
            delay = min(delay * 2, 30.0)
            continue
        say(f"[tracking] the MLflow server {server} answers again after {time.monotonic() - started:.0f} s")
        return result


def short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:160]
