'use strict';
// Issue 8's race, with a real Express app (express-session + connect-mongo):
// a slow request loads the session, a concurrent /logout destroys it while
// the slow request waits, then the slow request finishes.
//   node express-resurrection.js bad               the slow request's save (an upsert)
//                                                  brings the destroyed session back
//   node express-resurrection.js fixed-recheck     the slow route re-checks the store
//   node express-resurrection.js fixed-touch-only  resave: false, the slow route only touches
// "ok" means the variant behaved as described: for bad, the session really
// came back after the logout (the old cookie works again); for the fixed
// ones, the logout stuck. Scenario name: express-resurrection-VARIANT.
const { runScenario } = require('../lib/harness');
const { Browser } = require('../lib/http');
const { createApp, listen, STORE_COLLECTION } = require('../express-app');

const variant = process.argv[2];
if (!['bad', 'fixed-recheck', 'fixed-touch-only'].includes(variant)) {
  process.stderr.write('usage: express-resurrection.js bad|fixed-recheck|fixed-touch-only\n');
  process.exit(2);
}

runScenario(`express-resurrection-${variant}`, async (ctx) => {
  const { client, tracker } = ctx.client({ appName: `interop-express-resurrection-${variant}` });
  await client.connect();
  const sessions = client.db().collection(STORE_COLLECTION);
  await sessions.deleteMany({});
  let slowLoaded;
  const slowHasSession = new Promise((resolve) => (slowLoaded = resolve));
  const { app, storeErrors, appErrors } = createApp({ client, variant, slowMs: 400, hooks: { slowLoaded } });
  const { server, baseUrl } = await listen(app);
  try {
    const browser = new Browser(baseUrl);
    const login = await browser.request('POST', '/login', { user: 'alice' });
    if (login.status !== 200) throw new Error(`login answered ${login.status}`);
    const sid = browser.sessionId();
    const cookie = browser.cookie;

    // Tab 1: the slow request, holding the session it loaded.
    const slowTab = new Browser(baseUrl);
    slowTab.cookie = cookie;
    const slow = slowTab.request('GET', '/slow');
    await slowHasSession;
    // Tab 2: logout while the slow request waits.
    const logout = await browser.request('POST', '/logout');
    const destroyed = (await sessions.countDocuments({ _id: sid })) === 0;
    const slowAnswer = await slow; // express-session saved (or touched) before answering

    const resurrected = (await sessions.countDocuments({ _id: sid })) === 1;
    const replay = new Browser(baseUrl);
    replay.cookie = cookie;
    const afterLogout = await replay.request('GET', '/me');

    const upserts = tracker.commands('update').length;
    const expectResurrection = variant === 'bad';
    return {
      ok:
        logout.status === 200 &&
        destroyed &&
        resurrected === expectResurrection &&
        (afterLogout.status === 200) === expectResurrection,
      destroyedByLogout: destroyed,
      resurrected,
      slowStatus: slowAnswer.status,
      oldCookieAfterLogout: afterLogout.status,
      storeErrors: storeErrors.map((e) => e.message),
      appErrors: appErrors.map((e) => e.message), // fixed variants: connect-mongo's failed touch, expected
      updatesSent: upserts,
    };
  } finally {
    await new Promise((r) => server.close(r));
  }
});
