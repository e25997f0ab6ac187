'use strict';
// BAD (reference article 000, "Shared global session"): one session created
// at startup and passed to every request's operation. Concurrent requests
// (Promise.all) send the same lsid at the same time; retryable writes on one
// session may even share a txnNumber, and then the server takes the second
// write for a retry of the first and skips it (a lost write, no error).
// "ok" means the same lsid was in flight twice; lost writes are reported.
const { runScenario } = require('../lib/harness');

const REQUESTS = 5;

runScenario('bad-global-session', async (ctx) => {
  const { client, tracker } = ctx.client({ appName: 'interop-global-session' });
  await client.connect();
  const coll = client.db().collection('data');
  await coll.deleteMany({});
  const globalSession = client.startSession(); // the bug: shared by every request

  const handle = (i) => coll.insertOne({ request: i }, { session: globalSession }).catch((err) => ctx.record(err));
  await Promise.all(Array.from({ length: REQUESTS }, (_, i) => handle(i)));
  await globalSession.endSession();

  const stored = await coll.countDocuments({});
  const inserts = tracker.commands('insert');
  const txnNumbers = inserts.map((c) => c.txnNumber);
  return {
    ok: tracker.sameLsidOverlaps.length > 0,
    sameLsidOverlaps: tracker.sameLsidOverlaps.length,
    insertTxnNumbers: txnNumbers,
    distinctTxnNumbers: new Set(txnNumbers).size,
    written: stored,
    lostWrites: REQUESTS - stored,
  };
});
