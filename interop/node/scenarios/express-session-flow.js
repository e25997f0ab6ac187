'use strict';
// GOOD: the Express app (express-session + connect-mongo) through one
// persistent client: login, requests, a slow request, logout, all one at a
// time. Checks the HTTP answers and what the store holds in MongoDB after
// each step: the TTL index on `expires`, the session document, its `expires`
// moving forward on a touch, and its removal on logout.
// "ok": every check passed (the list is in "observed.checks").
const { runScenario, sleep } = require('../lib/harness');
const { Browser } = require('../lib/http');
const { createApp, listen, STORE_COLLECTION } = require('../express-app');

runScenario('express-session-flow', async (ctx) => {
  const { client, tracker } = ctx.client({ appName: 'interop-express-session-flow' });
  await client.connect();
  const sessions = client.db().collection(STORE_COLLECTION);
  await sessions.deleteMany({});
  const { app, storeErrors, appErrors } = createApp({ client, variant: 'plain', slowMs: 100 });
  const { server, baseUrl } = await listen(app);
  const checks = [];
  const check = (name, pass) => checks.push({ name, pass: Boolean(pass) });
  try {
    const browser = new Browser(baseUrl);

    let r = await browser.request('GET', '/me');
    check('anonymous /me is 401', r.status === 401);
    check('no session stored for an anonymous visit', (await sessions.countDocuments({})) === 0);

    r = await browser.request('POST', '/login', { user: 'alice' });
    check('login is 200', r.status === 200 && r.json.user === 'alice');
    const sid = browser.sessionId();
    check('login set a signed session cookie', sid);
    const stored = await sessions.findOne({ _id: sid });
    check('session document stored under the cookie id', stored && JSON.parse(stored.session).user === 'alice');
    check('session document has an expires date', stored && stored.expires instanceof Date);
    const indexes = await sessions.listIndexes().toArray();
    check(
      'TTL index on expires (expireAfterSeconds 0)',
      indexes.some((ix) => ix.key && ix.key.expires === 1 && ix.expireAfterSeconds === 0),
    );

    await sleep(20); // so a touch moves expires by a visible amount
    r = await browser.request('GET', '/me');
    check('/me is 200 with the user', r.status === 200 && r.json.user === 'alice');
    const touched = await sessions.findOne({ _id: sid });
    check('touch moved expires forward', touched && touched.expires > stored.expires);
    const touches = tracker.commands('update').length;

    r = await browser.request('GET', '/slow');
    check('/slow is 200 and modified the session', r.status === 200 && r.json.slowCount === 1);
    const afterSlow = await sessions.findOne({ _id: sid });
    check('the slow request saved the session', afterSlow && JSON.parse(afterSlow.session).slowCount === 1);

    const cookieBeforeLogout = browser.cookie;
    r = await browser.request('POST', '/logout');
    check('logout is 200 and clears the cookie', r.status === 200 && browser.cookie === null);
    check('logout removed the session document', (await sessions.countDocuments({ _id: sid })) === 0);

    browser.cookie = cookieBeforeLogout; // a replayed old cookie
    r = await browser.request('GET', '/me');
    check('a replayed old cookie is 401', r.status === 401);
    check('still no session document after the replay', (await sessions.countDocuments({ _id: sid })) === 0);
    check('the store and the app reported no error', storeErrors.length === 0 && appErrors.length === 0);
    check('no command failed', tracker.started.every((c) => !c.failure));
    check('updates (set/touch) were sent', touches > 0);
  } finally {
    await new Promise((r) => server.close(r));
  }
  return { ok: checks.every((c) => c.pass), checks: checks.filter((c) => !c.pass).map((c) => c.name), passedChecks: checks.filter((c) => c.pass).length };
});
