"""A stand-in for the marks endpoint of `sessionguard exec`, for testing the
runner integrations (integrations/test.sh) without the Rust side.

It speaks integrations/PROTOCOL.md and writes everything it receives to a
JSON-lines log, in arrival order, each line with a sequence number; each mark
with the time the stub received it (`received`, the wall clock in Unix epoch
milliseconds, the clock the proxy stamps requests with), the request it came
in (`request`) and how many marks that request carried (`batch`):
- POST /marks           one mark or an array of marks: checked against the
                        protocol, 204 (400 if invalid, and none is recorded)
- POST /drop            the same, then closes the connection unannounced
- POST /delay           the same, answered 150 ms late: a slow but healthy
                        endpoint, so that marks are still queued or in flight
                        when a test file or process ends
- POST /slow            never answers: holds the request until the client
                        gives up (or 30 s): the "sessionguard hangs" case
- POST /error           500: the "sessionguard is broken" case
- GET  /probe?token=T&pid=P&time=MS
                        sent by a sample test from its body or hooks: records
                        its pid, the time the test read on its own clock (MS)
                        and the time the stub received it, as the proxy
                        receives a test's MongoDB request
It also numbers the TCP connections, so the log shows keep-alive at work.

Usage: stub_server.py --log FILE --port-file FILE   (listens on 127.0.0.1:0)
"""

import argparse
import json
import math
import os
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

EVENTS = ("begin", "end")
DELAY_S = 0.15


class Stub:
    def __init__(self, log_path):
        self.lock = threading.Lock()
        self.log = open(log_path, "a", encoding="utf-8")
        self.seq = 0
        self.connections = 0
        self.requests = 0
        self.stop = threading.Event()

    def record(self, entry, update=None):
        with self.lock:
            if update:
                update()
            self.seq += 1
            entry["seq"] = self.seq
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()


def now_ms():
    return time.time_ns() / 1e6


def invalid_reason(mark):
    if not isinstance(mark, dict):
        return "not an object"
    if mark.get("event") not in EVENTS:
        return "event"
    if not isinstance(mark.get("test"), str) or not mark["test"]:
        return "test"
    if not isinstance(mark.get("file"), str):
        return "file"
    if not isinstance(mark.get("pid"), int) or isinstance(mark.get("pid"), bool) or mark["pid"] <= 0:
        return "pid"
    t = mark.get("time")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        return "time"
    return None


def marks_of(body):
    """The marks of a request body (one object, or a non-empty array of them),
    or the reason it is invalid."""
    if isinstance(body, list):
        if not body:
            return None, "empty array"
        marks = body
    else:
        marks = [body]
    for mark in marks:
        reason = invalid_reason(mark)
        if reason:
            return None, reason
    return marks, None


def make_handler(stub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def setup(self):
            super().setup()
            with stub.lock:
                stub.connections += 1
                self.conn_id = stub.connections

        def log_message(self, *args):
            pass

        def reply(self, status, body=b""):
            self.send_response(status)
            if body:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            received = now_ms()
            path = urlsplit(self.path).path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(body)
            except ValueError:
                body = None
            if path in ("/slow", "/error"):
                first = body[0] if isinstance(body, list) and body else body
                pid = first.get("pid") if isinstance(first, dict) else None
                stub.record({"kind": path[1:], "pid": pid, "conn": self.conn_id})
                if path == "/error":
                    return self.reply(500)
                return self.hold()
            if path not in ("/marks", "/drop", "/delay"):
                return self.reply(404)
            marks, reason = marks_of(body)
            if reason is None and self.headers.get("Content-Type") != "application/json":
                reason = "content-type"
            if reason:
                stub.record({"kind": "invalid", "reason": reason, "conn": self.conn_id})
                return self.reply(400)
            with stub.lock:
                stub.requests += 1
                request = stub.requests
            for mark in marks:
                entry = {"kind": "mark", **mark, "received": received, "request": request, "batch": len(marks)}
                stub.record({**entry, "conn": self.conn_id})
            if path == "/delay":
                stub.stop.wait(DELAY_S)
            self.reply(204)
            # /drop: the reply says nothing of closing, yet the connection is
            # closed right after it, as a server closes an idle keep-alive
            # connection: the client must not take that for an outage.
            self.close_connection = path == "/drop"

        def hold(self):
            """Holds a /slow request without answering, until the client
            closes the connection (its timeout) or the stub stops."""
            try:
                deadline = time.monotonic() + 30
                while not stub.stop.is_set() and time.monotonic() < deadline:
                    readable, _, _ = select.select([self.connection], [], [], 0.05)
                    if readable and not self.connection.recv(1, socket.MSG_PEEK):
                        break  # the client gave up
            except OSError:
                pass
            self.close_connection = True

        def do_GET(self):
            received = now_ms()
            url = urlsplit(self.path)
            if url.path != "/probe":
                return self.reply(404)
            query = parse_qs(url.query)
            pid = int(query["pid"][0])
            entry = {
                "kind": "probe",
                "token": query["token"][0],
                "pid": pid,
                "time": float(query["time"][0]),
                "received": received,
            }
            stub.record(entry)
            self.reply(200, json.dumps(entry).encode())

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that gave up (the /slow case) before the reply: expected.
        pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    stub = Stub(args.log)
    server = Server(("127.0.0.1", 0), make_handler(stub))
    with open(args.port_file + ".tmp", "w", encoding="utf-8") as f:
        f.write(str(server.server_address[1]))
    # Renamed into place, so a reader never sees a half-written port.
    os.replace(args.port_file + ".tmp", args.port_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stub.stop.set()


if __name__ == "__main__":
    main()
