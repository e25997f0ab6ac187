'use strict';
// BAD (reference article 000, "Silent error handling breaks retry logic"):
// the withTransaction callback catches and swallows a failed statement. The
// server aborted the transaction when the statement failed; the callback goes
// on as if nothing happened, so its next statement and the commit continue a
// transaction that no longer exists (NoSuchTransaction, 251). withTransaction
// then retries the whole callback. The first attempt hits a duplicate key (a
// row another request inserted); the retry does not, so the run is bounded.
// "ok" means a statement of the aborted transaction was sent after the abort.
const { runScenario } = require('../lib/harness');

runScenario('bad-swallowed-txn-error', async (ctx) => {
  const { client, tracker } = ctx.client({ appName: 'interop-swallowed-txn-error' });
  await client.connect();
  const coll = client.db().collection('accounts');
  await coll.deleteMany({});
  await coll.insertOne({ _id: 'taken' });
  const session = client.startSession();
  let attempts = 0;
  try {
    await session.withTransaction(async () => {
      attempts += 1;
      try {
        if (attempts === 1) await coll.insertOne({ _id: 'taken' }, { session });
      } catch (err) {
        ctx.record(err); // the bug: swallowed
      }
      try {
        await coll.insertOne({ _id: `after-${attempts}` }, { session });
      } catch (err) {
        ctx.record(err); // swallowed too
      }
    });
  } catch (err) {
    ctx.record(err);
  } finally {
    await session.endSession();
  }
  // Find a statement sent on the same lsid and txnNumber after the failed one.
  const failed = tracker.started.find((c) => c.name === 'insert' && c.txnNumber !== null && c.failure);
  const after = failed
    ? tracker.started.filter((c) => c.lsid === failed.lsid && c.txnNumber === failed.txnNumber && c.startedAt > failed.startedAt)
    : [];
  const stored = await coll.find({}).sort({ _id: 1 }).toArray();
  return {
    ok: after.length > 0,
    attempts,
    firstFailure: failed ? failed.failure : null,
    continuedAfterAbort: after.map((c) => ({ command: c.name, failure: c.failure })),
    storedIds: stored.map((d) => d._id),
  };
});
