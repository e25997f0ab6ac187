"""A stand-in for the marks endpoint of `sessionguard exec`, for testing the
runner integrations (integrations/test.sh) without the Rust side.

It speaks integrations/PROTOCOL.md and writes everything it receives to a
JSON-lines log, in arrival order, each line with a sequence number:
- POST /marks           a mark: checked against the protocol, 204 (400 if invalid)
- POST /drop            the same, then closes the connection unannounced
- POST /slow            never answers in time (holds the request 30 s): the
                        "sessionguard hangs" case
- POST /error           500: the "sessionguard is broken" case
- GET  /probe?token=T&pid=P
                        sent by a sample test from its body or hooks: records
                        which tests its process has open at that moment, which
                        shows the `begin` arrived before the body ran
It also numbers the TCP connections, so the log shows keep-alive at work.

Usage: stub_server.py --log FILE --port-file FILE   (listens on 127.0.0.1:0)
"""

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

EVENTS = ("begin", "end")


class Stub:
    def __init__(self, log_path):
        self.lock = threading.Lock()
        self.log = open(log_path, "a", encoding="utf-8")
        self.seq = 0
        self.connections = 0
        self.open = {}  # pid -> list of test names open in it, in begin order
        self.stop = threading.Event()

    def record(self, entry, update=None):
        with self.lock:
            if update:
                update()
            self.seq += 1
            entry["seq"] = self.seq
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()


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
    return None


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
            path = urlsplit(self.path).path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                mark = json.loads(body)
            except ValueError:
                mark = None
            if path in ("/slow", "/error"):
                pid = mark.get("pid") if isinstance(mark, dict) else None
                stub.record({"kind": path[1:], "pid": pid, "conn": self.conn_id})
                if path == "/error":
                    return self.reply(500)
                stub.stop.wait(30)
                return self.reply(204)
            if path not in ("/marks", "/drop"):
                return self.reply(404)
            reason = invalid_reason(mark)
            if reason is None and self.headers.get("Content-Type") != "application/json":
                reason = "content-type"
            if reason:
                stub.record({"kind": "invalid", "reason": reason, "conn": self.conn_id})
                return self.reply(400)

            def update():
                names = stub.open.setdefault(mark["pid"], [])
                if mark["event"] == "begin":
                    names.append(mark["test"])
                elif mark["test"] in names:
                    names.remove(mark["test"])

            # Recorded before the reply goes out: once the runner sees the
            # 204, the mark is in effect.
            stub.record({"kind": "mark", **mark, "conn": self.conn_id}, update)
            self.reply(204)
            # /drop: the reply says nothing of closing, yet the connection is
            # closed right after it, as a server closes an idle keep-alive
            # connection: the client must not take that for an outage.
            self.close_connection = path == "/drop"

        def do_GET(self):
            url = urlsplit(self.path)
            if url.path != "/probe":
                return self.reply(404)
            query = parse_qs(url.query)
            pid = int(query["pid"][0])
            entry = {"kind": "probe", "token": query["token"][0], "pid": pid}
            stub.record(entry, lambda: entry.update(open=list(stub.open.get(pid, []))))
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
