"""Shared plumbing for the PyMongo interop scenarios.

Each scenario runs exactly one session pattern against MONGODB_URI and prints
one JSON line: {"scenario", "ok", "errors": [{name, code, codeName, labels}],
"observed": {...}}. "ok" means the pattern ran as intended (for the bad
pattern: the misuse reached the wire); driver errors are recorded, not fatal.
Exit status 0 when ok, 1 otherwise, 2 when MONGODB_URI is missing.

WireTracker is a pymongo CommandListener: it proves on the driver's side that
the pattern happened (one lsid in flight twice, ...), independently of
sessionguard, whose report is checked separately.
"""

import json
import os
import sys
import threading
import time
import traceback

from pymongo import MongoClient, monitoring


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
        self.seen = []  # every command started, in order
        self.in_flight = {}
        self.same_lsid_overlaps = []

    def started(self, event):

        entry = {
            "name": event.command_name,
            "lsid": lsid_hex(event.command),
            "txnNumber": event.command.get("txnNumber"),
            "startTransaction": bool(event.command.get("startTransaction")),
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

    def succeeded(self, event):
        self._on_finished(event, None)

    def failed(self, event):
        failure = event.failure if isinstance(event.failure, dict) else {"codeName": type(event.failure).__name__}
        self._on_finished(event, failure)

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
        tracker = WireTracker()
        client = MongoClient(
            self.uri,
            event_listeners=[tracker],
            serverSelectionTimeoutMS=5000,
            connectTimeoutMS=5000,
            appname=options.pop("appname", f"interop-{self.name}"),
            **options,
        )
        self.clients.append(client)
        return client, tracker


def run_scenario(name, body):
    uri = os.environ.get("MONGODB_URI")
    if not uri:
        print(json.dumps({"scenario": name, "ok": False, "errors": [{"name": "MONGODB_URI is not set"}]}))
        sys.exit(2)
    ctx = Context(name, uri)
    result = {"ok": False}
    try:
        result = body(ctx) or {"ok": False}
    except Exception as err:  # an unexpected failure: the scenario did not run as intended
        traceback.print_exc()
        ctx.errors.append(dict(unexpected=True, **describe_error(err)))
        result = {"ok": False}
    finally:
        for client in ctx.clients:
            try:
                client.close()
            except Exception as err:
                print(f"[{name}] close failed: {err}", file=sys.stderr)
    ok = result.pop("ok", False) is True
    print(json.dumps({"scenario": name, "ok": ok, "errors": ctx.errors, "observed": result}, default=str))
    sys.stdout.flush()
    sys.exit(0 if ok else 1)


def sleep_ms(ms):
    time.sleep(ms / 1000.0)
