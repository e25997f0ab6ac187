'use strict';
// GOOD, failover (issue 12): an application writing in a loop with retryable
// writes (the driver's default) while the primary steps down. Four workers
// each insert uniquely keyed documents and increment their own counter.
// Mid-run, one insert is held by the emulator (`blockConnection`), the
// operator steps the primary down (the member closes every connection: the
// held insert and whatever else is in flight are cut), and the next member
// becomes primary.
//
// The driver retries a cut write once, on the new primary, with the same lsid
// and txnNumber; the server answers a write that had been applied from its
// retry history. But mongodb 6.22 and 7.9 leave the RetryableWriteError
// label off a network error on a connection whose pool was already cleared
// (by the first cut connection or the monitor noticing the same failover:
// `connectionIsStale` in sdam/server.js), and do not retry those writes: the
// application gets MongoNetworkError (interop/README.md, "Driver behaviour
// worth knowing"). So, as a correct application must, each write is
// idempotent and retried once by the application on a network error the
// driver did not retry: an insert whose retry meets DuplicateKey had been
// applied; the counter records each operation's id and increments only if
// that id is not there yet.
// "ok": every write acknowledged, every document present exactly once, every
// counter equal to its worker's operations (none lost, none applied twice), no
// error other than those network errors, the primary changed, at least one
// write retried (by the driver or the application), no lsid in flight twice.
const { runScenario, driver } = require('../lib/harness');
const { stepDownUnder, runWorkers, retriedWrites } = require('../lib/faults');

const APP = 'interop-failover-writes';
const WORKERS = 4;
const WRITES_PER_WORKER = 12; // each: one insert and one counter increment
const STEP_DOWN_AFTER = 4; // iterations done per worker before the step-down
const DUPLICATE_KEY = 11000;

/** A network error the driver gave up on without retrying. */
function notRetriedByDriver(err) {
  return err instanceof driver.mongodb.MongoNetworkError && !err.hasErrorLabel('RetryableWriteError');
}

runScenario('failover-retryable-writes', async (ctx) => {
  const { client, tracker } = ctx.client({ appName: APP });
  const { client: operator } = ctx.client({ appName: 'interop-failover-operator' });
  await Promise.all([client.connect(), operator.connect()]);
  const docs = client.db().collection('docs');
  const counters = client.db().collection('counters');
  await docs.deleteMany({});
  await counters.deleteMany({});
  await counters.insertMany(Array.from({ length: WORKERS }, (_, w) => ({ _id: `w${w}`, n: 0 })));

  const retriedByApp = [];
  const unexpected = [];
  // Runs one idempotent write; retries it once if the driver did not.
  const write = async (what, attempt) => {
    try {
      return await attempt();
    } catch (err) {
      if (!notRetriedByDriver(err)) throw err;
      retriedByApp.push(what);
      return attempt(true);
    }
  };

  let done = 0;
  let reachedStepDownPoint;
  const stepDownPoint = new Promise((resolve) => (reachedStepDownPoint = resolve));
  const worker = async (w) => {
    for (let i = 0; i < WRITES_PER_WORKER; i++) {
      const op = `w${w}-${i}`;
      await write('insert', async (isRetry) => {
        try {
          await docs.insertOne({ _id: op, worker: w, i });
        } catch (err) {
          if (!(isRetry && err.code === DUPLICATE_KEY)) throw err; // applied before the cut
        }
      });
      await write('update', () =>
        counters.updateOne({ _id: `w${w}`, [`ops.${op}`]: { $exists: false } }, { $inc: { n: 1 }, $set: { [`ops.${op}`]: true } })
      );
      done += 1;
      if (done === WORKERS * STEP_DOWN_AFTER) reachedStepDownPoint();
    }
  };
  const work = runWorkers(WORKERS, worker, (err) => {
    unexpected.push(err);
    ctx.record(err);
  });

  await stepDownPoint;
  // An insert is held, so the step-down certainly cuts a write in flight.
  const primaries = await stepDownUnder(operator, tracker, APP, 'insert');
  await work;

  const stored = await docs.find({}).toArray();
  const ids = new Set(stored.map((d) => d._id));
  const counts = (await counters.find({}).sort({ _id: 1 }).toArray()).map((c) => [c.n, Object.keys(c.ops || {}).length]);
  const retried = { insert: retriedWrites(tracker, 'insert'), update: retriedWrites(tracker, 'update') };
  return {
    ok:
      unexpected.length === 0 &&
      stored.length === WORKERS * WRITES_PER_WORKER &&
      ids.size === stored.length &&
      counts.length === WORKERS &&
      counts.every(([n, ops]) => n === WRITES_PER_WORKER && ops === WRITES_PER_WORKER) &&
      primaries.before !== null &&
      primaries.after !== null &&
      primaries.before !== primaries.after &&
      retried.insert + retried.update + retriedByApp.length >= 1 &&
      tracker.sameLsidOverlaps.length === 0,
    documents: stored.length,
    distinct: ids.size,
    counters: counts.map(([n]) => n),
    primaryChanged: primaries.before !== primaries.after,
    retriedByDriver: retried,
    retriedByApp: retriedByApp.length,
    failedAttempts: tracker.observed().failures.length,
  };
});
