'use strict';
// GOOD, a server that refuses session kills (issue 12): an application that
// "cleans up" with `killAllSessions` (at startup, after a deploy) against a
// server that does not allow it — Microsoft DocumentDB (FerretDB 2, Azure
// Cosmos DB for MongoDB vCore) answers CommandNotSupported (115); MongoDB
// Atlas's free and shared tiers answer AtlasError (8000); a user without the
// killAnySession privilege gets Unauthorized (13). The application logs the
// refusal and carries on, its pooled implicit sessions untouched, as they
// are on the server: the refused command changed nothing.
// Run as `node refused-kill-all-sessions.js PROFILE` (documentdb,
// atlas-shared); the name it prints is refused-kill-all-sessions-PROFILE.
// "ok": killAllSessions refused with the profile's code; every operation
// before and after succeeded and read back what was written; at least one
// pooled lsid used before the refusal was used again after it; no lsid in
// flight twice.
const { runScenario } = require('../lib/harness');

const REFUSALS = { documentdb: 'CommandNotSupported', 'atlas-shared': 'AtlasError' };
const profile = process.argv[2];
const REQUESTS = 4;

runScenario(`refused-kill-all-sessions-${profile}`, async (ctx) => {
  if (!REFUSALS[profile]) throw new Error(`unknown profile ${profile} (one of ${Object.keys(REFUSALS).join(', ')})`);
  const { client, tracker } = ctx.client({ appName: 'interop-refused-kill' });
  await client.connect();
  const notes = client.db().collection('notes');
  await notes.deleteMany({});

  // Requests at once: the pool then holds several implicit sessions.
  const round = (tag) =>
    Promise.all(
      Array.from({ length: REQUESTS }, async (_, i) => {
        await notes.insertOne({ _id: `${tag}-${i}`, tag });
        return notes.countDocuments({ tag });
      })
    );
  await round('before');
  const lsidsBefore = new Set(tracker.started.filter((c) => c.lsid).map((c) => c.lsid));

  // The "cleanup": refused by this server, so the application logs and goes on.
  let refusal = null;
  try {
    await client.db('admin').command({ killAllSessions: [] });
  } catch (err) {
    refusal = err.codeName || err.name;
    ctx.record(err);
  }
  const afterKill = tracker.started.length;

  const counts = await round('after');
  const stored = await notes.countDocuments({});
  const lsidsAfter = new Set(tracker.started.slice(afterKill).filter((c) => c.lsid).map((c) => c.lsid));
  const reused = [...lsidsAfter].filter((l) => lsidsBefore.has(l)).length;
  const failures = tracker.observed().failures.filter((f) => f.command !== 'killAllSessions');
  return {
    ok:
      refusal === REFUSALS[profile] &&
      counts.every((n) => n >= 1) &&
      stored === 2 * REQUESTS &&
      reused >= 1 &&
      failures.length === 0 &&
      tracker.sameLsidOverlaps.length === 0,
    refusal,
    stored,
    pooledSessionsReused: reused,
    failedAttempts: failures.map((f) => `${f.command}:${f.codeName || f.name}`),
  };
});
