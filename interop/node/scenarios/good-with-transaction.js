'use strict';
// GOOD (reference article 000, "withTransaction helper" and "Let errors
// propagate"): concurrent requests, each with its own session, write two
// collections in one transaction via withTransaction. One request's callback
// throws an application error, which propagates: withTransaction aborts and
// rethrows it, and none of that request's writes are stored.
// "ok": committed transactions stored, the failed one rolled back, no driver
// error other than the application's own, no lsid in flight twice.
//
// Each request decrements its own stock item: concurrent transactions on one
// document would need the server's write-conflict detection, which the
// emulator lacks (its abort restores a stale pre-image; see interop/README.md).
const { runScenario } = require('../lib/harness');

const REQUESTS = 4;

class OutOfStock extends Error {}

runScenario('good-with-transaction', async (ctx) => {
  const { client, tracker } = ctx.client({ appName: 'interop-with-transaction' });
  await client.connect();
  const db = client.db();
  // Collections exist before the transactions (as a deployed app's do).
  await db.collection('orders').deleteMany({});
  await db.collection('stock').deleteMany({});
  await db.collection('stock').insertMany(Array.from({ length: REQUESTS }, (_, i) => ({ _id: `widget-${i}`, count: 100 })));

  const placeOrder = async (requestNo) => {
    const session = client.startSession();
    try {
      await session.withTransaction(async () => {
        await db.collection('orders').insertOne({ request: requestNo }, { session });
        await db.collection('stock').updateOne({ _id: `widget-${requestNo}` }, { $inc: { count: -1 } }, { session });
        if (requestNo === 0) throw new OutOfStock('request 0 is refused');
      });
      return 'committed';
    } catch (err) {
      if (err instanceof OutOfStock) return 'refused';
      throw err; // a driver error: unexpected in the good pattern
    } finally {
      await session.endSession();
    }
  };
  // Sequential within a session, concurrent across requests.
  const outcomes = await Promise.all(Array.from({ length: REQUESTS }, (_, i) => placeOrder(i)));
  const orders = await db.collection('orders').countDocuments({});
  const stock = await db.collection('stock').find({}).sort({ _id: 1 }).toArray();
  const stockCounts = stock.map((s) => s.count);
  const commits = tracker.commands('commitTransaction');
  const aborts = tracker.commands('abortTransaction');
  return {
    ok:
      outcomes.filter((o) => o === 'committed').length === REQUESTS - 1 &&
      orders === REQUESTS - 1 &&
      stockCounts.join() === [100, ...Array(REQUESTS - 1).fill(99)].join() &&
      commits.length === REQUESTS - 1 &&
      aborts.length === 1 &&
      tracker.sameLsidOverlaps.length === 0 &&
      tracker.started.every((c) => !c.failure),
    outcomes,
    orders,
    stock: stockCounts,
    commits: commits.length,
    aborts: aborts.length,
  };
});
