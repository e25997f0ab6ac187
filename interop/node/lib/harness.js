'use strict';
// Shared plumbing for the Node.js interop scenarios.
//
// Each scenario is a small program that runs exactly one session pattern
// against MONGODB_URI and prints one JSON line:
//   {"scenario": NAME, "ok": BOOL, "errors": [{name, code, codeName, labels}], "observed": {...}}
// "ok" means the pattern ran as intended (for a bad pattern: the misuse really
// reached the wire), not that no error happened: driver errors are what bad
// patterns produce, so they are recorded, not fatal. The exit status is 0 when
// ok, 1 otherwise, 2 when the environment is unusable.
//
// The WireTracker watches the driver's own command monitoring events so each
// scenario can prove its pattern happened on the wire (same lsid in flight
// twice, endSessions naming an lsid that is still in flight, ...) without
// depending on sessionguard: the proxy's report is checked separately.
//
// The driver major comes from ./driver (INTEROP_NODE_DRIVER=6|7); the name a
// scenario prints is its own name plus `@node6` / `@node7`, and the line
// carries the exact driver version (`driver`).

const driver = require('./driver');

const { MongoClient } = driver;

/** Error -> the part worth reporting: names and codes, never messages with data. */
function describeError(err) {
  if (err == null) return { name: 'null' };
  const out = { name: err.name || err.constructor?.name || 'Error' };
  if (err.code !== undefined) out.code = err.code;
  if (err.codeName !== undefined) out.codeName = err.codeName;
  const labels = Array.isArray(err.errorLabels) ? err.errorLabels : [];
  if (labels.length > 0) out.labels = labels;
  if (err.cause && err.cause.name) out.cause = err.cause.name;
  return out;
}

function lsidHex(command) {
  const id = command && command.lsid && command.lsid.id;
  if (!id) return null;
  if (typeof id.toString === 'function' && id.buffer) return Buffer.from(id.buffer).toString('hex');
  return String(id);
}

function numberOrNull(v) {
  if (v === undefined || v === null) return null;
  return typeof v === 'object' && typeof v.toNumber === 'function' ? v.toNumber() : Number(v);
}

/** Follows every command a client sends (command monitoring) and what overlapped. */
class WireTracker {
  constructor(client) {
    this.started = []; // {key, name, lsid, txnNumber, startTransaction, inTransaction, connectionId, startedAt, finishedAt, failure}
    this.inFlight = new Map();
    this.sameLsidOverlaps = []; // [{first, second}] commands that shared an lsid while both in flight
    this.endedWhileInFlight = []; // [{endSessions, inFlight}] endSessions naming an lsid in flight
    this.waiters = [];
    client.on('commandStarted', (e) => this.onStarted(e));
    client.on('commandSucceeded', (e) => this.onFinished(e, null));
    client.on('commandFailed', (e) => this.onFinished(e, e.failure));
  }

  key(e) {
    return `${e.address}/${e.connectionId}/${e.requestId}`;
  }

  onStarted(e) {
    const entry = {
      key: this.key(e),
      name: e.commandName,
      lsid: lsidHex(e.command),
      txnNumber: numberOrNull(e.command && e.command.txnNumber),
      startTransaction: Boolean(e.command && e.command.startTransaction),
      inTransaction: Boolean(e.command && e.command.autocommit === false),
      endsLsids: e.commandName === 'endSessions' && Array.isArray(e.command.endSessions)
        ? e.command.endSessions.map((l) => lsidHex({ lsid: l }))
        : [],
      connectionId: e.connectionId,
      startedAt: process.hrtime.bigint(),
      finishedAt: null,
      failure: null,
    };
    if (entry.lsid) {
      for (const other of this.inFlight.values()) {
        if (other.lsid === entry.lsid) this.sameLsidOverlaps.push({ first: summary(other), second: summary(entry) });
      }
    }
    if (entry.endsLsids.length > 0) {
      const ended = new Set(entry.endsLsids);
      for (const other of this.inFlight.values()) {
        if (ended.has(other.lsid)) this.endedWhileInFlight.push({ inFlight: summary(other) });
      }
    }
    this.started.push(entry);
    this.inFlight.set(entry.key, entry);
    this.waiters = this.waiters.filter((w) => !(w.match(entry) && (w.resolve(entry), true)));
  }

