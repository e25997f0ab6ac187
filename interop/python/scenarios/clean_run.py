"""GOOD: a clean PyMongo workload with implicit sessions only: one client
for the whole program, CRUD, an aggregation, a cursor read to the end
(getMore) and one closed early (killCursors), indexes, then close().
"ok": every result is right, no command failed, no lsid in flight twice.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from harness import run_scenario  # noqa: E402


def body(ctx):
    client, tracker = ctx.client()
    db = client.get_default_database("interop")
    db.items.drop()
    db.items.create_index("sku", unique=False)
    db.items.insert_many([{"sku": f"s{i:03}", "qty": i % 7} for i in range(60)])
    db.items.update_many({"qty": 0}, {"$set": {"empty": True}})
    db.items.delete_one({"sku": "s001"})
    total = db.items.count_documents({})
    empties = db.items.count_documents({"empty": True})
    grouped = list(db.items.aggregate([{"$match": {"qty": {"$gte": 5}}}, {"$group": {"_id": "$qty", "n": {"$sum": 1}}}, {"$sort": {"_id": 1}}]))
    everything = list(db.items.find({}).sort("sku", 1).batch_size(10))
    cursor = db.items.find({}).batch_size(5)
    first = [next(cursor) for _ in range(3)]
    cursor.close()
    replaced = db.items.find_one_and_update({"sku": "s002"}, {"$inc": {"qty": 100}}, return_document=True)
    names = sorted(ix["name"] for ix in db.items.list_indexes())
    return {
        "ok": total == 59
        and empties == 9
        and [g["_id"] for g in grouped] == [5, 6]
        and len(everything) == 59
        and len(first) == 3
        and replaced["qty"] == 102
        and names == ["_id_", "sku_1"]
        and len(tracker.commands("getMore")) > 0
        and len(tracker.commands("killCursors")) == 1
        and not tracker.failures()
        and not tracker.same_lsid_overlaps,
        "total": total,
        "empties": empties,
        "groups": [g["_id"] for g in grouped],
        "indexes": names,
        "getMores": len(tracker.commands("getMore")),
        "killCursors": len(tracker.commands("killCursors")),
        "failures": tracker.failures(),
    }


run_scenario("py-clean-run", body)
