"""GOOD, a connection cut under reads (issue 12): the emulator closes the
connection without a reply (`closeConnection` fail point, the network or a
restarting server), first under a `find`, then under a cursor's `getMore`.
What PyMongo documents (retryable reads): a find is retried once on another
connection, transparently; a getMore is never retried, so iterating the
cursor raises AutoReconnect (a ConnectionFailure) and the application
re-runs its query from the last document it processed (`_id > last`, sorted
by _id).
"ok": the find returned every document after exactly one resent find; the
iteration raised AutoReconnect on a getMore; after resuming, every document
was processed exactly once, in order; no other command failed, no lsid in
flight twice.
"""
import os
import sys

from pymongo.errors import AutoReconnect

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from harness import fail_point, run_scenario  # noqa: E402

APP = "interop-py-failover-cursor"
DOCS = 40
BATCH = 10


def body(ctx):
    client, tracker = ctx.client(appname=APP)
    operator, _ = ctx.client(appname="interop-py-failover-operator")
    items = client.get_default_database("interop").items
    items.delete_many({})
    items.insert_many([{"_id": i, "v": i} for i in range(DOCS)])

    # 1. The find's connection is cut: the driver sends it again.
    finds_before = len(tracker.commands("find"))
    fail_point(operator, {"times": 1}, {"failCommands": ["find"], "appName": APP, "closeConnection": True})
    listed = list(items.find({}).sort("_id", 1))
    finds_sent = len(tracker.commands("find")) - finds_before

    # 2. A getMore's connection is cut: the iteration raises; the
    # application resumes after the last document it processed.
    processed = []
    cut_after = None
    fail_point(operator, {"times": 1}, {"failCommands": ["getMore"], "appName": APP, "closeConnection": True})
    try:
        for item in items.find({}).sort("_id", 1).batch_size(BATCH):
            processed.append(item["_id"])
    except AutoReconnect as err:
        ctx.record(err)
        cut_after = len(processed)
        for item in items.find({"_id": {"$gt": processed[-1]}}).sort("_id", 1).batch_size(BATCH):
            processed.append(item["_id"])
    fail_point(operator, "off")

    in_order = processed == list(range(DOCS))
    failures = tracker.failures()
    return {
        "ok": len(listed) == DOCS
        and finds_sent == 2
        and cut_after is not None
        and in_order
        and [f["command"] for f in failures] == ["find", "getMore"]
        and not tracker.same_lsid_overlaps,
        "listed": len(listed),
        "findsSent": finds_sent,
        "cutAfter": cut_after,
        "processed": len(processed),
        "inOrder": in_order,
        "failedAttempts": [f"{f['command']}:{f.get('name') or f.get('codeName')}" for f in failures],
    }


run_scenario("py-failover-cursor-cut", body)
