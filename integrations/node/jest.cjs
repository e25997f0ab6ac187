'use strict';
// sessionguard test marks for Jest (27 and newer). One line in the Jest config:
//   "setupFilesAfterEnv": ["<path to>/integrations/node/jest.cjs"]
// Tells `sessionguard exec` when each test begins and ends, and in which
// process (see integrations/PROTOCOL.md). Does nothing when
// SESSIONGUARD_MARKS_URL is unset.
const marks = require('./marks.cjs');

if (marks.enabled) {
  const file = () => marks.relativeFile(expect.getState().testPath);
  // A setup file's hooks belong to the root block: this beforeEach runs
  // before every other beforeEach and this afterEach after every other
  // afterEach, so a test's own hooks fall inside its marks. Jest awaits the
  // returned promise: the test body starts only once `begin` is acknowledged.
  beforeEach(() => marks.post('begin', expect.getState().currentTestName, file()));
  afterEach(() => marks.post('end', expect.getState().currentTestName, file()));

  // test.concurrent: Jest 30 runs no *Each hook for those tests, so mark them
  // from Jest's own event stream, which it awaits the same way. Jest 29 and
  // older have no shared handler list: there concurrent tests go unmarked.
  const handlers = globalThis[Symbol.for('EVENT_HANDLERS')];
  if (Array.isArray(handlers)) {
    // The name Jest gives the test (describe titles and its own, joined by a
    // space), as `currentTestName` has it for the others.
    const testId = (test) => {
      const names = [];
      for (let t = test; t && t.parent; t = t.parent) names.unshift(t.name);
      return names.join(' ');
    };
    handlers.push(async (event) => {
      if (!event.test || !event.test.concurrent) return;
      if (event.name === 'test_started') await marks.post('begin', testId(event.test), file());
      if (event.name === 'test_done') await marks.post('end', testId(event.test), file());
    });
  }
}
