// sessionguard test marks for the Node.js test runner (node:test, Node 20.16
// and newer). One flag:
//   node --import <path to>/integrations/node/node-test.mjs --test
// (or NODE_OPTIONS="--import <path to>/integrations/node/node-test.mjs").
// Tells `sessionguard exec` when each test begins and ends, and in which
// process (see integrations/PROTOCOL.md). Does nothing when
// SESSIONGUARD_MARKS_URL is unset.
//
// `node --test` runs each file in a child process of its own, marked by
// NODE_TEST_CONTEXT; there this registers a beforeEach and an afterEach on
// the root test, which then run around every test and subtest of the file
// however node:test was imported (default or named, import or require), and
// around the hooks of its describe blocks. Anywhere else (the `node --test`
// parent, or any other node process NODE_OPTIONS reaches) it registers
// nothing: a root hook makes node:test print a report at exit, even with no
// test in the process. That includes the processes a test starts: they
// inherit NODE_TEST_CONTEXT, and this module too through fork()'s execArgv or
// NODE_OPTIONS, so the first process to register leaves its pid in OWNER.
import { createRequire } from 'node:module';

const marks = createRequire(import.meta.url)('./marks.cjs');
const OWNER = 'SESSIONGUARD_MARKS_NODE_TEST_PID';

if (marks.enabled && process.env.NODE_TEST_CONTEXT && !process.env[OWNER]) {
  process.env[OWNER] = String(process.pid);
  const { after, afterEach, beforeEach } = await import('node:test');
  // fullName: describe titles, test names and subtest names joined by " > "
  // (Node 20.16+, 22.3+); filePath: Node 22.6+, else the file this child runs.
  const name = (t) => t.fullName ?? t.name;
  const file = (t) => marks.relativeFile(t.filePath ?? process.argv[1]);
  // mark() only queues: the test goes on at once.
  beforeEach((t) => {
    marks.mark('begin', name(t), file(t));
  });
  afterEach((t) => {
    marks.mark('end', name(t), file(t));
  });
  // After the last test of the file: what is queued is sent before the
  // child reports and exits.
  after(() => marks.flush(), { timeout: marks.HOOK_TIMEOUT_MS });
}
