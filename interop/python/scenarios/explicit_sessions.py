"""GOOD: explicit sessions used as PyMongo documents them: one session per
unit of work, every operation on it finished before the next, ended by the
`with` block. Causally consistent reads see the session's own writes.
"ok": the writes are read back, no command failed, no lsid in flight twice,
and each unit of work used its own lsid.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from harness import run_scenario  # noqa: E402


def body(ctx):
    client, tracker = ctx.client()
    coll = client.get_default_database("interop").get_collection("docs")
    coll.delete_many({})
    seen = []
    for unit in range(3):
        with client.start_session(causal_consistency=True) as session:
            coll.insert_many([{"unit": unit, "i": i} for i in range(5)], session=session)
            coll.update_many({"unit": unit, "i": {"$lt": 2}}, {"$set": {"low": True}}, session=session)
            seen.append(coll.count_documents({"unit": unit, "low": True}, session=session))
            ids = [d["i"] for d in coll.find({"unit": unit}, session=session).sort("i", 1).batch_size(2)]
            assert ids == list(range(5)), ids
    lsids = {c["lsid"] for c in tracker.commands("insert")}
    return {
        "ok": seen == [2, 2, 2]
        and not tracker.failures()
        and not tracker.same_lsid_overlaps,
        "lowPerUnit": seen,
        "distinctSessions": len(lsids),
        "getMores": len(tracker.commands("getMore")),
    }


run_scenario("py-explicit-sessions", body)
