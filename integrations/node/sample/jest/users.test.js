const { probe } = require('../probe.cjs');

test('signs up', () => probe('jest-users-signup'));

describe('sessions', () => {
  // A test's own hooks run inside its marks.
  beforeEach(() => probe(`hook:${expect.getState().currentTestName}`));
  afterEach(() => probe(`hook:${expect.getState().currentTestName}`));
  test('logs in', () => probe('jest-users-login'));
  test('logs out', () => probe('jest-users-logout'));
});
