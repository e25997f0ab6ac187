'use strict';
// The client half of integrations/PROTOCOL.md, shared by the Node.js adapters
// (jest.cjs, vitest.mjs, mocha.cjs, node-test.mjs). It tells `sessionguard
// exec` which test this process is running, so that a finding can name it.
// It must never fail, slow down or hang a test: when SESSIONGUARD_MARKS_URL is
// unset it does nothing at all, and after its first failure (refused, timed
// out, non-2xx) it stops sending for the rest of the process.

const URL_VAR = 'SESSIONGUARD_MARKS_URL';
const TIMEOUT_MS = 1000;

const enabled = Boolean(process.env[URL_VAR]);
let http;
let state;

// One state per process: Jest and Vitest load setup files once per test file
// in a fresh module registry, but they all share the real `node:http`. So an
// unreachable endpoint costs one timeout per process, not one per file.
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
        agent: new http.Agent({ keepAlive: true }),
        failed: false,
      };
    }
    state = http[key];
  }
  return state;
}

// Sends one mark and resolves once sessionguard acknowledged it (or gave up).
// Never rejects.
function post(event, test, file) {
  if (!enabled) return Promise.resolve();
  const s = shared();
  if (s.failed || !s.url) return Promise.resolve();
  return send(s, JSON.stringify({ event, test, file, pid: process.pid }), true);
}

function send(s, body, mayRetry) {
  return new Promise((resolve) => {
    let settled = false;
    const settle = (ok) => {
      if (settled) return;
      settled = true;
      if (!ok) s.failed = true;
      resolve();
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
      // An idle timeout on the socket: it runs on Node's own timers, so fake
      // timers installed by a test (jest.useFakeTimers, vi.useFakeTimers)
      // cannot stop it.
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
// (forward slashes) when it is inside it, else absolute.
function relativeFile(file) {
  if (!file) return '';
  const path = require('node:path');
  const abs = path.resolve(String(file));
  const rel = path.relative(process.cwd(), abs);
  if (rel === '' || rel === '..' || rel.startsWith(`..${path.sep}`) || path.isAbsolute(rel)) return abs;
  return rel.split(path.sep).join('/');
}

module.exports = { enabled, post, relativeFile };
