'use strict';
// The client half of integrations/PROTOCOL.md, shared by the Node.js adapters
// (jest.cjs, vitest.mjs, mocha.cjs, node-test.mjs). It tells `sessionguard
// exec` which test this process is running, so that a finding can name it.
// It must never fail, slow down or hang a test:
// - mark() only stamps the event with the time and queues it; the marks are
//   sent in the background, gathered for BATCH_MS into one request, on one
//   kept-alive connection. A test never waits on the network: the time in
//   each mark, not its arrival, places it (sessionguard pairs marks with
//   requests when it writes its report, after the run).
// - flush() is awaited by a root after-all hook (once per test file, or per
//   process, depending on the runner), so that no mark is lost when the
//   runner ends or recycles the process; it waits at most FLUSH_MS.
// - When SESSIONGUARD_MARKS_URL is unset it does nothing at all, and after the
//   first failure (refused, timed out, non-2xx) it stops sending for the rest
//   of the process: an unreachable endpoint costs one bounded wait, at the
//   first flush, not one per test.

const URL_VAR = 'SESSIONGUARD_MARKS_URL';
const TIMEOUT_MS = 1000; // one request: connection and response
const FLUSH_MS = 1000; // the final flush, in total
const BATCH_MS = 100; // how long marks gather before a request
const MAX_BATCH = 500; // marks per request (PROTOCOL.md)

const enabled = Boolean(process.env[URL_VAR]);
let http;
let state;

// The real timers and clock, taken when this module loads, before any test
// runs: fake timers a test installs later (jest.useFakeTimers,
// vi.useFakeTimers, node:test's mock.timers) replace the globals and the
// properties of `node:timers`, and must neither stall the sender nor falsify
// the times. (`node:timers` and `node:perf_hooks` are the real core modules
// even inside Jest's sandbox.)
const real = enabled ? realClock() : null;

function realClock() {
  const { setImmediate, setTimeout, clearTimeout } = require('node:timers');
  const { performance } = require('node:perf_hooks');
  const origin = performance.timeOrigin;
  const now = performance.now.bind(performance);
  // Unix epoch milliseconds, sub-millisecond precision: timeOrigin is the wall
  // clock at process start, now() a monotonic offset from it.
  return { setImmediate, setTimeout, clearTimeout, time: () => origin + now() };
}

// This module instance's queue. Jest and Vitest load setup files once per
// test file in a fresh module registry (Jest: a fresh realm), and each
// instance flushes its own queue at the end of its file, so no closure of a
// finished file outlives it; what must outlive a file (the connection, the
// "failed" verdict) is plain data shared through the real `node:http`.
const queue = [];
let sending = null; // the drain loop's promise while it runs
let flushing = false; // flush() waits: send without gathering
let wake = null; // ends the gathering wait early

// One state per process, so an unreachable endpoint costs one timeout per
// process, not one per file.
function shared() {
  if (state === undefined) {
    http = require('node:http');
    const key = Symbol.for('sessionguard.marks.state');
    if (!http[key]) {
      let url = null;
      try {
        url = new URL(process.env[URL_VAR]);
      } catch {}
      http[key] = {
        url: url && url.protocol === 'http:' ? url : null,
        // One connection: marks queue up behind the request in flight and go
        // together in the next one.
        agent: new http.Agent({ keepAlive: true, maxSockets: 1 }),
        failed: false,
      };
    }
    state = http[key];
  }
  return state;
}

// Queues one mark, stamped with the time now (the wall clock sessionguard
// stamps each request with). Returns nothing, never throws: a hook calls it
// and goes on at once.
function mark(event, test, file) {
  if (!enabled) return;
  const time = real.time();
  const s = shared();
  if (s.failed || !s.url) return;
  queue.push({ event, test, file, pid: process.pid, time });
  if (!sending) sending = drain(s);
}

