// sessionguard test marks for Vitest (1 and newer). One line in vitest.config:
//   test: { setupFiles: ['<path to>/integrations/node/vitest.mjs'] }
// Tells `sessionguard exec` when each test begins and ends, and in which
// process (see integrations/PROTOCOL.md). Does nothing when
// SESSIONGUARD_MARKS_URL is unset. The pid tells workers apart only with
// pool 'forks' (the default) or 'vmForks': 'threads' and 'vmThreads' run every
// worker in the one Vitest process.
import { afterAll, afterEach, beforeEach } from 'vitest';
import marks from './marks.cjs';

if (marks.enabled) {
  // The name Vitest's reporters print: describe titles and the test's own,
  // joined by " > ", without the file.
  const name = (task) => {
    const names = [];
    for (let t = task; t && t !== task.file; t = t.suite) if (t.name) names.unshift(t.name);
    return names.join(' > ');
  };
  const mark = (event, task) => marks.mark(event, name(task), marks.relativeFile(task.file?.filepath));
  // A setup file's hooks run before every other beforeEach and (hooks run as
  // a stack) after every other afterEach; Vitest runs them for each test,
  // test.concurrent ones too. mark() only queues: the test goes on at once.
  beforeEach(({ task }) => {
    mark('begin', task);
  });
  afterEach(({ task }) => {
    mark('end', task);
  });
  // The marks of this file are sent before Vitest reports the file done and
  // may end the worker.
  afterAll(() => marks.flush(), marks.HOOK_TIMEOUT_MS);
}
