'use strict';
// GOOD (reference article 000, "Await operation completion"): an explicit
// session whose every operation is awaited, ended in a finally block only
// after they completed. Causally consistent reads on it see its own writes.
// "ok": the writes are stored and read back, no driver error, the session
// was never in flight twice and was never used after it ended.
const { runScenario } = require('../lib/harness');

runScenario('good-awaited-session', async (ctx) => {
  const { client, tracker } = ctx.client({ appName: 'interop-awaited-session' });
  await client.connect();
  const coll = client.db().collection('docs');
  await coll.deleteMany({});
  const docs = Array.from({ length: 10 }, (_, i) => ({ i }));
  const session = client.startSession({ causalConsistency: true });
  let readBack;
  let updated;
  try {
    await coll.insertMany(docs, { session });
    updated = await coll.updateMany({ i: { $lt: 5 } }, { $set: { low: true } }, { session });
    readBack = await coll.countDocuments({ low: true }, { session });
  } finally {
    await session.endSession();
  }
  const lsid = tracker.commands('insert')[0].lsid;
  const usedAfterEnd = tracker.started.filter((c) => c.lsid === lsid && c.name !== 'endSessions' && tracker.endedByEndSessions(lsid) && c.startedAt > tracker.commands('endSessions')[0]?.startedAt);
  return {
    ok:
      updated.modifiedCount === 5 &&
      readBack === 5 &&
      tracker.sameLsidOverlaps.length === 0 &&
      usedAfterEnd.length === 0 &&
      tracker.started.every((c) => !c.failure),
    modified: updated.modifiedCount,
    readBack,
  };
});
