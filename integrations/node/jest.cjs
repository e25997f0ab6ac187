'use strict';
// sessionguard test marks for Jest (27 and newer). One line in the Jest config:
//   "setupFilesAfterEnv": ["<path to>/integrations/node/jest.cjs"]
// Tells `sessionguard exec` when each test begins and ends, and in which
// process (see integrations/PROTOCOL.md). Does nothing when
// SESSIONGUARD_MARKS_URL is unset.
const marks = require('./marks.cjs');

if (marks.enabled) {
  const file = () => marks.relativeFile(expect.getState().testPath);
  const handlers = globalThis[Symbol.for('EVENT_HANDLERS')];
  if (Array.isArray(handlers)) {
    // Jest 30: Jest's own test events. `test_started` comes before the
    // test's beforeEach hooks and `test_done` after its afterEach hooks, for
    // every test, test.concurrent ones included (they run no *Each hook). A
    // handler is a plain call, where a hook is a timed step Jest awaits, and
    // mark() only queues: the test goes on at once.
    // The name is the one Jest gives the test (describe titles and its own,
    // joined by a space: `currentTestName`).
    const testId = (test) => {
      const names = [];
      for (let t = test; t && t.parent; t = t.parent) names.unshift(t.name);
      return names.join(' ');
    };
    handlers.push((event) => {
      if (event.name === 'test_started') marks.mark('begin', testId(event.test), file());
      else if (event.name === 'test_done') marks.mark('end', testId(event.test), file());
    });
  } else {
    // Jest 29 and older have no shared handler list: a setup file's hooks
    // belong to the root block, so this beforeEach runs before every other
    // beforeEach and this afterEach after every other afterEach. There
    // test.concurrent tests, which run no *Each hook, go unmarked.
    beforeEach(() => {
      marks.mark('begin', expect.getState().currentTestName, file());
    });
    afterEach(() => {
      marks.mark('end', expect.getState().currentTestName, file());
    });
  }
  // The marks of this file are sent before Jest reports the file done and
  // may end or reuse the worker.
  afterAll(() => marks.flush(), marks.HOOK_TIMEOUT_MS);
}
