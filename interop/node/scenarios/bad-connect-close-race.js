'use strict';
// BAD (reference article 000, "Per-request connection"): every request
// connects its own client and closes it while its insertMany is still
// running. Several requests run at once, as they would in a web server.
// On the wire: the client tears down its connections (and may send
// endSessions) while the insert is in flight. The insert may fail, succeed or
// never settle (see below): each outcome is recorded; "ok" means the close
// really began while the insert was still on the wire, in every request.
const { runScenario, sleep } = require('../lib/harness');

const REQUESTS = 3;
// How long to wait for the insert to settle after close() before calling it
// hung. mongodb 6.x (and 7.x, which has the same close path) can leave an
// operation unsettled forever when close() lands between the command being
// sent and the reply being awaited.
const SETTLE_MS = 3000;

async function handleRequest(ctx, requestNo) {
  const { client, tracker } = ctx.client({ appName: `interop-connect-close-${requestNo}` });
  await client.connect();
  const users = Array.from({ length: 50 }, (_, i) => ({ request: requestNo, i }));
  const insert = client.db().collection('users').insertMany(users);
  insert.catch(() => {}); // awaited below; keeps Node from reporting it unhandled meanwhile
  const started = await tracker.waitFor((c) => c.name === 'insert');
  // Let the request reach the server (the emulator runs with reply latency
  // in the suite, as a real network would add).
  await sleep(2);
  const closeRaced = started.finishedAt === null;
  await client.close(); // the bug: the insert has not completed yet
  let insertOutcome;
  try {
    insertOutcome = await Promise.race([insert.then(() => 'succeeded'), sleep(SETTLE_MS).then(() => 'never settled')]);
  } catch (err) {
    insertOutcome = 'failed';
    ctx.record(err);
  }
  return {
    closeRaced,
    insertOutcome,
    endSessionsSent: tracker.commands('endSessions').length,
    endSessionsNamedInsertLsid: tracker.endedByEndSessions(started.lsid),
    endedWhileInFlight: tracker.endedWhileInFlight.length,
  };
}

runScenario('bad-connect-close-race', async (ctx) => {
  const results = await Promise.all(Array.from({ length: REQUESTS }, (_, i) => handleRequest(ctx, i)));
  return {
    ok: results.every((r) => r.closeRaced),
    requests: results,
  };
});
