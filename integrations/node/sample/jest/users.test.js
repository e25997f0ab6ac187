const { probe } = require('../probe.cjs');

test('signs up', () => probe('jest-users-signup'));

describe('sessions', () => {
  // A test's own hooks run inside its marks.
  beforeEach(() => probe(`hook:${expect.getState().currentTestName}`));
  afterEach(() => probe(`hook:${expect.getState().currentTestName}`));
  test('logs in', () => probe('jest-users-login'));
  test('logs out', () => probe('jest-users-logout'));
});

// Fake timers (and a fake clock, years off) installed around the tests and
// their hooks: the marks keep the real time, and keep being sent.
describe('with fake timers', () => {
  beforeAll(() => jest.useFakeTimers({ now: new Date('2001-01-01') }));
  afterAll(() => jest.useRealTimers());
  test('expires the session', () => probe('jest-users-expire'));
});
