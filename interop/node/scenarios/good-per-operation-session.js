'use strict';
// GOOD (reference article 000, "Per-operation session"): every request
// starts its own session, awaits its work and ends the session in a finally
// block. Requests run concurrently; each lsid is used by one request at a time.
// "ok": every request's write stored, no driver error, no lsid in flight twice.
const { runScenario } = require('../lib/harness');

const REQUESTS = 6;

runScenario('good-per-operation-session', async (ctx) => {
  const { client, tracker } = ctx.client({ appName: 'interop-per-operation-session' });
  await client.connect();
  const coll = client.db().collection('data');
  await coll.deleteMany({});
  const postData = async (requestNo) => {
    const session = client.startSession();
    try {
      await coll.insertOne({ request: requestNo }, { session });
      await coll.updateOne({ request: requestNo }, { $set: { handled: true } }, { session });
    } finally {
      await session.endSession();
    }
  };
  await Promise.all(Array.from({ length: REQUESTS }, (_, i) => postData(i)));
  const handled = await coll.countDocuments({ handled: true });
  const lsids = new Set(tracker.commands('insert').map((c) => c.lsid));
  return {
    ok: handled === REQUESTS && tracker.sameLsidOverlaps.length === 0 && tracker.started.every((c) => !c.failure),
    handled,
    distinctSessions: lsids.size,
  };
});
