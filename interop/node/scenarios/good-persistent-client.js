'use strict';
// GOOD (reference article 000, "Persistent connection"): one client for the
// whole app, connected at start and closed once at shutdown, after all work
// completed. Concurrent requests use implicit sessions; one reads a cursor to
// the end (getMore), one stops early and closes its cursor (killCursors).
// "ok": every write stored, no driver error, no lsid in flight twice.
const { runScenario } = require('../lib/harness');

const REQUESTS = 8;
const USERS_PER_REQUEST = 5;

runScenario('good-persistent-client', async (ctx) => {
  const { client, tracker } = ctx.client({ appName: 'interop-persistent-client' });
  await client.connect(); // startApp()
  const users = client.db().collection('users');
  await users.deleteMany({});

  const postUsers = async (requestNo) => {
    const batch = Array.from({ length: USERS_PER_REQUEST }, (_, i) => ({ request: requestNo, i }));
    await users.insertMany(batch);
  };
  await Promise.all(Array.from({ length: REQUESTS }, (_, i) => postUsers(i)));

  // A listing that pages through every user (find + getMore).
  const all = await users.find({}, { batchSize: 7 }).sort({ request: 1, i: 1 }).toArray();
  // A listing that stops after the first page and closes its cursor (killCursors).
  const cursor = users.find({}, { batchSize: 3 });
  const firstPage = [];
  for await (const user of cursor) {
    firstPage.push(user);
    if (firstPage.length === 3) break; // for-await's break closes the cursor
  }
  const errored = tracker.started.filter((c) => c.failure);
  const getMores = tracker.commands('getMore').length;
  const killCursors = tracker.commands('killCursors').length;
  return {
    ok:
      all.length === REQUESTS * USERS_PER_REQUEST &&
      firstPage.length === 3 &&
      getMores > 0 &&
      killCursors === 1 &&
      errored.length === 0 &&
      tracker.sameLsidOverlaps.length === 0,
    stored: all.length,
    getMores,
    killCursors,
    failedCommands: errored.map((c) => c.name),
    sameLsidOverlaps: tracker.sameLsidOverlaps.length,
  };
});
