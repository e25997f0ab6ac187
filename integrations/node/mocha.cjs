'use strict';
// sessionguard test marks for Mocha (8 and newer, --parallel included): a
// root hook plugin. One line in .mocharc:
//   "require": ["<path to>/integrations/node/mocha.cjs"]
// Tells `sessionguard exec` when each test begins and ends, and in which
// process (see integrations/PROTOCOL.md). Does nothing when
// SESSIONGUARD_MARKS_URL is unset.
const marks = require('./marks.cjs');

// Root hooks run before every other beforeEach and after every other
// afterEach, so a test's own hooks fall inside its marks. mark() only queues:
// the test goes on at once. The root afterAll (once per run; under --parallel
// once per file, in the worker that ran it) sends what is queued before Mocha
// ends the run or the worker.
const mark = (event, test) => marks.mark(event, test.fullTitle(), marks.relativeFile(test.file));

exports.mochaHooks = marks.enabled
  ? {
      beforeEach() {
        mark('begin', this.currentTest);
      },
      afterEach() {
        mark('end', this.currentTest);
      },
      afterAll() {
        this.timeout(marks.HOOK_TIMEOUT_MS);
        return marks.flush();
      },
    }
  : {};
