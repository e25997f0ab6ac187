"""GOOD: explicit sessions with PyMongo's asyncio API (AsyncMongoClient), as
its documentation has them: concurrent tasks (asyncio.gather, an async web
app's request handlers), each with a session of its own opened by
`async with client.start_session()`, every operation on it awaited before
the next; then one long-lived session whose operations are awaited one after
another (sequential use is fine, concurrent use is not). Causally consistent
reads see the session's own writes; an `async for` over a cursor with a
small batch size drives getMore on the session that opened it.
"ok": every task read back its own writes, no command failed, no lsid was in
flight twice, and each task used its own lsid.
"""
import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from harness import run_scenario  # noqa: E402

TASKS = 4


async def body(ctx):
    client, tracker = ctx.async_client(maxPoolSize=TASKS)
    coll = client.get_default_database("interop").get_collection("docs")
    await coll.delete_many({})

    async def handle(task):
        async with client.start_session(causal_consistency=True) as session:
            await coll.insert_many([{"task": task, "i": i} for i in range(5)], session=session)
            await coll.update_many({"task": task, "i": {"$lt": 2}}, {"$set": {"low": True}}, session=session)
            low = await coll.count_documents({"task": task, "low": True}, session=session)
            ids = [d["i"] async for d in coll.find({"task": task}, session=session).sort("i", 1).batch_size(2)]
            return low, ids

    results = await asyncio.gather(*(handle(task) for task in range(TASKS)))
    task_lsids = {c["lsid"] for c in tracker.commands("insert")}

    # One session for a sequence of operations, each awaited before the next.
    async with client.start_session() as session:
        for i in range(3):
            await coll.insert_one({"sequential": i}, session=session)
        sequential = await coll.count_documents({"sequential": {"$exists": True}}, session=session)

    return {
        "ok": all(low == 2 and ids == list(range(5)) for low, ids in results)
        and sequential == 3
        and len(task_lsids) == TASKS
        and not tracker.failures()
        and not tracker.same_lsid_overlaps,
        "lowPerTask": [low for low, _ in results],
        "distinctTaskSessions": len(task_lsids),
        "sequential": sequential,
        "getMores": len(tracker.commands("getMore")),
    }


run_scenario("py-async-sessions", body)
