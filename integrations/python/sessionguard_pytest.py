"""sessionguard test marks for pytest (and pytest-xdist).

Tells ``sessionguard exec`` when each test begins and ends, and in which
process, so that a finding can name the test that caused it (see
integrations/PROTOCOL.md). Enable it with ``-p sessionguard_pytest`` (this
file on the Python path), or ``pip install`` this folder and its ``pytest11``
entry point loads it. Without ``SESSIONGUARD_MARKS_URL`` it registers no hook
at all. After its first failure (refused, timed out, non-2xx) it stops sending
for the rest of the process, so a test never fails, and waits at most one
timeout, because sessionguard is unreachable.
"""

import os
import threading

import pytest

URL_VAR = "SESSIONGUARD_MARKS_URL"
TIMEOUT_S = 1.0


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
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self._failed = parts.scheme != "http" or not parts.hostname
        self._address = (parts.hostname, parts.port or 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._conn = None
        self._lock = threading.Lock()

    # The outermost wrapper of the whole protocol (setup, call, teardown), so
    # the fixtures set up or torn down for a test fall inside its marks. Under
    # pytest-xdist each worker process runs this for the tests it runs.
    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self._post("begin", item)
        yield
        self._post("end", item)

    def _post(self, event, item):
        import json

        mark = {"event": event, "test": item.nodeid, "file": _relative(str(item.path)), "pid": os.getpid()}
        body = json.dumps(mark).encode()
        with self._lock:
            if self._failed:
                return
            try:
                self._send(body)
            except Exception:
                self._failed = True
                self._close()

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
        import http.client

        if self._conn is None:
            self._conn = http.client.HTTPConnection(*self._address, timeout=TIMEOUT_S)
        self._conn.request("POST", self._path, body, {"Content-Type": "application/json"})
        response = self._conn.getresponse()
        response.read()
        if not 200 <= response.status < 300:
            raise ValueError(f"sessionguard marks: HTTP {response.status}")

    def _close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _relative(path):
    """The test file as PROTOCOL.md wants it: relative to the working directory
    (forward slashes) when it is inside it, else absolute."""
    cwd = os.getcwd()
    absolute = os.path.abspath(path)
    if absolute == cwd or os.path.commonpath([cwd, absolute]) != cwd:
        return absolute
    return os.path.relpath(absolute, cwd).replace(os.sep, "/")
