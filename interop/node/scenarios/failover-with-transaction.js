'use strict';
// GOOD, failover (issue 12): `withTransaction` in a loop, one session per
// transaction, four workers, while the primary steps down. Each transaction
// records an order (unique _id) and takes one item off its worker's stock.
// Mid-run, one commitTransaction is held by the emulator (`blockConnection`)
// and the operator steps the primary down: the member aborts its
// transactions in progress and closes every connection, cutting the held
// commit and the statements in flight; the next member becomes primary.
// withTransaction retries: a cut statement is a TransientTransactionError
// (the whole callback runs again with a new txnNumber), a cut commit is
// retried, and the server answers NoSuchTransaction (the step-down aborted
// it), so the callback runs again.
//
// As with retryable writes (failover-retryable-writes.js), mongodb 6.22 and
// 7.9 leave the labels off a network error on a connection whose pool was
// already cleared, so withTransaction may give up with MongoNetworkError; the
// application then runs the transaction once more. Its order _id makes that
// safe: if the first attempt had committed after all, the insert meets
// DuplicateKey and the transaction aborts, changing nothing.
// "ok": every order stored exactly once, each stock down by exactly its
// worker's orders, no error other than those, the primary changed, at least
// one transaction retried (its callback run again by withTransaction, or by the
// application),
// no lsid in flight twice.
const { runScenario, driver } = require('../lib/harness');
const { stepDownUnder, runWorkers } = require('../lib/faults');

const APP = 'interop-failover-txn';
const WORKERS = 4;
const TXNS_PER_WORKER = 6;
const STEP_DOWN_AFTER = 2; // transactions committed per worker before the step-down
const STOCK = 100;
const DUPLICATE_KEY = 11000;

function notRetriedByDriver(err) {
  return err instanceof driver.mongodb.MongoNetworkError;
}

runScenario('failover-with-transaction', async (ctx) => {
  const { client, tracker } = ctx.client({ appName: APP });
  const { client: operator } = ctx.client({ appName: 'interop-failover-operator' });
  await Promise.all([client.connect(), operator.connect()]);
  const db = client.db();
  const orders = db.collection('orders');
  const stock = db.collection('stock');
  await orders.deleteMany({});
  await stock.deleteMany({});
  await stock.insertMany(Array.from({ length: WORKERS }, (_, w) => ({ _id: `widget-${w}`, count: STOCK })));

  let retriedByApp = 0;
  let callbackRuns = 0;
  let committed = 0;
  let reachedStepDownPoint;
  const stepDownPoint = new Promise((resolve) => (reachedStepDownPoint = resolve));
  const placeOrder = async (w, i, isRetry = false) => {
    const session = client.startSession();
    try {
      await session.withTransaction(async () => {
        callbackRuns += 1;
        await orders.insertOne({ _id: `w${w}-${i}`, worker: w }, { session });
        await stock.updateOne({ _id: `widget-${w}` }, { $inc: { count: -1 } }, { session });
      });
    } catch (err) {
      if (isRetry && err.code === DUPLICATE_KEY) return; // the first attempt had committed
      if (isRetry || !notRetriedByDriver(err)) throw err;
      retriedByApp += 1;
      await placeOrder(w, i, true);
    } finally {
      await session.endSession();
    }
  };
  const unexpected = [];
  const worker = async (w) => {
    for (let i = 0; i < TXNS_PER_WORKER; i++) {
      await placeOrder(w, i);
      committed += 1;
      if (committed === WORKERS * STEP_DOWN_AFTER) reachedStepDownPoint();
    }
  };
  const work = runWorkers(WORKERS, worker, (err) => {
    unexpected.push(err);
    ctx.record(err);
  });

  await stepDownPoint;
  // A commit is held, so the step-down certainly cuts one.
  const primaries = await stepDownUnder(operator, tracker, APP, 'commitTransaction');
  await work;

  const stored = await orders.find({}).toArray();
  const ids = new Set(stored.map((o) => o._id));
  const counts = (await stock.find({}).sort({ _id: 1 }).toArray()).map((s) => s.count);
  // Each placeOrder call runs the callback once unless withTransaction retries it.
  const retriedByDriver = callbackRuns - (WORKERS * TXNS_PER_WORKER + retriedByApp);
  return {
    ok:
      unexpected.length === 0 &&
      stored.length === WORKERS * TXNS_PER_WORKER &&
      ids.size === stored.length &&
      counts.length === WORKERS &&
      counts.every((n) => n === STOCK - TXNS_PER_WORKER) &&
      primaries.before !== null &&
      primaries.before !== primaries.after &&
      retriedByDriver + retriedByApp >= 1 &&
      tracker.sameLsidOverlaps.length === 0,
    orders: stored.length,
    distinct: ids.size,
    stock: counts,
    primaryChanged: primaries.before !== primaries.after,
    transactionsRetriedByDriver: retriedByDriver,
    transactionsRetriedByApp: retriedByApp,
    commits: tracker.commands('commitTransaction').length,
    failedAttempts: tracker.observed().failures.length,
  };
});
