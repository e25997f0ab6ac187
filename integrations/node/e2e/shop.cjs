'use strict';
// What the end-to-end suites' tests do with MongoDB (integrations/test.sh,
// the `e2e-*` cases): real work with the real `mongodb` driver through
// `sessionguard exec`, correct in every test but one, which shares one
// session across concurrent operations (reference article 000, "Shared
// global session"). The emulator answers late (--latency), so those
// operations are surely in flight together.
const { MongoClient } = require('mongodb');

function connect(appName) {
  const uri = process.env.MONGODB_URI;
  if (!uri) throw new Error('MONGODB_URI is not set: run under sessionguard exec');
  return new MongoClient(uri, { appName, maxPoolSize: 8 });
}

// Correct: implicit sessions, one operation at a time.
async function insertAndRead(client, what) {
  const coll = client.db('shop').collection(what);
  await coll.insertOne({ what, at: Date.now() });
  return coll.findOne({ what });
}

// Correct: an explicit session, its operations awaited one by one, ended after.
async function inOneSession(client, what) {
  await client.withSession(async (session) => {
    const coll = client.db('shop').collection(what);
    await coll.insertOne({ what }, { session });
    await coll.countDocuments({ what }, { session });
  });
}

// THE BUG: one session handed to operations that run at the same time.
async function shareOneSession(client, what) {
  const coll = client.db('shop').collection(what);
  const shared = client.startSession();
  try {
    await Promise.all([1, 2, 3].map((i) => coll.insertOne({ what, i }, { session: shared })));
  } finally {
    await shared.endSession();
  }
}

module.exports = { connect, insertAndRead, inOneSession, shareOneSession };
