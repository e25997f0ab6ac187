"""GOOD, failover (issue 12): an application writing in a loop with
retryable writes (the driver's default) while the primary steps down. Four
threads each insert uniquely keyed documents and increment their own counter
(upsert + $inc). Mid-run, one insert is held by the emulator
(`blockConnection`), the operator steps the primary down (the member closes
every connection: the held insert and whatever else is in flight are cut),
and the next member becomes primary. PyMongo retries each cut write once, on
the new primary, with the same lsid and txnNumber; the server answers a
write that had been applied from its retry history.
"ok": every write acknowledged without an error reaching the application,
every document present exactly once, every counter equal to its thread's
increments (none lost, none applied twice), the primary changed, at least
one write sent twice with one lsid and txnNumber (the retry), no lsid in
flight twice.
"""
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from harness import retried_writes, run_scenario, run_workers, step_down_under  # noqa: E402

APP = "interop-py-failover-writes"
WORKERS = 4
WRITES_PER_WORKER = 12  # each: one insert and one $inc
STEP_DOWN_AFTER = 4  # inserts acknowledged per worker before the step-down


def body(ctx):
    client, tracker = ctx.client(appname=APP)
    operator, _ = ctx.client(appname="interop-py-failover-operator")
    db = client.get_default_database("interop")
    db.docs.delete_many({})
    db.counters.delete_many({})

    acknowledged = [0]
    lock = threading.Lock()

    def worker(w, step_down_point):
        for i in range(WRITES_PER_WORKER):
            db.docs.insert_one({"_id": f"w{w}-{i}", "worker": w, "i": i})
            db.counters.update_one({"_id": f"w{w}"}, {"$inc": {"n": 1}}, upsert=True)
            with lock:
                acknowledged[0] += 1
                if acknowledged[0] == WORKERS * STEP_DOWN_AFTER:
                    step_down_point.set()

    # An insert is held, so the step-down certainly cuts a write in flight;
    # a write error reaching the application raises out of run_workers.
    before, after = run_workers(WORKERS, worker, lambda: step_down_under(operator, tracker, APP, "insert"))

    stored = list(db.docs.find({}))
    ids = {d["_id"] for d in stored}
    counts = [c["n"] for c in db.counters.find({}).sort("_id", 1)]
    retried = {"insert": retried_writes(tracker, "insert"), "update": retried_writes(tracker, "update")}
    return {
        "ok": len(stored) == WORKERS * WRITES_PER_WORKER
        and len(ids) == len(stored)
        and counts == [WRITES_PER_WORKER] * WORKERS
        and before is not None
        and after is not None
        and before != after
        and retried["insert"] + retried["update"] >= 1
        and not tracker.same_lsid_overlaps,
        "documents": len(stored),
        "distinct": len(ids),
        "counters": counts,
        "primaryChanged": before != after,
        "retried": retried,
        "failedAttempts": [f"{f['command']}:{f.get('name') or f.get('codeName')}" for f in tracker.failures()],
    }


run_scenario("py-failover-retryable-writes", body)
