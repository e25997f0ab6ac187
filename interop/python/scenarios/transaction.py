"""GOOD: multi-document transactions with PyMongo: `with_transaction` (the
convenient API, which retries transient errors) and the core API
(`start_transaction` as a context manager, committed on exit). A callback
that raises aborts its transaction and nothing of it is stored.
"ok": both transactions committed, the refused one rolled back, no command
failed, no lsid in flight twice.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from harness import run_scenario  # noqa: E402


class Refused(Exception):
    pass


def body(ctx):
    client, tracker = ctx.client()
    db = client.get_default_database("interop")
    db.orders.delete_many({})
    db.stock.delete_many({})
    db.stock.insert_one({"_id": "widget", "count": 10})

    def place_order(session):
        db.orders.insert_one({"item": "widget"}, session=session)
        db.stock.update_one({"_id": "widget"}, {"$inc": {"count": -1}}, session=session)

    with client.start_session() as session:
        session.with_transaction(place_order)

    with client.start_session() as session:
        with session.start_transaction():
            place_order(session)

    refused = False
    with client.start_session() as session:
        try:
            def refuse(s):
                place_order(s)
                raise Refused("out of stock")

            session.with_transaction(refuse)
        except Refused:
            refused = True

    orders = db.orders.count_documents({})
    stock = db.stock.find_one({"_id": "widget"})["count"]
    return {
        "ok": refused
        and orders == 2
        and stock == 8
        and len(tracker.commands("commitTransaction")) == 2
        and len(tracker.commands("abortTransaction")) == 1
        and not tracker.failures()
        and not tracker.same_lsid_overlaps,
        "orders": orders,
        "stock": stock,
        "commits": len(tracker.commands("commitTransaction")),
        "aborts": len(tracker.commands("abortTransaction")),
    }


run_scenario("py-transaction", body)
