"""GOOD, a reply lost after the write applied (issue 12): the emulator runs
an insert, then an update ($inc), and closes the connection instead of
replying (`closeConnectionAfterExecution`, what a network cut or a crash
between the write and its reply does). PyMongo cannot know the write
applied: it retries it once on a new connection with the same lsid,
txnNumber and statement, and the server answers from its retry history
instead of applying it again (retryable writes spec). Then the same with
the asyncio API (AsyncMongoClient), which shares that retry logic.
"ok": every write acknowledged without an error, each sent exactly twice
with one lsid and txnNumber, each document stored once and incremented once,
no lsid in flight twice.
"""
import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from harness import fail_point, retried_writes, run_scenario  # noqa: E402

APP = "interop-py-failover-reply-lost"
ASYNC_APP = "interop-py-async-failover-reply-lost"


def cut_after_execution(operator, command, app):
    fail_point(operator, {"times": 1}, {"failCommands": [command], "appName": app, "closeConnectionAfterExecution": True})


def check(tracker, coll_docs, result_modified):
    retried = {"insert": retried_writes(tracker, "insert"), "update": retried_writes(tracker, "update")}
    ok = (
        result_modified == 1
        and len(coll_docs) == 1
        and coll_docs[0]["balance"] == 10
        and retried == {"insert": 1, "update": 1}
        and len(tracker.commands("insert")) == 2
        and len(tracker.commands("update")) == 2
        and len(tracker.failures()) == 2
        and not tracker.same_lsid_overlaps
    )
    return ok, {"stored": len(coll_docs), "retried": retried, "failedAttempts": [f"{f['command']}:{f.get('name')}" for f in tracker.failures()]}


def body(ctx):
    operator, _ = ctx.client(appname="interop-py-failover-operator")

    client, tracker = ctx.client(appname=APP)
    accounts = client.get_default_database("interop").accounts
    accounts.delete_many({})
    cut_after_execution(operator, "insert", APP)
    accounts.insert_one({"_id": "acct-1", "balance": 0})
    cut_after_execution(operator, "update", APP)
    updated = accounts.update_one({"_id": "acct-1"}, {"$inc": {"balance": 10}})
    sync_ok, sync_seen = check(tracker, list(accounts.find({})), updated.modified_count)

    async def run_async():
        aclient, atracker = ctx.async_client(appname=ASYNC_APP)
        aaccounts = aclient.get_default_database("interop").async_accounts
        await aaccounts.delete_many({})
        cut_after_execution(operator, "insert", ASYNC_APP)
        await aaccounts.insert_one({"_id": "acct-1", "balance": 0})
        cut_after_execution(operator, "update", ASYNC_APP)
        aupdated = await aaccounts.update_one({"_id": "acct-1"}, {"$inc": {"balance": 10}})
        docs = await aaccounts.find({}).to_list()
        await aclient.close()
        return check(atracker, docs, aupdated.modified_count)

    async_ok, async_seen = asyncio.run(run_async())
    fail_point(operator, "off")
    return {"ok": sync_ok and async_ok, "sync": sync_seen, "asyncio": async_seen}


run_scenario("py-failover-reply-lost", body)
