"""BAD: one ClientSession used from two threads at once. PyMongo documents
sessions as not thread-safe, and neither the driver nor the server stops it:
both threads' commands carry the same lsid at the same time (and retryable
writes on it may even share a txnNumber, which makes the server skip one as a
retry). "ok": the same lsid was in flight twice; driver errors and lost
writes are recorded.
"""
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from harness import run_scenario  # noqa: E402

ROUNDS = 5


def body(ctx):
    client, tracker = ctx.client(maxPoolSize=4)
    coll = client.get_default_database("interop").get_collection("shared")
    coll.delete_many({})
    session = client.start_session()  # the bug: handed to both threads
    barrier = threading.Barrier(2)

    def worker(name):
        for i in range(ROUNDS):
            barrier.wait()
            try:
                coll.insert_one({"thread": name, "i": i}, session=session)
            except Exception as err:  # recorded: this is what the bug produces
                ctx.record(err)

    threads = [threading.Thread(target=worker, args=(n,), name=f"worker-{n}") for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    session.end_session()
    stored = coll.count_documents({})
    txn_numbers = [c["txnNumber"] for c in tracker.commands("insert") if c["txnNumber"] is not None]
    return {
        "ok": len(tracker.same_lsid_overlaps) > 0,
        "sameLsidOverlaps": len(tracker.same_lsid_overlaps),
        "inserts": len(tracker.commands("insert")),
        "distinctTxnNumbers": len(set(txn_numbers)),
        "stored": stored,
        "lostWrites": 2 * ROUNDS - stored,
    }


run_scenario("py-shared-session-threads", body)
