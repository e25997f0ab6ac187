'use strict';
// GOOD, a reply lost after the write applied (issue 12): the emulator runs an
// insert, then an update ($inc), and closes the connection instead of
// replying (`closeConnectionAfterExecution`, what a network cut or a crash
// between the write and its reply does). The driver cannot know the write
// applied: it retries it once on a new connection with the same lsid,
// txnNumber and statement, and the server answers from its retry history
// instead of applying it again (retryable writes spec).
// "ok": both writes acknowledged without an error, each sent exactly twice
// with one lsid and txnNumber, the document stored once and incremented once,
// the two failed attempts network errors, no lsid in flight twice.
const { runScenario } = require('../lib/harness');
const { failPoint, retriedWrites } = require('../lib/faults');

const APP = 'interop-failover-reply-lost';

runScenario('failover-reply-lost', async (ctx) => {
  const { client, tracker } = ctx.client({ appName: APP });
  const { client: operator } = ctx.client({ appName: 'interop-failover-operator' });
  await Promise.all([client.connect(), operator.connect()]);
  const accounts = client.db().collection('accounts');
  await accounts.deleteMany({});

  await failPoint(operator, { times: 1 }, { failCommands: ['insert'], appName: APP, closeConnectionAfterExecution: true });
  const inserted = await accounts.insertOne({ _id: 'acct-1', balance: 0 });
  await failPoint(operator, { times: 1 }, { failCommands: ['update'], appName: APP, closeConnectionAfterExecution: true });
  const updated = await accounts.updateOne({ _id: 'acct-1' }, { $inc: { balance: 10 } });
  await failPoint(operator, 'off');

  const stored = await accounts.find({}).toArray();
  const retried = { insert: retriedWrites(tracker, 'insert'), update: retriedWrites(tracker, 'update') };
  const failures = tracker.observed().failures;
  return {
    ok:
      inserted.acknowledged &&
      updated.modifiedCount === 1 &&
      stored.length === 1 &&
      stored[0].balance === 10 &&
      retried.insert === 1 &&
      retried.update === 1 &&
      tracker.commands('insert').length === 2 &&
      tracker.commands('update').length === 2 &&
      failures.length === 2 &&
      failures.every((f) => f.name === 'MongoNetworkError') &&
      tracker.sameLsidOverlaps.length === 0,
    stored: stored.length,
    balance: stored[0] && stored[0].balance,
    modified: updated.modifiedCount,
    retried,
    failedAttempts: failures.map((f) => `${f.command}:${f.name}`),
  };
});
