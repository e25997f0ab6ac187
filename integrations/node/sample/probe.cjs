'use strict';
// Sample-suite helpers (not part of any integration). probe(token) tells the
// stub marks server (MARKS_STUB_URL) "this test ran here, now": its pid and
// the time on this process's clock; the stub adds the time it received the
// probe, as the proxy stamps a test's MongoDB request. check.py then finds
// which tests the marks say were open in that pid at that time. A no-op
// without the stub.
const http = require('node:http');
// The real clock, whatever fake timers a test installed.
const { performance } = require('node:perf_hooks');

function probe(token) {
  const base = process.env.MARKS_STUB_URL;
  if (!base) return Promise.resolve();
  const time = performance.timeOrigin + performance.now();
  const url = `${base}/probe?token=${encodeURIComponent(token)}&pid=${process.pid}&time=${time}`;
  return new Promise((resolve, reject) => {
    http
      .get(url, { agent: false }, (res) => {
        res.resume();
        res.on('end', () => (res.statusCode === 200 ? resolve() : reject(new Error(`probe: HTTP ${res.statusCode}`))));
      })
      .on('error', reject);
  });
}

// barrier(n)() resolves once n callers have arrived: concurrent tests wait on
// it so that they are provably open at the same time (with a deadline, so a
// runner that does not run them concurrently fails instead of hanging).
function barrier(n, ms = 10000) {
  let arrived = 0;
  let release;
  const all = new Promise((resolve) => (release = resolve));
  return async () => {
    if (++arrived === n) release();
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`barrier: ${arrived} of ${n} tests arrived`)), ms);
    });
    try {
      await Promise.race([all, late]);
    } finally {
      clearTimeout(timer);
    }
  };
}

module.exports = { probe, barrier };
