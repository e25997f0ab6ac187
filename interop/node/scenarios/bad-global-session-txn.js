'use strict';
// BAD: Promise.all inside a transaction on one session. The statements of
// one transaction race each other on separate connections. mongodb 6: the
// first carries startTransaction, the others may reach the server before it
// (NoSuchTransaction) or run concurrently with it. mongodb 7: every statement
// sent before the first reply carries startTransaction; the server refuses
// all but the first (ConflictingOperationInProgress, 117) and the commit then
// commits what is left. "ok" means two statements of the transaction were in
// flight together under one lsid; driver errors are recorded.
const { runScenario } = require('../lib/harness');

const STATEMENTS = 4;

runScenario('bad-global-session-txn', async (ctx) => {
  const { client, tracker } = ctx.client({ appName: 'interop-global-session-txn' });
  await client.connect();
  const db = client.db();
  await db.collection('orders').insertOne({ setup: true }); // the collection exists before the transaction
  const session = client.startSession();
  session.startTransaction();
  await Promise.all(
    Array.from({ length: STATEMENTS }, (_, i) =>
      db.collection('orders').insertOne({ statement: i }, { session }).catch((err) => ctx.record(err)),
    ),
  );
  let committed = false;
  try {
    await session.commitTransaction();
    committed = true;
  } catch (err) {
    ctx.record(err);
  }
  await session.endSession();
  const inTxn = tracker.commands('insert').filter((c) => c.txnNumber !== null);
  return {
    ok: tracker.sameLsidOverlaps.length > 0,
    sameLsidOverlaps: tracker.sameLsidOverlaps.length,
    statementsSent: inTxn.length,
    startTransactionFlags: inTxn.filter((c) => c.startTransaction).length,
    committed,
  };
});
