'use strict';
// BAD (reference article 000, "Session closed before operation completes"):
//   const session = client.startSession();
//   collection.insertMany(docs, { session });   // not awaited
//   session.endSession();                        // operation still running
// Two timings of the same bug, each as one "request":
// - immediate: endSession() right after the call, as in the article; the
//   driver usually notices and fails the insert with MongoExpiredSessionError.
// - in flight: endSession() once the insert is on the wire. The driver hands
//   the server session back to its pool at once, so a concurrent request's
//   operation picks up the same lsid while the insert is still running: on
//   the wire one lsid is in flight twice. "ok" means that overlap happened.
const { runScenario, sleep } = require('../lib/harness');

runScenario('bad-endsession-not-awaited', async (ctx) => {
  const { client, tracker } = ctx.client({ appName: 'interop-endsession-not-awaited' });
  await client.connect();
  const coll = client.db().collection('docs');
  // Warm the pool: one connection and one pooled server session exist, as in a running app.
  await coll.insertOne({ warmup: true });

  // Timing 1: the article's code, verbatim.
  const immediateSession = client.startSession();
  const immediate = coll.insertMany([{ timing: 'immediate', i: 0 }, { timing: 'immediate', i: 1 }], { session: immediateSession });
  immediateSession.endSession(); // not awaited, called immediately
  let immediateOutcome = 'succeeded';
  try {
    await immediate;
  } catch (err) {
    immediateOutcome = 'failed';
    ctx.record(err);
  }

  // Timing 2: the operation is on the wire when the session is ended.
  const session = client.startSession();
  const docs = Array.from({ length: 20 }, (_, i) => ({ timing: 'in-flight', i }));
  const before = tracker.started.length;
  const running = coll.insertMany(docs, { session });
  running.catch(() => {});
  const insert = await tracker.waitFor((c) => c.name === 'insert' && tracker.started.indexOf(c) >= before);
  await sleep(2);
  const insertStillRunning = insert.finishedAt === null;
  session.endSession(); // not awaited: the server session goes back to the pool now
  // Another request arrives meanwhile and uses an implicit session.
  const concurrent = coll.insertOne({ timing: 'concurrent-request' });
  const outcomes = await Promise.allSettled([running, concurrent]);
  for (const o of outcomes) if (o.status === 'rejected') ctx.record(o.reason);
  const concurrentInsert = tracker.started.filter((c) => c.name === 'insert').at(-1);

  return {
    ok: insertStillRunning && tracker.sameLsidOverlaps.length > 0,
    immediateOutcome,
    insertStillRunning,
    lsidReusedByConcurrentRequest: concurrentInsert.lsid === insert.lsid,
    sameLsidOverlaps: tracker.sameLsidOverlaps.length,
  };
});
