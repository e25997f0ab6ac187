"""Probes what PyMongo needs from a server beyond the scenarios' patterns:
its handshake and monitoring (already exercised), an exhaust cursor, causal
consistency (operationTime / afterClusterTime), snapshot reads (atClusterTime),
retryable-write retry of the same statement, and a commit retried with the
same txnNumber. Each is checked against a MongoDB 7.0 replica-set primary.
"ok": every probe passed, except those marked with a known emulator gap
(interop/README.md, "Emulator gaps"), which are listed in observed.knownGaps.
"""
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bson.son import SON  # noqa: E402
from pymongo import CursorType  # noqa: E402
from pymongo.synchronous.pool import Connection  # noqa: E402

from harness import describe_error, run_scenario  # noqa: E402


def body(ctx):
    client, tracker = ctx.client()
    db = client.get_default_database("interop")
    db.items.drop()
    db.retry.drop()
    db.items.insert_many([{"i": i} for i in range(12)])
    results = []

    def probe(name, fn, known_gap=None):
        try:
            verdict = fn()
        except Exception as err:  # a failed probe, recorded with its error
            verdict = describe_error(err)
        results.append({"name": name, "pass": verdict is True, "knownGap": known_gap,
                        "detail": None if verdict is True else verdict})

    def exhaust_cursor():
        docs = list(db.items.find({}, cursor_type=CursorType.EXHAUST, batch_size=4))
        return len(docs) == 12 or {"docs": len(docs)}

    def exhaust_streams():
        # A real server answers an exhaust getMore with a stream of replies
        # (moreToCome): the driver sends one getMore and then only receives.
        # Command monitoring reports every streamed batch as a getMore, so
        # count the messages this thread really wrote (the monitor has its own).
        me = threading.get_ident()
        sent = []
        original = Connection.send_message

        def counting_send(conn, message, max_doc_size):
            if threading.get_ident() == me:
                sent.append(1)
            return original(conn, message, max_doc_size)

        Connection.send_message = counting_send
        try:
            list(db.items.find({}, cursor_type=CursorType.EXHAUST, batch_size=4))
        finally:
            Connection.send_message = original
        # find + one getMore when streamed; find + one getMore per batch otherwise.
        return len(sent) == 2 or {"messagesSent": len(sent)}

    def causal_consistency():
        with client.start_session(causal_consistency=True) as s:
            db.items.insert_one({"causal": True}, session=s)
            if s.operation_time is None:
                return {"operationTime": None}
            db.items.find_one({"causal": True}, session=s)
            find = tracker.commands("find")[-1]
            return find["afterClusterTime"] or {"afterClusterTime": False}

    def snapshot_reads():
        with client.start_session(snapshot=True) as s:
            list(db.items.find({}, session=s))
            list(db.items.find({}, session=s))
        second = tracker.commands("find")[-1]
        return second["atClusterTime"] or {"atClusterTime": False}

    def commit_retry():
        with client.start_session() as s:
            s.start_transaction()
            db.items.insert_one({"txn": 1}, session=s)
            s.commit_transaction()
            s.commit_transaction()  # the driver retries commit with the same txnNumber
        return True

    def retry_same_statement():
        # A retryable write resent with the same lsid/txnNumber/stmtId is
        # answered from the server's history, not executed twice.
        with client.start_session() as s:
            cmd = SON([("insert", "retry"), ("documents", [{"_id": "once"}]), ("txnNumber", 7)])
            first = db.command(cmd, session=s)
            second = db.command(cmd, session=s)
        stored = db.retry.count_documents({"_id": "once"})
        return (first["n"] == 1 and second["n"] == 1 and stored == 1) or {"first": first["n"], "second": second["n"], "stored": stored}

    probe("exhaust cursor returns every document", exhaust_cursor)
    probe("exhaust getMore is streamed (moreToCome)", exhaust_streams)
    probe("causal consistency: operationTime then afterClusterTime", causal_consistency)
    probe("snapshot session: atClusterTime reused", snapshot_reads)
    probe("commitTransaction retried with the same txnNumber", commit_retry)
    probe("retryable write resent: executed once", retry_same_statement)

    failed = [r for r in results if not r["pass"] and not r["knownGap"]]
    known = [{"gap": r["knownGap"], "probe": r["name"], "detail": r["detail"]}
             for r in results if not r["pass"] and r["knownGap"]]
    return {"ok": not failed, "passed": sum(r["pass"] for r in results), "knownGaps": known, "failed": failed}


run_scenario("py-protocol-probe", body)
