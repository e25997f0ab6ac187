const { probe } = require('../probe.cjs');

it('signs up', () => probe('mocha-users-signup'));

describe('sessions', () => {
  // A test's own hooks run inside its marks.
  beforeEach(function () {
    return probe(`hook:${this.currentTest.fullTitle()}`);
  });
  afterEach(function () {
    return probe(`hook:${this.currentTest.fullTitle()}`);
  });
  it('logs in', () => probe('mocha-users-login'));
  it('logs out', () => probe('mocha-users-logout'));
});
