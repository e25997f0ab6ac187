'use strict';
// Mongoose transactions (reference article 000, "For Mongoose users"):
// `connection.transaction(async (session) => ...)`, which wraps the driver's
// withTransaction. Mongoose 9 brings its own driver (mongodb 7), so these run
// as `@node7` only.
//
//   bad-promise-all   (BAD) the callback runs its model writes at once:
//                     `Promise.all([User.create(..., {session}), Order.create(...),
//                     ...])`. One session, several statements of one transaction
//                     in flight together. "ok": two statements of the
//                     transaction were on the wire at once under one lsid;
//                     whatever the driver and server made of it (errors, an
//                     aborted or committed transaction) is recorded.
//   good-sequential   (GOOD) the same writes awaited one after another, in
//                     several concurrent requests, each with its own
//                     `connection.transaction` (so its own session). "ok":
//                     every transaction committed, all writes stored, no
//                     command failed, no lsid in flight twice.
//
// The connection is Mongoose's own (`mongoose.createConnection`), as an app
// opens it; the harness only listens to its client's command monitoring.
const mongoose = require('mongoose');
const { runScenario } = require('../lib/harness');
const driver = require('../lib/driver');

// variant (argv[2]) -> scenario name
const NAMES = {
  'bad-promise-all': 'mongoose-bad-txn-promise-all',
  'good-sequential': 'mongoose-good-txn-sequential',
};
const variant = process.argv[2];
if (!NAMES[variant]) {
  process.stderr.write(`usage: mongoose-transaction.js ${Object.keys(NAMES).join('|')}\n`);
  process.exit(2);
}
if (mongoose.mongo !== driver.mongodb) {
  // INTEROP_NODE_DRIVER picked another major than the one Mongoose loads.
  process.stderr.write(`mongoose ${mongoose.version} uses its own mongodb driver, not mongodb@${driver.version}: run with INTEROP_NODE_DRIVER=7\n`);
  process.exit(2);
}

const REQUESTS = 3; // good-sequential: concurrent requests, one transaction each

/** One checkout: a user, two order lines, the stock decremented. */
function checkoutWrites({ User, Order, Stock }, requestNo, session) {
  const user = `user-${requestNo}`;
  return [
    () => User.create([{ name: user }], { session }),
    () => Order.create([{ user, item: `widget-${requestNo}`, line: 0 }], { session }),
    () => Order.create([{ user, item: `widget-${requestNo}`, line: 1 }], { session }),
    () => Stock.updateOne({ _id: `widget-${requestNo}` }, { $inc: { count: -2 } }, { session }),
  ];
}

runScenario(NAMES[variant], async (ctx) => {
  const conn = mongoose.createConnection(ctx.uri, {
    monitorCommands: true,
    serverSelectionTimeoutMS: 5000,
    connectTimeoutMS: 5000,
    appName: `interop-mongoose-${variant}`,
  });
  const tracker = ctx.adopt(conn.getClient(), conn);
  await conn.asPromise();
  const models = {
    User: conn.model('User', new mongoose.Schema({ name: String })),
    Order: conn.model('Order', new mongoose.Schema({ user: String, item: String, line: Number })),
    Stock: conn.model('Stock', new mongoose.Schema({ _id: String, count: Number })),
  };
  // The collections exist before any transaction, as a deployed app's do
  // (init() runs Mongoose's createCollection / createIndexes).
  for (const model of Object.values(models)) {
    await model.init();
    await model.deleteMany({});
  }
  await models.Stock.insertMany(Array.from({ length: REQUESTS }, (_, i) => ({ _id: `widget-${i}`, count: 10 })));
  const txnStatements = () =>
    tracker.started.filter((c) => c.inTransaction && c.name !== 'commitTransaction' && c.name !== 'abortTransaction');

  if (variant === 'bad-promise-all') {
    let outcome;
    try {
      // The bug: the statements of one transaction run concurrently.
      await conn.transaction(async (session) => {
        await Promise.all(checkoutWrites(models, 0, session).map((write) => write()));
      });
      outcome = 'committed';
    } catch (err) {
      outcome = 'failed';
      ctx.record(err);
    }
    const statements = txnStatements();
    return {
      ok: tracker.sameLsidOverlaps.length > 0,
      outcome,
      sameLsidOverlaps: tracker.sameLsidOverlaps.length,
      statementsSent: statements.length,
      startTransactionFlags: statements.filter((c) => c.startTransaction).length,
      commits: tracker.commands('commitTransaction').length,
      aborts: tracker.commands('abortTransaction').length,
      users: await models.User.countDocuments({}),
      orders: await models.Order.countDocuments({}),
      failures: tracker.observed().failures,
    };
  }

  // good-sequential: every statement awaited before the next.
  const checkout = (requestNo) =>
    conn.transaction(async (session) => {
      for (const write of checkoutWrites(models, requestNo, session)) await write();
    });
  await Promise.all(Array.from({ length: REQUESTS }, (_, i) => checkout(i)));
  const users = await models.User.countDocuments({});
  const orders = await models.Order.countDocuments({});
  const stock = (await models.Stock.find({}).sort({ _id: 1 }).lean()).map((s) => s.count);
  const commits = tracker.commands('commitTransaction').length;
  const lsids = new Set(txnStatements().map((c) => c.lsid));
  return {
    ok:
      users === REQUESTS &&
      orders === 2 * REQUESTS &&
      stock.every((count) => count === 8) &&
      commits === REQUESTS &&
      lsids.size === REQUESTS &&
      tracker.commands('abortTransaction').length === 0 &&
      tracker.sameLsidOverlaps.length === 0 &&
      tracker.started.every((c) => !c.failure),
    users,
    orders,
    stock,
    commits,
    distinctSessions: lsids.size,
    failures: tracker.observed().failures,
  };
});