  onFinished(e, failure) {
    const entry = this.inFlight.get(this.key(e));
    if (!entry) return;
    this.inFlight.delete(entry.key);
    entry.finishedAt = process.hrtime.bigint();
    entry.failure = failure ? describeError(failure) : null;
  }

  /** Resolves with the first command (already started or future) that `match` accepts. */
  waitFor(match, timeoutMs = 5000) {
    const seen = this.started.find(match);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('timed out waiting for a command on the wire')), timeoutMs);
      this.waiters.push({ match, resolve: (v) => (clearTimeout(timer), resolve(v)) });
    });
  }

  /** Was this lsid named by an endSessions the client sent? */
  endedByEndSessions(lsid) {
    return this.started.some((c) => c.endsLsids.includes(lsid));
  }

  commands(name) {
    return this.started.filter((c) => c.name === name);
  }

  /** A compact description for the JSON line. */
  observed() {
    return {
      commands: this.started.length,
      sameLsidOverlaps: this.sameLsidOverlaps.length,
      endedWhileInFlight: this.endedWhileInFlight.length,
      failures: this.started.filter((c) => c.failure).map((c) => ({ command: c.name, ...c.failure })),
    };
  }
}

function summary(entry) {
  return { name: entry.name, lsid: entry.lsid, txnNumber: entry.txnNumber };
}

/** Opens a client with monitoring on and fail-fast timeouts (an unfaithful server must not hang a run). */
function trackedClient(uri, options = {}) {
  const client = new MongoClient(uri, {
    monitorCommands: true,
    serverSelectionTimeoutMS: 5000,
    connectTimeoutMS: 5000,
    appName: options.appName || 'sessionguard-interop',
    ...options,
  });
  const tracker = new WireTracker(client);
  return { client, tracker };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Runs one scenario. `body(ctx)` returns {ok, ...observed}; it records the
 * driver errors it expects with ctx.record(err). Anything it throws is an
 * unexpected failure (ok: false).
 */
async function runScenario(baseName, body) {
  const name = `${baseName}@${driver.tag}`;
  const uri = process.env.MONGODB_URI;
  if (!uri) {
    process.stdout.write(JSON.stringify({ scenario: name, ok: false, errors: [{ name: 'MONGODB_URI is not set' }] }) + '\n');
    process.exit(2);
  }
  const errors = [];
  const clients = [];
  const ctx = {
    uri,
    driver,
    record(err) {
      errors.push(describeError(err));
      process.stderr.write(`[${name}] recorded driver error: ${err && err.name}: ${err && err.message}\n`);
    },
    client(options) {
      const tracked = trackedClient(uri, options);
      clients.push(tracked.client);
      return tracked;
    },
    /**
     * Follows a client some library created (Mongoose's connection): its
     * commands are tracked like ctx.client()'s (the library must have passed
     * `monitorCommands: true`), and `closable.close()` runs at the end.
     */
    adopt(client, closable = client) {
      clients.push(closable);
      return new WireTracker(client);
    },
  };
  let result = { ok: false };
  try {
    result = (await body(ctx)) || { ok: false };
  } catch (err) {
    process.stderr.write(`[${name}] unexpected failure: ${err && err.stack}\n`);
    errors.push({ unexpected: true, ...describeError(err) });
    result = { ok: false };
  } finally {
    for (const c of clients) {
      try {
        await c.close();
      } catch (err) {
        process.stderr.write(`[${name}] close failed: ${err && err.message}\n`);
      }
    }
  }
  const { ok, ...observed } = result;
  const line = { scenario: name, ok: ok === true, driver: `mongodb@${driver.version}`, errors, observed };
  process.stdout.write(JSON.stringify(line) + '\n');
  // Exit explicitly: a bad pattern may leave timers (a closed client's retry) behind.
  process.exit(line.ok ? 0 : 1);
}

module.exports = { runScenario, trackedClient, WireTracker, describeError, sleep, driver };
