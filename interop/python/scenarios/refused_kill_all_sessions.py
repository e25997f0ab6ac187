"""GOOD, a server that refuses session kills (issue 12): an application
that "cleans up" with `killAllSessions` against a server that does not allow
it — Microsoft DocumentDB (FerretDB 2, Azure Cosmos DB for MongoDB vCore)
answers CommandNotSupported (115), MongoDB Atlas's free and shared tiers
AtlasError (8000) — logs the refusal and carries on with its pooled implicit
sessions, untouched on the server: the refused command changed nothing.
Run as `refused_kill_all_sessions.py PROFILE` (documentdb, atlas-shared);
the name it prints is py-refused-kill-all-sessions-PROFILE.
"ok": killAllSessions refused with the profile's code; every operation
before and after succeeded; at least one pooled lsid used before the refusal
was used again after it; no lsid in flight twice.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from pymongo.errors import OperationFailure

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from harness import run_scenario  # noqa: E402

REFUSALS = {"documentdb": "CommandNotSupported", "atlas-shared": "AtlasError"}
PROFILE = sys.argv[1] if len(sys.argv) > 1 else ""
REQUESTS = 4


def body(ctx):
    if PROFILE not in REFUSALS:
        raise ValueError(f"unknown profile {PROFILE!r} (one of {', '.join(REFUSALS)})")
    client, tracker = ctx.client(appname="interop-py-refused-kill")
    notes = client.get_default_database("interop").notes
    notes.delete_many({})

    def round_(tag, pool):
        def request(i):
            notes.insert_one({"_id": f"{tag}-{i}", "tag": tag})
            return notes.count_documents({"tag": tag})

        return list(pool.map(request, range(REQUESTS)))

    with ThreadPoolExecutor(REQUESTS) as pool:
        round_("before", pool)
        lsids_before = {c["lsid"] for c in tracker.commands("insert") + tracker.commands("aggregate") if c["lsid"]}
        refusal = None
        try:
            client.admin.command({"killAllSessions": []})
        except OperationFailure as err:
            refusal = (err.details or {}).get("codeName")
            ctx.record(err)
        after_kill = tracker.started_count()
        counts = round_("after", pool)

    stored = notes.count_documents({})
    lsids_after = {c["lsid"] for c in tracker.seen[after_kill:] if c["lsid"]}
    reused = len(lsids_after & lsids_before)
    failures = [f for f in tracker.failures() if f["command"] != "killAllSessions"]
    return {
        "ok": refusal == REFUSALS[PROFILE]
        and all(n >= 1 for n in counts)
        and stored == 2 * REQUESTS
        and reused >= 1
        and not failures
        and not tracker.same_lsid_overlaps,
        "refusal": refusal,
        "stored": stored,
        "pooledSessionsReused": reused,
        "failedAttempts": failures,
    }


run_scenario(f"py-refused-kill-all-sessions-{PROFILE}", body)
