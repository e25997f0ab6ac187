// Named imports, describe/it, a describe block's own hooks, and a test that
// starts a node process of its own (which must stay a plain process: no
// marks, no test report on its stdout).
import { fork } from 'node:child_process';
import { strictEqual } from 'node:assert';
import { after, afterEach, before, beforeEach, describe, it, mock } from 'node:test';
import { probe } from '../probe.cjs';

it('signs up', () => probe('node-users-signup'));

describe('users', () => {
  describe('sessions', () => {
    beforeEach((t) => probe(`hook:${t.fullName}`));
    afterEach((t) => probe(`hook:${t.fullName}`));
    it('logs in', () => probe('node-users-login'));
    it('logs out', () => probe('node-users-logout'));
  });
});

// node:test's mock timers (they replace setTimeout and setImmediate, those
// of node:timers too, and Date, years off) around a test and its hooks: the
// marks keep the real time, and keep being sent.
describe('with mock timers', () => {
  before(() => mock.timers.enable({ apis: ['setTimeout', 'setImmediate', 'Date'], now: Date.parse('2001-01-01') }));
  after(() => mock.timers.reset());
  it('expires the session', () => probe('node-users-expire'));
});

it('runs a child process', async () => {
  await probe('node-users-child');
  const child = fork('-e', ['console.log("child ok")'], { stdio: 'pipe' });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  await new Promise((resolve) => child.on('close', resolve));
  strictEqual(out, 'child ok\n');
});
