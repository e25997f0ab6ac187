'use strict';
// GOOD, a connection cut under reads (issue 12): the emulator closes the
// connection without a reply (`closeConnection` fail point, the network or a
// restarting server), first under a `find`, then under a cursor's `getMore`.
// What the driver documents (retryable reads spec): a find is a retryable read
// and is sent again, once, on another connection, transparently; a getMore is
// never retried (the cursor lived on the cut connection's server state and
// the driver cannot know what was consumed), so the cursor's iteration fails
// with MongoNetworkError and the application re-runs its query from the last
// document it processed (`_id > last`, sorted by _id).
// "ok": the find returned every document after exactly one resent find; the
// iteration failed with a MongoNetworkError on a getMore; after resuming,
// every document was processed exactly once, in order; no other error, no lsid
// in flight twice.
const { runScenario, driver } = require('../lib/harness');
const { failPoint } = require('../lib/faults');

const APP = 'interop-failover-cursor';
const DOCS = 40;
const BATCH = 10;

runScenario('failover-cursor-cut', async (ctx) => {
  const { client, tracker } = ctx.client({ appName: APP });
  const { client: operator } = ctx.client({ appName: 'interop-failover-operator' });
  await Promise.all([client.connect(), operator.connect()]);
  const items = client.db().collection('items');
  await items.deleteMany({});
  await items.insertMany(Array.from({ length: DOCS }, (_, i) => ({ _id: i, v: i })));

  // 1. The find's connection is cut: the driver sends it again.
  const findsBefore = tracker.commands('find').length;
  await failPoint(operator, { times: 1 }, { failCommands: ['find'], appName: APP, closeConnection: true });
  const listed = await items.find({}).sort({ _id: 1 }).toArray();
  const findsSent = tracker.commands('find').length - findsBefore;

  // 2. A getMore's connection is cut: the iteration fails; the application
  // resumes after the last document it processed.
  const processed = [];
  let cutError = null;
  let cutAfter = null;
  await failPoint(operator, { times: 1 }, { failCommands: ['getMore'], appName: APP, closeConnection: true });
  try {
    for await (const item of items.find({}).sort({ _id: 1 }).batchSize(BATCH)) processed.push(item._id);
  } catch (err) {
    if (!(err instanceof driver.mongodb.MongoNetworkError)) throw err;
    cutError = err;
    cutAfter = processed.length;
    ctx.record(err);
    const last = processed[processed.length - 1];
    for await (const item of items.find({ _id: { $gt: last } }).sort({ _id: 1 }).batchSize(BATCH)) processed.push(item._id);
  }
  await failPoint(operator, 'off');

  const inOrder = processed.every((id, i) => id === i);
  const failures = tracker.observed().failures;
  return {
    ok:
      listed.length === DOCS &&
      findsSent === 2 &&
      cutError !== null &&
      processed.length === DOCS &&
      inOrder &&
      failures.length === 2 &&
      failures.every((f) => f.name === 'MongoNetworkError') &&
      failures.map((f) => f.command).join() === 'find,getMore' &&
      tracker.sameLsidOverlaps.length === 0,
    listed: listed.length,
    findsSent,
    cutAfter,
    processed: processed.length,
    inOrder,
    failedAttempts: failures.map((f) => `${f.command}:${f.name}`),
  };
});
