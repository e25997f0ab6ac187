import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, test, vi } from 'vitest';
import { probe } from '../probe.cjs';

test('signs up', () => probe('vitest-users-signup'));

describe('sessions', () => {
  // A test's own hooks run inside its marks.
  beforeEach(() => probe(`hook:${expect.getState().currentTestName}`));
  afterEach(() => probe(`hook:${expect.getState().currentTestName}`));
  test('logs in', () => probe('vitest-users-login'));
  test('logs out', () => probe('vitest-users-logout'));
});

// Fake timers (and a fake clock, years off) installed around the tests and
// their hooks: the marks keep the real time, and keep being sent.
describe('with fake timers', () => {
  beforeAll(() => {
    vi.useFakeTimers({
      now: new Date('2001-01-01'),
      toFake: ['setTimeout', 'clearTimeout', 'setImmediate', 'clearImmediate', 'setInterval', 'Date', 'performance'],
    });
  });
  afterAll(() => vi.useRealTimers());
  test('expires the session', () => probe('vitest-users-expire'));
});