// Sends what is queued until the queue is empty, MAX_BATCH marks per request,
// each request after marks gathered for BATCH_MS (a request costs the test
// process far more than a mark: gathering makes it one per many tests).
// Never rejects.
async function drain(s) {
  try {
    while (queue.length > 0 && !s.failed) {
      if (!flushing && queue.length < MAX_BATCH) {
        // A timer of Node's own, taken before any test could fake it; it
        // keeps the process alive, so marks are sent even where no flush
        // runs.
        await new Promise((resolve) => {
          const timer = real.setTimeout(resolve, BATCH_MS);
          wake = () => {
            real.clearTimeout(timer);
            resolve();
          };
        });
        wake = null;
      }
      const batch = queue.splice(0, MAX_BATCH);
      // One mark: the single-object body of PROTOCOL.md; several: an array.
      const body = JSON.stringify(batch.length === 1 ? batch[0] : batch);
      if (!(await send(s, body, true))) s.failed = true;
    }
  } catch {
    s.failed = true;
  }
  queue.length = 0; // after a failure, what is left is dropped
  sending = null;
}

// Sends what is queued now, and resolves once every mark queued so far was
// sent (or given up), or after FLUSH_MS: then the endpoint counts as failed
// for the rest of the process, so that no later flush waits again. Never
// rejects.
function flush() {
  if (!sending) return Promise.resolve();
  const s = shared();
  flushing = true;
  if (wake) wake();
  return new Promise((resolve) => {
    const done = () => {
      real.clearTimeout(timer);
      flushing = false;
      resolve();
    };
    const timer = real.setTimeout(() => {
      s.failed = true;
      queue.length = 0;
      done();
    }, FLUSH_MS);
    sending.then(done);
  });
}

// One POST; resolves true on a 2xx, false on anything else.
function send(s, body, mayRetry) {
  return new Promise((resolve) => {
    let settled = false;
    const settle = (ok) => {
      if (settled) return;
      settled = true;
      resolve(ok);
    };
    try {
      const req = http.request(
        s.url,
        {
          method: 'POST',
          agent: s.agent,
          headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
        },
        (res) => {
          res.on('error', () => settle(false));
          res.on('end', () => settle(res.statusCode >= 200 && res.statusCode < 300));
          res.resume();
        },
      );
      // An idle timeout on the socket: it runs on Node's own timers.
      req.setTimeout(TIMEOUT_MS, () => req.destroy(new Error('sessionguard marks: timed out')));
      req.on('error', (err) => {
        // A kept-alive socket the server closed while it sat idle: retry once
        // on a fresh one (the pattern Node's documentation gives for
        // `request.reusedSocket`), rather than give up on a healthy endpoint.
        if (!settled && mayRetry && req.reusedSocket && err.code === 'ECONNRESET') {
          settled = true;
          resolve(send(s, body, false));
          return;
        }
        settle(false);
      });
      req.end(body);
    } catch {
      settle(false); // whatever http.request refuses must not reach the test
    }
  });
}

// The test file as PROTOCOL.md wants it: relative to the working directory
// (forward slashes) when it is inside it, else absolute. Computed once per
// file, against the working directory of the first call: a test's begin and
// end carry the same file even if the test changes directory.
const files = new Map();
let cwd;
function relativeFile(file) {
  if (!file) return '';
  let rel = files.get(file);
  if (rel === undefined) {
    const path = require('node:path');
    if (cwd === undefined) cwd = process.cwd();
    const abs = path.resolve(cwd, String(file));
    rel = path.relative(cwd, abs);
    rel = rel === '' || rel === '..' || rel.startsWith(`..${path.sep}`) || path.isAbsolute(rel) ? abs : rel.split(path.sep).join('/');
    files.set(file, rel);
  }
  return rel;
}

// What a runner's after-all hook should allow the flush, beyond FLUSH_MS.
const HOOK_TIMEOUT_MS = FLUSH_MS + 1000;

module.exports = { enabled, mark, flush, relativeFile, HOOK_TIMEOUT_MS };
