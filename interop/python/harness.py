"""Shared plumbing for the PyMongo interop scenarios.

Each scenario runs exactly one session pattern against MONGODB_URI and prints
one JSON line: {"scenario", "ok", "errors": [{name, code, codeName, labels}],
"observed": {...}}. "ok" means the pattern ran as intended (for the bad
pattern: the misuse reached the wire); driver errors are recorded, not fatal.
Exit status 0 when ok, 1 otherwise, 2 when MONGODB_URI is missing.

WireTracker is a pymongo CommandListener: it proves on the driver's side that
the pattern happened (one lsid in flight twice, ...), independently of
sessionguard, whose report is checked separately.

A scenario body is a plain function (the synchronous API: ctx.client()) or an
`async def` (PyMongo's asyncio API: ctx.async_client(), an AsyncMongoClient);
run_scenario runs the latter with asyncio.run and closes its clients on the
same event loop. The listener is the same for both: PyMongo calls it
synchronously, from the thread or the event loop that sent the command.
"""

import asyncio
import inspect
import json
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from pymongo import AsyncMongoClient, MongoClient, monitoring
from pymongo.errors import AutoReconnect


def describe_error(err):
    out = {"name": type(err).__name__}
    code = getattr(err, "code", None)
    if code is not None:
        out["code"] = code
    details = getattr(err, "details", None) or {}
    if isinstance(details, dict) and details.get("codeName"):
        out["codeName"] = details["codeName"]
    labels = list(getattr(err, "_error_labels", []) or [])
    if labels:
        out["labels"] = sorted(labels)
    return out


def lsid_hex(command):
    lsid = command.get("lsid") if hasattr(command, "get") else None
    if not lsid:
        return None
    return bytes(lsid["id"]).hex()


