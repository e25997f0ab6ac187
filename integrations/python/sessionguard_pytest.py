"""sessionguard test marks for pytest (and pytest-xdist).

Tells ``sessionguard exec`` when each test begins and ends, and in which
process, so that a finding can name the test that caused it (see
integrations/PROTOCOL.md). Enable it with ``-p sessionguard_pytest`` (this
file on the Python path), or ``pip install`` this folder and its ``pytest11``
entry point loads it. Without ``SESSIONGUARD_MARKS_URL`` it registers no hook
at all.

A test never waits on the network: each mark is stamped with the time
(sessionguard places it by that time, not by its arrival) and queued; a daemon
thread sends what gathered in BATCH_S in one request, on one kept-alive
connection. At the end of the session (in each pytest-xdist worker too) the
plugin waits, at most FLUSH_S, for the queue to drain. After its first failure
(refused, timed out, non-2xx) it stops sending for the rest of the process, so
an unreachable endpoint costs one bounded wait at the end, never a failed test.
"""

import os
import threading
import time

import pytest

URL_VAR = "SESSIONGUARD_MARKS_URL"
TIMEOUT_S = 1.0  # one request: connection and response
FLUSH_S = 1.0  # the final flush, in total
BATCH_S = 0.1  # how long marks gather before a request
MAX_BATCH = 500  # marks per request (PROTOCOL.md)


def pytest_configure(config):
    url = os.environ.get(URL_VAR)
    if url:
        try:
            marks = _Marks(url)
        except ValueError:  # not a URL (a bad port, a bad IPv6 literal): stay off
            return
        config.pluginmanager.register(marks, "sessionguard-marks")


class _Marks:
    def __init__(self, url):
        # Imported here, once, before the first test: the sender needs them,
        # and importing http.client takes some 20 ms of CPU that would
        # otherwise land in the middle of the run.
        import http.client
        import json
        from urllib.parse import urlsplit

        self._http = http.client
        self._json = json
        parts = urlsplit(url)
        self._failed = parts.scheme != "http" or not parts.hostname
        self._address = (parts.hostname, parts.port or 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._conn = None
        # Guards the queue, `_busy` and `_failed`; the sender waits on it for
        # marks, flush() for the sender.
        self._cond = threading.Condition()
        self._queue = []
        self._busy = False  # the sender holds a batch it has not finished sending
        self._idle = False  # the sender waits for a first mark
        self._flushing = False  # flush() waits: send without gathering
        self._sender = None
        # Test file -> its `file` field, relative to the directory pytest ran
        # in: the same for a test's begin and end even if a test changes the
        # working directory, and computed once per file.
        self._cwd = os.getcwd()
        self._files = {}

    # The outermost wrapper of the whole protocol (setup, call, teardown), so
    # the fixtures set up or torn down for a test fall inside its marks. Under
    # pytest-xdist each worker process runs this for the tests it runs.
    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.mark("begin", item)
        yield
        self.mark("end", item)

    # Before pytest-xdist's worker reports itself finished (its hook wraps
    # this one), so the controller cannot end the worker with marks queued.
    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        self.flush(FLUSH_S)

    def mark(self, event, item):
        """Queues one mark, stamped with the wall clock now (Unix epoch
        milliseconds, the clock sessionguard stamps each request with)."""
        now = time.time_ns() / 1e6
        if self._failed:
            return
        path = str(item.path)
        file = self._files.get(path)
        if file is None:
            file = self._files[path] = _relative(path, self._cwd)
        mark = {"event": event, "test": item.nodeid, "file": file, "pid": os.getpid(), "time": now}
        with self._cond:
            if self._failed:
                return
            self._queue.append(mark)
            if self._sender is None:
                try:
                    self._sender = threading.Thread(target=self._run, name="sessionguard-marks", daemon=True)
                    self._sender.start()
                except RuntimeError:  # no thread to be had: stay off, never fail the test
                    self._failed = True
                    self._queue.clear()
            elif self._idle:
                self._cond.notify_all()

    def flush(self, timeout):
        """Waits until everything queued so far was sent (or given up), at most
        `timeout` seconds; after that the endpoint counts as failed, so no later
        flush waits again."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushing = True
            self._cond.notify_all()
            try:
                while (self._queue or self._busy) and not self._failed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._failed = True
                        self._queue.clear()
                        return
                    self._cond.wait(remaining)
            finally:
                self._flushing = False

    def _run(self):
        while True:
            with self._cond:
                self._idle = True
                while not self._queue:
                    self._cond.wait()
                self._idle = False
                # A request costs the test process far more than a mark:
                # gathering makes it one per many tests. (mark() does not
                # wake this wait; flush() does.)
                self._cond.wait_for(lambda: self._flushing or len(self._queue) >= MAX_BATCH, BATCH_S)
                batch = self._queue[:MAX_BATCH]
                del self._queue[:MAX_BATCH]
                self._busy = True
            # One mark: the single-object body of PROTOCOL.md; several: an array.
            body = self._json.dumps(batch[0] if len(batch) == 1 else batch).encode()
            try:
                self._send(body)
                ok = True
            except Exception:
                ok = False
                self._close()
            with self._cond:
                self._busy = False
                if not ok:
                    self._failed = True
                    self._queue.clear()
                self._cond.notify_all()
                if self._failed:
                    return

    def _send(self, body):
        reused = self._conn is not None
        try:
            self._exchange(body)
        except ConnectionError:
            # A kept-alive connection the server closed while it sat idle:
            # once more on a fresh one, rather than give up on a healthy
            # endpoint. (A timeout is not retried.)
            if not reused:
                raise
            self._close()
            self._exchange(body)

    def _exchange(self, body):
        if self._conn is None:
            self._conn = self._http.HTTPConnection(*self._address, timeout=TIMEOUT_S)
        self._conn.request("POST", self._path, body, {"Content-Type": "application/json"})
        response = self._conn.getresponse()
        response.read()
        if not 200 <= response.status < 300:
            raise ValueError(f"sessionguard marks: HTTP {response.status}")

    def _close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _relative(path, cwd):
    """The test file as PROTOCOL.md wants it: relative to the working directory
    (forward slashes) when it is inside it, else absolute."""
    absolute = os.path.abspath(path)
    if absolute == cwd or os.path.commonpath([cwd, absolute]) != cwd:
        return absolute
    return os.path.relpath(absolute, cwd).replace(os.sep, "/")
