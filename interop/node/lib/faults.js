'use strict';
// Fault injection for the failover scenarios: the emulator's `failCommand`
// fail point and `replSetStepDown`, sent by a separate "operator" client as a
// test harness (or an operator) would, never by the application's own client.
// run.sh runs these scenarios against `sessionguard-dev emulator --members 3`,
// directly and through the proxy's per-member listeners
// (interop/README.md, "Failover scenarios").
//
// The fail point is one per emulated deployment (every member shares it):
// each scenario restricts it to its application's connections with `appName`
// and turns it off when done.

/** `configureFailPoint: "failCommand"` on admin; resolves with the reply. */
function failPoint(operator, mode, data = {}) {
  return operator.db('admin').command({ configureFailPoint: 'failCommand', mode, data });
}

/**
 * The replica set's primary as its hello names it (the proxy's address
 * through the proxy). The driver never retries a runCommand: right after a
 * step-down, the operator's pooled connection to the old primary was closed
 * by the server and the first command on it fails with a network error (the
 * driver then clears that pool), so it asks once more.
 */
async function primaryOf(operator) {
  let hello;
  try {
    hello = await operator.db('admin').command({ hello: 1 });
  } catch (err) {
    if (err.name !== 'MongoNetworkError') throw err;
    hello = await operator.db('admin').command({ hello: 1 });
  }
  return hello.primary || null;
}

/**
 * Steps the primary down, as an operator's failover drill does: the member
 * answers, becomes a secondary for `secs` seconds and closes every client
 * connection it has; the next member is elected at once. `force` so that it
 * never waits for a catch-up (every emulated member shares one data set).
 * Resolves with {before, after}: the primary before and after, from hello.
 */
async function stepDown(operator, secs = 1) {
  const before = await primaryOf(operator);
  await operator.db('admin').command({ replSetStepDown: secs, force: true });
  // The operator's own connection to the old primary was closed after the
  // reply; this hello selects the new primary like any other operation.
  const after = await primaryOf(operator);
  return { before, after };
}

/**
 * A failover under load: holds the application's next `commandName` on the
 * primary (`blockConnection`, restricted to `appName`), waits until the
 * driver has sent it, steps the primary down — which cuts the held command
 * and whatever else is in flight — and turns the fail point off. Resolves
 * with stepDown's {before, after}.
 */
async function stepDownUnder(operator, tracker, appName, commandName) {
  const since = tracker.started.length;
  await failPoint(operator, { times: 1 }, { failCommands: [commandName], appName, blockConnection: true, blockTimeMS: 5000 });
  await tracker.waitFor((c) => c.name === commandName && tracker.started.indexOf(c) >= since);
  const primaries = await stepDown(operator);
  await failPoint(operator, 'off');
  return primaries;
}

/**
 * Runs `worker(w)` for w in 0..count-1 at once; resolves when all are done.
 * A worker's error is handed to `onError` (recorded, not thrown), so that
 * the run goes on to check what was stored.
 */
function runWorkers(count, worker, onError) {
  return Promise.all(Array.from({ length: count }, (_, w) => worker(w).catch(onError)));
}

/**
 * Writes the driver sent more than once with the same lsid and txnNumber
 * (a retryable write's retry, from the driver's command monitoring): the
 * number of such (lsid, txnNumber) pairs for `commandName`.
 */
function retriedWrites(tracker, commandName) {
  const sent = new Map();
  for (const c of tracker.commands(commandName)) {
    if (c.lsid === null || c.txnNumber === null) continue;
    const key = `${c.lsid}/${c.txnNumber}`;
    sent.set(key, (sent.get(key) || 0) + 1);
  }
  return [...sent.values()].filter((n) => n > 1).length;
}

module.exports = { failPoint, primaryOf, stepDown, stepDownUnder, runWorkers, retriedWrites };