class WireTracker(monitoring.CommandListener):
    """Follows every command the client sends and which lsids overlapped."""

    def __init__(self):
        self._lock = threading.Lock()
        self._started = threading.Condition(self._lock)
        self.seen = []  # every command started, in order
        self.in_flight = {}
        self.same_lsid_overlaps = []

    def started(self, event):

        entry = {
            "name": event.command_name,
            "lsid": lsid_hex(event.command),
            "txnNumber": event.command.get("txnNumber"),
            "startTransaction": bool(event.command.get("startTransaction")),
            "inTransaction": event.command.get("autocommit") is False,
            "afterClusterTime": "afterClusterTime" in (event.command.get("readConcern") or {}),
            "atClusterTime": "atClusterTime" in (event.command.get("readConcern") or {}),
            "failure": None,
            "finished": False,
            "thread": threading.current_thread().name,
        }
        key = (event.connection_id, event.request_id)
        with self._lock:
            if entry["lsid"]:
                for other in self.in_flight.values():
                    if other["lsid"] == entry["lsid"]:
                        self.same_lsid_overlaps.append((other["name"], entry["name"]))
            self.seen.append(entry)
            self.in_flight[key] = entry
            self._started.notify_all()

    def _on_finished(self, event, failure):
        key = (event.connection_id, event.request_id)
        with self._lock:
            entry = self.in_flight.pop(key, None)
            if entry is None:
                return
            entry["finished"] = True
            if failure is not None:
                entry["failure"] = {
                    "code": failure.get("code"),
                    "codeName": failure.get("codeName"),
                }
                if failure.get("errtype"):
                    # A network error: PyMongo reports its exception class.
                    entry["failure"]["name"] = failure["errtype"]

    def succeeded(self, event):
        self._on_finished(event, None)

    def failed(self, event):
        failure = event.failure if isinstance(event.failure, dict) else {"codeName": type(event.failure).__name__}
        self._on_finished(event, failure)

    def wait_for(self, match, since=0, timeout=5.0):
        """The first command started at index `since` or later that `match`
        accepts; raises TimeoutError if none starts within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._started:
            while True:
                for entry in self.seen[since:]:
                    if match(entry):
                        return entry
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out waiting for a command on the wire")
                self._started.wait(left)

    def started_count(self):
        with self._lock:
            return len(self.seen)

    def commands(self, name):
        with self._lock:
            return [c for c in self.seen if c["name"] == name]

    def failures(self):
        with self._lock:
            return [dict(command=c["name"], **c["failure"]) for c in self.seen if c["failure"]]


class Context:
    def __init__(self, name, uri):
        self.name = name
        self.uri = uri
        self.errors = []
        self.clients = []

    def record(self, err):
        self.errors.append(describe_error(err))
        print(f"[{self.name}] recorded driver error: {type(err).__name__}: {err}", file=sys.stderr)

    def client(self, **options):
        """A MongoClient with a WireTracker and fail-fast timeouts."""
        return self._client(MongoClient, options)

    def async_client(self, **options):
        """The same for PyMongo's asyncio API: an AsyncMongoClient (its use
        needs a running event loop: call it from an async scenario body)."""
        return self._client(AsyncMongoClient, options)

    def _client(self, client_class, options):
        tracker = WireTracker()
        client = client_class(
            self.uri,
            event_listeners=[tracker],
            serverSelectionTimeoutMS=5000,
            connectTimeoutMS=5000,
            appname=options.pop("appname", f"interop-{self.name}"),
            **options,
        )
        self.clients.append(client)
        return client, tracker

    def close_sync_clients(self):
        for client in self.clients:
            if not isinstance(client, AsyncMongoClient):
                try:
                    client.close()
                except Exception as err:
                    print(f"[{self.name}] close failed: {err}", file=sys.stderr)

    async def close_async_clients(self):
        for client in self.clients:
            if isinstance(client, AsyncMongoClient):
                try:
                    await client.close()
                except Exception as err:
                    print(f"[{self.name}] close failed: {err}", file=sys.stderr)

    def unexpected(self, err):
        """An exception out of the body: the scenario did not run as intended."""
        traceback.print_exc()
        self.errors.append(dict(unexpected=True, **describe_error(err)))
        return {"ok": False}


def run_scenario(name, body):
    uri = os.environ.get("MONGODB_URI")
    if not uri:
        print(json.dumps({"scenario": name, "ok": False, "errors": [{"name": "MONGODB_URI is not set"}]}))
        sys.exit(2)
    ctx = Context(name, uri)

    async def run_async():
        # The async clients are closed on the loop that used them.
        try:
            return await body(ctx) or {"ok": False}
        except Exception as err:
            return ctx.unexpected(err)
        finally:
            await ctx.close_async_clients()

    if inspect.iscoroutinefunction(body):
        result = asyncio.run(run_async())
    else:
        try:
            result = body(ctx) or {"ok": False}
        except Exception as err:
            result = ctx.unexpected(err)
    ctx.close_sync_clients()
    ok = result.pop("ok", False) is True
    print(json.dumps({"scenario": name, "ok": ok, "errors": ctx.errors, "observed": result}, default=str))
    sys.stdout.flush()
    sys.exit(0 if ok else 1)


def sleep_ms(ms):
    time.sleep(ms / 1000.0)


# ------------------------------------------------------------------ faults
# For the failover scenarios (run.sh runs them against `sessionguard-dev emulator
# --members 3`, directly and through the proxy's per-member listeners): the
# emulator's `failCommand` fail point and `replSetStepDown`, sent by a
# separate "operator" client as a test harness or an operator would, never by
# the application's own client. The fail point is one per emulated deployment:
# scenarios restrict it with `appName` and turn it off when done.


def fail_point(operator, mode, data=None):
    """`configureFailPoint: "failCommand"`; returns the reply."""
    return operator.admin.command({"configureFailPoint": "failCommand", "mode": mode, "data": data or {}})


def primary_of(operator):
    """The replica set's primary as hello names it (the proxy's address
    through the proxy). PyMongo never retries `command()`: right after a
    step-down the operator's pooled connection to the old primary was closed
    by the server and the first command on it raises AutoReconnect, so it
    asks once more."""
    try:
        hello = operator.admin.command("hello")
    except AutoReconnect:
        hello = operator.admin.command("hello")
    return hello.get("primary")


def step_down(operator, secs=1):
    """Steps the primary down as an operator's failover drill does: the member
    answers, becomes a secondary for `secs` seconds and closes every client
    connection it has; the next member is elected at once. `force`, so it
    never waits for a catch-up (the emulated members share one data set).
    Returns (primary before, primary after)."""
    before = primary_of(operator)
    operator.admin.command({"replSetStepDown": secs, "force": True})
    return before, primary_of(operator)


def step_down_under(operator, tracker, app, command):
    """A failover under load: holds the application's next `command` on the
    primary (`blockConnection`, restricted to appName `app`), waits until the
    driver has sent it, steps the primary down — which cuts the held command
    and whatever else is in flight — and turns the fail point off. Returns
    step_down's (primary before, primary after)."""
    since = tracker.started_count()
    fail_point(operator, {"times": 1}, {"failCommands": [command], "appName": app, "blockConnection": True, "blockTimeMS": 5000})
    tracker.wait_for(lambda c: c["name"] == command, since=since)
    primaries = step_down(operator)
    fail_point(operator, "off")
    return primaries


def run_workers(count, worker, when_ready, wait_timeout=30):
    """Runs worker(w, ready) for w in 0..count-1 on threads; once a worker
    sets the threading.Event `ready`, calls when_ready() on this thread, and
    returns its result when every worker has finished (a worker's exception
    is raised here)."""
    ready = threading.Event()
    with ThreadPoolExecutor(count) as pool:
        work = [pool.submit(worker, w, ready) for w in range(count)]
        if not ready.wait(wait_timeout):
            raise TimeoutError("the workers did not reach the point to act at")
        result = when_ready()
        for done in work:
            done.result()
    return result


def retried_writes(tracker, name):
    """How many (lsid, txnNumber) pairs the driver sent `name` with more than
    once: a retryable write's retries, from its command monitoring."""
    sent = {}
    for c in tracker.commands(name):
        if c["lsid"] is not None and c["txnNumber"] is not None:
            key = (c["lsid"], c["txnNumber"])
            sent[key] = sent.get(key, 0) + 1
    return sum(1 for n in sent.values() if n > 1)
