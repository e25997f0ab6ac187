import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { probe } from '../probe.cjs';

test('signs up', () => probe('vitest-users-signup'));

describe('sessions', () => {
  // A test's own hooks run inside its marks.
  beforeEach(() => probe(`hook:${expect.getState().currentTestName}`));
  afterEach(() => probe(`hook:${expect.getState().currentTestName}`));
  test('logs in', () => probe('vitest-users-login'));
  test('logs out', () => probe('vitest-users-logout'));
});
