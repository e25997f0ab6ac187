"""GOOD: multi-document transactions with PyMongo's asyncio API: concurrent
tasks, each with its own session, run `await session.with_transaction(cb)`
(the convenient API, which retries transient errors) where the callback
awaits its statements one after another; one task's callback raises an
application error, which propagates: with_transaction aborts and re-raises
it, and nothing of that task is stored. Then the core API:
`async with await session.start_transaction():`, committed on exit.
"ok": every other transaction committed, the refused one rolled back, no
command failed, no lsid in flight twice.
"""
import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from harness import run_scenario  # noqa: E402

TASKS = 4


class Refused(Exception):
    pass


async def body(ctx):
    client, tracker = ctx.async_client(maxPoolSize=TASKS)
    db = client.get_default_database("interop")
    # The collections exist before the transactions (as a deployed app's do);
    # each task decrements its own stock item.
    await db.orders.delete_many({})
    await db.stock.delete_many({})
    await db.stock.insert_many([{"_id": f"widget-{t}", "count": 10} for t in range(TASKS + 1)])

    async def place_order(session, item):
        await db.orders.insert_one({"item": item}, session=session)
        await db.stock.update_one({"_id": item}, {"$inc": {"count": -1}}, session=session)

    async def handle(task):
        item = f"widget-{task}"

        async def callback(session):
            await place_order(session, item)
            if task == 0:
                raise Refused("out of stock")

        async with client.start_session() as session:
            try:
                await session.with_transaction(callback)
                return "committed"
            except Refused:
                return "refused"

    outcomes = await asyncio.gather(*(handle(task) for task in range(TASKS)))

    async with client.start_session() as session:
        async with await session.start_transaction():
            await place_order(session, f"widget-{TASKS}")

    orders = await db.orders.count_documents({})
    stock = [d["count"] async for d in db.stock.find({}).sort("_id", 1)]
    commits = len(tracker.commands("commitTransaction"))
    aborts = len(tracker.commands("abortTransaction"))
    return {
        "ok": outcomes == ["refused"] + ["committed"] * (TASKS - 1)
        and orders == TASKS
        and stock == [10] + [9] * TASKS
        and commits == TASKS
        and aborts == 1
        and not tracker.failures()
        and not tracker.same_lsid_overlaps,
        "outcomes": outcomes,
        "orders": orders,
        "stock": stock,
        "commits": commits,
        "aborts": aborts,
    }


run_scenario("py-async-transaction", body)
