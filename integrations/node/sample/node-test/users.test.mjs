// Named imports, describe/it, a describe block's own hooks, and a test that
// starts a node process of its own (which must stay a plain process: no
// marks, no test report on its stdout).
import { fork } from 'node:child_process';
import { strictEqual } from 'node:assert';
import { afterEach, beforeEach, describe, it } from 'node:test';
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

it('runs a child process', async () => {
  await probe('node-users-child');
  const child = fork('-e', ['console.log("child ok")'], { stdio: 'pipe' });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  await new Promise((resolve) => child.on('close', resolve));
  strictEqual(out, 'child ok\n');
});
