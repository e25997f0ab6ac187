'use strict';
// Probes what the Node.js driver needs from a server beyond the scenarios'
// patterns: the handshake over OP_MSG (serverApi) and legacy OP_QUERY,
// compression, the streaming (awaitable) hello of the monitor, the hello
// fields SDAM reads, and the commands behind common helpers. Each probe is
// checked against what a MongoDB 7.0 replica-set primary answers.
// "ok": every probe passed, except those marked with a known emulator gap
// (interop/README.md, "Emulator gaps"): those are listed in
// "observed.knownGaps" and do not fail the run; any other failure does.
const { runScenario, sleep, describeError } = require('../lib/harness');

runScenario('node-protocol-probe', async (ctx) => {
  const results = [];
  const probe = async (name, fn, knownGap) => {
    try {
      const verdict = await fn();
      results.push({ name, pass: verdict === true, knownGap, detail: verdict === true ? undefined : verdict });
    } catch (err) {
      results.push({ name, pass: false, knownGap, detail: describeError(err), message: String(err.message).slice(0, 160) });
    }
  };

  // Legacy OP_QUERY handshake (the default) + streaming hello in the monitor.
  const { client, tracker } = ctx.client({ heartbeatFrequencyMS: 500, compressors: ['zlib'] });
  const heartbeats = { succeeded: 0, awaited: 0, failed: 0 };
  client.on('serverHeartbeatSucceeded', (e) => {
    heartbeats.succeeded += 1;
    if (e.awaited) heartbeats.awaited += 1;
  });
  client.on('serverHeartbeatFailed', () => (heartbeats.failed += 1));
  await client.connect();
  const db = client.db();
  const admin = client.db('admin');

  await probe('hello fields a driver reads', async () => {
    const hello = await admin.command({ hello: 1 });
    const missing = ['isWritablePrimary', 'maxBsonObjectSize', 'maxMessageSizeBytes', 'maxWriteBatchSize', 'localTime',
      'logicalSessionTimeoutMinutes', 'connectionId', 'minWireVersion', 'maxWireVersion', 'setName', 'hosts', 'me',
      'primary', 'topologyVersion', 'electionId', 'setVersion', 'lastWrite'].filter((f) => !(f in hello));
    return missing.length === 0 && hello.maxWireVersion >= 17 ? true : { missing, maxWireVersion: hello.maxWireVersion };
  });
  await probe('replies carry $clusterTime and operationTime', async () => {
    const reply = await db.command({ ping: 1 });
    const insert = await db.command({ insert: 'probe', documents: [{ a: 1 }] });
    return reply.$clusterTime && insert.operationTime ? true : { pingKeys: Object.keys(reply), insertKeys: Object.keys(insert) };
  });
  await probe('zlib compression negotiated in the handshake', async () => {
    // The driver keeps what the handshake agreed on each pooled connection (internal API).
    const server = client.topology.s.servers.values().next().value;
    const compressors = [...server.pool.connections].map((c) => c.description.compressor);
    return compressors.length > 0 && compressors.every((c) => c === 'zlib') ? true : { compressors };
  });
  await probe('unacknowledged write (w:0, moreToCome) then a command on the same pool', async () => {
    await db.collection('probe').insertOne({ w0: true }, { writeConcern: { w: 0 } });
    const r = await db.command({ ping: 1 });
    return r.ok === 1;
  });
  await probe('maxTimeMS on a find', async () => (await db.collection('probe').find({}).maxTimeMS(10000).toArray()).length >= 1);
  await probe('estimatedDocumentCount (count)', async () => (await db.collection('probe').estimatedDocumentCount()) >= 1);
  await probe('countDocuments (aggregate $match/$group/$sum)', async () => (await db.collection('probe').countDocuments({ a: 1 })) >= 1);
  await probe('distinct', async () => Array.isArray(await db.collection('probe').distinct('a')));
  await probe('findOneAndUpdate upsert returns the new document', async () => {
    const r = await db.collection('probe').findOneAndUpdate({ _id: 'fau' }, { $set: { v: 1 } }, { upsert: true, returnDocument: 'after' });
    return r && r.v === 1 ? true : r;
  });
  await probe('bulkWrite ordered mix', async () => {
    const r = await db.collection('probe').bulkWrite([
      { insertOne: { document: { _id: 'b1' } } },
      { updateOne: { filter: { _id: 'b1' }, update: { $set: { x: 1 } } } },
      { replaceOne: { filter: { _id: 'b2' }, replacement: { y: 2 }, upsert: true } },
      { deleteOne: { filter: { _id: 'b1' } } },
    ]);
    return r.insertedCount === 1 && r.modifiedCount === 1 && r.upsertedCount === 1 && r.deletedCount === 1 ? true : r;
  });
  await probe('createIndex with expireAfterSeconds, listIndexes shows it', async () => {
    await db.collection('ttl').createIndex({ expires: 1 }, { expireAfterSeconds: 0 });
    const ix = await db.collection('ttl').listIndexes().toArray();
    return ix.some((i) => i.name === 'expires_1' && i.expireAfterSeconds === 0) ? true : ix;
  });
  await probe('listCollections (nameOnly) and listDatabases', async () => {
    const names = (await db.listCollections({}, { nameOnly: true }).toArray()).map((c) => c.name);
    const dbs = await admin.admin().listDatabases();
    return names.includes('probe') && dbs.databases.some((d) => d.name === db.databaseName) ? true : { names };
  });
  await probe('transaction with readConcern snapshot / writeConcern majority', async () => {
    const session = client.startSession();
    try {
      await session.withTransaction(async () => {
        await db.collection('probe').insertOne({ t: 1 }, { session });
        await db.collection('probe').findOne({ t: 1 }, { session });
      }, { readConcern: { level: 'snapshot' }, writeConcern: { w: 'majority' } });
      return true;
    } finally {
      await session.endSession();
    }
  });
  await probe('write conflict between two open transactions (WriteConflict 112, TransientTransactionError)', async () => {
    await db.collection('conflict').insertOne({ _id: 'row', v: 0 });
    const a = client.startSession();
    const b = client.startSession();
    try {
      a.startTransaction();
      b.startTransaction();
      await db.collection('conflict').updateOne({ _id: 'row' }, { $inc: { v: 1 } }, { session: a });
      let conflict = null;
      try {
        await db.collection('conflict').updateOne({ _id: 'row' }, { $inc: { v: 10 } }, { session: b });
      } catch (err) {
        conflict = err;
      }
      await a.commitTransaction();
      if (!conflict) await b.abortTransaction();
      const row = await db.collection('conflict').findOne({ _id: 'row' });
      const labelled = conflict && conflict.code === 112 && conflict.hasErrorLabel('TransientTransactionError');
      return labelled && row.v === 1 ? true : { secondWriter: conflict ? describeError(conflict) : 'no error', finalValue: row.v };
    } finally {
      await a.endSession();
      await b.endSession();
    }
  });
  await probe('cursor with session: getMore on the same lsid, killCursors on close', async () => {
    await db.collection('many').insertMany(Array.from({ length: 20 }, (_, i) => ({ i })));
    const session = client.startSession();
    try {
      const cursor = db.collection('many').find({}, { session, batchSize: 3 });
      await cursor.next();
      await cursor.next();
      await cursor.next();
      await cursor.next(); // getMore
      await cursor.close(); // killCursors
      const mine = tracker.started.filter((c) => ['getMore', 'killCursors'].includes(c.name));
      return mine.length >= 2 && mine.every((c) => !c.failure) ? true : mine;
    } finally {
      await session.endSession();
    }
  });
  await probe('streaming hello: awaited heartbeats, none failed', async () => {
    await sleep(1600);
    return heartbeats.awaited > 0 && heartbeats.failed === 0 ? true : heartbeats;
  });

  // OP_MSG handshake: serverApi makes the driver send `hello` over OP_MSG.
  await probe('serverApi v1 (OP_MSG hello handshake)', async () => {
    const { client: apiClient } = ctx.client({ serverApi: { version: '1' } });
    await apiClient.connect();
    const r = await apiClient.db().command({ ping: 1 });
    return r.ok === 1;
  });
  // Replica-set discovery without directConnection (only meaningful straight
  // to the emulator: through a proxy, `proxy` or `exec` mode, the driver
  // would discover the upstream's own address and bypass the proxy).
  if (!['proxy', 'exec'].includes(process.env.INTEROP_MODE)) {
    await probe('replicaSet=rs0 discovery', async () => {
      const { client: rsClient } = ctx.client({ directConnection: false, replicaSet: 'rs0' });
      await rsClient.connect();
      const r = await rsClient.db().command({ ping: 1 });
      return r.ok === 1 && rsClient.topology.description.type === 'ReplicaSetWithPrimary' ? true : rsClient.topology.description.type;
    });
  }

  const failed = results.filter((r) => !r.pass && !r.knownGap);
  const knownGaps = results
    .filter((r) => !r.pass && r.knownGap)
    .map((r) => ({ gap: r.knownGap, probe: r.name, detail: r.detail }));
  return { ok: failed.length === 0, passed: results.filter((r) => r.pass).length, knownGaps, failed };
});
