"""BAD: one AsyncClientSession shared by concurrent asyncio tasks (PyMongo's
asyncio API, AsyncMongoClient). An async web app (FastAPI, aiohttp, ...)
that opens one session at startup and hands it to every request handler:
the handlers run concurrently on one event loop, so the same lsid is in
flight on several connections at once. PyMongo documents sessions as
usable by one task at a time and does not stop it; neither does the server.
Each insert takes the next txnNumber when it is sent, but the inserts reach
the server in any order: an older txnNumber arriving after a newer one fails
with TransactionTooOld (225), and a write is lost.
"ok": the same lsid was in flight twice; driver errors and lost writes are
recorded.
"""
import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from harness import run_scenario  # noqa: E402

REQUESTS = 5
ROUNDS = 2


async def body(ctx):
    client, tracker = ctx.async_client(maxPoolSize=REQUESTS)
    coll = client.get_default_database("interop").get_collection("shared")
    await coll.delete_many({})
    app_session = client.start_session()  # the bug: shared by every request handler

    async def handle(round_no, request_no):
        try:
            await coll.insert_one({"round": round_no, "request": request_no}, session=app_session)
            await coll.find_one({"round": round_no, "request": request_no}, session=app_session)
        except Exception as err:  # recorded: this is what the bug produces
            ctx.record(err)

    for round_no in range(ROUNDS):
        await asyncio.gather(*(handle(round_no, i) for i in range(REQUESTS)))
    await app_session.end_session()

    stored = await coll.count_documents({})
    txn_numbers = [c["txnNumber"] for c in tracker.commands("insert") if c["txnNumber"] is not None]
    return {
        "ok": len(tracker.same_lsid_overlaps) > 0,
        "sameLsidOverlaps": len(tracker.same_lsid_overlaps),
        "inserts": len(tracker.commands("insert")),
        "insertTxnNumbers": txn_numbers,
        "distinctTxnNumbers": len(set(txn_numbers)),
        "stored": stored,
        "lostWrites": ROUNDS * REQUESTS - stored,
        "failures": tracker.failures(),
    }


run_scenario("py-async-shared-session", body)
