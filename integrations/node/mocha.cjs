'use strict';
// sessionguard test marks for Mocha (8 and newer, --parallel included): a
// root hook plugin. One line in .mocharc:
//   "require": ["<path to>/integrations/node/mocha.cjs"]
// Tells `sessionguard exec` when each test begins and ends, and in which
// process (see integrations/PROTOCOL.md). Does nothing when
// SESSIONGUARD_MARKS_URL is unset.
const marks = require('./marks.cjs');

// Root hooks run before every other beforeEach and after every other
// afterEach, so a test's own hooks fall inside its marks; Mocha awaits the
// returned promise before the test body. Under --parallel every worker
// process loads this file and sends its own pid.
const mark = (event, test) => marks.post(event, test.fullTitle(), marks.relativeFile(test.file));

exports.mochaHooks = marks.enabled
  ? {
      beforeEach() {
        return mark('begin', this.currentTest);
      },
      afterEach() {
        return mark('end', this.currentTest);
      },
    }
  : {};
