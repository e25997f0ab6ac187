"""GOOD, failover (issue 12): `with_transaction` in a loop, one session per
transaction, four threads, while the primary steps down. Each transaction
records an order (unique _id) and takes one item off its thread's stock.
Mid-run, one commitTransaction is held by the emulator (`blockConnection`)
and the operator steps the primary down: the member aborts its transactions
in progress and closes every connection, cutting the held commit and the
statements in flight; the next member becomes primary. with_transaction
retries: a cut statement is a TransientTransactionError (the callback runs
again with a new txnNumber), a cut commit is retried, and the server answers
NoSuchTransaction (the step-down aborted it), so the callback runs again.
"ok": every order stored exactly once, each stock down by exactly its
thread's orders, no error reached the application, the primary changed, at
least one callback run again, no lsid in flight twice.
"""
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from harness import run_scenario, run_workers, step_down_under  # noqa: E402

APP = "interop-py-failover-txn"
WORKERS = 4
TXNS_PER_WORKER = 6
STEP_DOWN_AFTER = 2  # transactions committed per thread before the step-down
STOCK = 100


def body(ctx):
    client, tracker = ctx.client(appname=APP)
    operator, _ = ctx.client(appname="interop-py-failover-operator")
    db = client.get_default_database("interop")
    db.orders.delete_many({})
    db.stock.delete_many({})
    db.stock.insert_many([{"_id": f"widget-{w}", "count": STOCK} for w in range(WORKERS)])

    lock = threading.Lock()
    counts = {"runs": 0, "committed": 0}

    def place_order(w, i):
        def callback(session):
            with lock:
                counts["runs"] += 1
            db.orders.insert_one({"_id": f"w{w}-{i}", "worker": w}, session=session)
            db.stock.update_one({"_id": f"widget-{w}"}, {"$inc": {"count": -1}}, session=session)

        with client.start_session() as session:
            session.with_transaction(callback)

    def worker(w, step_down_point):
        for i in range(TXNS_PER_WORKER):
            place_order(w, i)
            with lock:
                counts["committed"] += 1
                if counts["committed"] == WORKERS * STEP_DOWN_AFTER:
                    step_down_point.set()

    # A commit is held, so the step-down certainly cuts one.
    before, after = run_workers(WORKERS, worker, lambda: step_down_under(operator, tracker, APP, "commitTransaction"))

    stored = list(db.orders.find({}))
    ids = {o["_id"] for o in stored}
    stock = [s["count"] for s in db.stock.find({}).sort("_id", 1)]
    rerun = counts["runs"] - WORKERS * TXNS_PER_WORKER
    return {
        "ok": len(stored) == WORKERS * TXNS_PER_WORKER
        and len(ids) == len(stored)
        and stock == [STOCK - TXNS_PER_WORKER] * WORKERS
        and before is not None
        and before != after
        and rerun >= 1
        and not tracker.same_lsid_overlaps,
        "orders": len(stored),
        "distinct": len(ids),
        "stock": stock,
        "primaryChanged": before != after,
        "callbacksRunAgain": rerun,
        "commits": len(tracker.commands("commitTransaction")),
        "failedAttempts": len(tracker.failures()),
    }


run_scenario("py-failover-with-transaction", body)
