'use strict';
// An Express app whose HTTP sessions live in MongoDB (express-session +
// connect-mongo), as in reference articles 001 and 004: a TTL index on
// `expires` (connect-mongo's autoRemove: 'native'), `touch` on requests that do
// not change the session, destroy on logout.
//
// Routes:
//   POST /login   {user}  regenerates the session (new id) and stores the user
//   GET  /me              401 without a logged-in session, else {user, slowCount}
//   GET  /slow            awaits a timer (slowMs), then records the visit in the session
//   POST /logout          req.session.destroy(), clears the cookie
//
// Variants (what /slow does after its timer, and how sessions are saved):
//   plain             resave: false; /slow modifies the session (one request at a time: fine)
//   bad               resave: true (express-session's historical default); /slow
//                     modifies the session from the copy it loaded before the timer.
//                     A /logout that lands during the timer is undone: the slow
//                     request's save is an upsert and brings the session back.
//   fixed-recheck     resave: false; /slow re-reads the session from the store
//                     after its timer and leaves it untouched if it is gone
//   fixed-touch-only  resave: false; /slow keeps its data outside the session,
//                     so express-session only touches (update without upsert)
//
// createApp() is used in-process by the driver scripts (and by the issue 8
// suite); run this file directly to serve it: MONGODB_URI, PORT (default 0 =
// ephemeral), VARIANT, SLOW_MS. It prints {"listening": "127.0.0.1:PORT"}.

const express = require('express');
const session = require('express-session');
// connect-mongo 6 ships ESM and CJS bundles: CommonJS gets the class by name.
const { MongoStore } = require('connect-mongo');
const { MongoClient } = require('./lib/driver');

const VARIANTS = ['plain', 'bad', 'fixed-recheck', 'fixed-touch-only'];
const COOKIE_NAME = 'connect.sid';
const SESSION_SECRET = 'sessionguard-interop-not-a-secret';
const STORE_COLLECTION = 'sessions';

/**
 * @param {object} options
 * @param {MongoClient} options.client connected or not; the app never closes it
 * @param {string} [options.variant]
 * @param {number} [options.slowMs] how long /slow waits
 * @param {object} [options.hooks] {slowLoaded(sessionID)}: called when /slow holds the session
 * @returns {{app, store, storeErrors: Error[], appErrors: Error[]}}
 */
function createApp({ client, variant = 'plain', slowMs = 300, hooks = {} }) {
  if (!VARIANTS.includes(variant)) throw new Error(`unknown variant ${variant}; one of ${VARIANTS.join(', ')}`);
  const store = MongoStore.create({
    client,
    collectionName: STORE_COLLECTION,
    ttl: 24 * 60 * 60,
    autoRemove: 'native', // TTL index { expires: 1 }, expireAfterSeconds: 0
    touchAfter: 0, // touch on every request that does not save
  });
  // The store reports its own failures (a touch that found no session, ...).
  const storeErrors = [];
  store.on('error', (err) => storeErrors.push(err));

  const app = express();
  app.use(express.json());
  app.use(
    session({
      name: COOKIE_NAME,
      secret: SESSION_SECRET,
      store,
      resave: variant === 'bad',
      saveUninitialized: false,
      cookie: { httpOnly: true, sameSite: 'strict', maxAge: 24 * 60 * 60 * 1000 },
    }),
  );

  app.post('/login', (req, res, next) => {
    const user = req.body && typeof req.body.user === 'string' ? req.body.user : null;
    if (!user) return res.status(400).json({ error: 'user required' });
    // A new id at login (no session fixation), as express-session recommends.
    req.session.regenerate((err) => {
      if (err) return next(err);
      req.session.user = user;
      req.session.slowCount = 0;
      res.json({ user });
    });
  });

  app.get('/me', (req, res) => {
    if (!req.session.user) return res.status(401).json({ error: 'not logged in' });
    res.json({ user: req.session.user, slowCount: req.session.slowCount || 0 });
  });

  // Work done by /slow in fixed-touch-only lives here, not in the session.
  const slowVisits = client.db().collection('slow_visits');

  app.get('/slow', async (req, res, next) => {
    try {
      if (!req.session.user) return res.status(401).json({ error: 'not logged in' });
      if (hooks.slowLoaded) hooks.slowLoaded(req.sessionID);
      await new Promise((r) => setTimeout(r, slowMs));
      if (variant === 'fixed-recheck') {
        // The copy in req.session was loaded before the timer: is it still alive?
        const current = await new Promise((resolve, reject) =>
          store.get(req.sessionID, (err, s) => (err ? reject(err) : resolve(s))),
        );
        if (!current) return res.status(401).json({ error: 'session ended while the request ran' });
      }
      if (variant === 'fixed-touch-only') {
        await slowVisits.updateOne({ user: req.session.user }, { $inc: { count: 1 } }, { upsert: true });
        return res.json({ user: req.session.user });
      }
      req.session.slowCount = (req.session.slowCount || 0) + 1;
      res.json({ user: req.session.user, slowCount: req.session.slowCount });
    } catch (err) {
      next(err);
    }
  });

  app.post('/logout', (req, res, next) => {
    req.session.destroy((err) => {
      if (err) return next(err);
      res.clearCookie(COOKIE_NAME);
      res.json({ loggedOut: true });
    });
  });

  // Errors after the response was sent (a touch of a session another request
  // destroyed: connect-mongo's "Unable to find the session to touch") are
  // kept, not printed: the driver scripts report them.
  const appErrors = [];
  app.use((err, req, res, next) => {
    appErrors.push(err);
    if (res.headersSent) return;
    res.status(500).json({ error: 'internal error' });
  });

  // No close(): connect-mongo's store.close() would close the caller's client.
  return { app, store, storeErrors, appErrors };
}

/** Starts `app` on 127.0.0.1 (port 0 = ephemeral); resolves with {server, baseUrl}. */
function listen(app, port = 0) {
  return new Promise((resolve, reject) => {
    const server = app.listen(port, '127.0.0.1', (err) => {
      if (err) return reject(err);
      const { port: bound } = server.address();
      resolve({ server, baseUrl: `http://127.0.0.1:${bound}` });
    });
    server.on('error', reject);
  });
}

module.exports = { createApp, listen, VARIANTS, COOKIE_NAME, STORE_COLLECTION };

if (require.main === module) {
  (async () => {
    const uri = process.env.MONGODB_URI;
    if (!uri) throw new Error('MONGODB_URI is not set');
    const client = new MongoClient(uri);
    await client.connect();
    const { app } = createApp({
      client,
      variant: process.env.VARIANT || 'plain',
      slowMs: Number(process.env.SLOW_MS || 300),
    });
    const { server, baseUrl } = await listen(app, Number(process.env.PORT || 0));
    process.stdout.write(JSON.stringify({ listening: baseUrl.replace('http://', '') }) + '\n');
    const shutdown = async () => {
      server.close();
      await client.close();
      process.exit(0);
    };
    process.on('SIGTERM', shutdown);
    process.on('SIGINT', shutdown);
  })().catch((err) => {
    process.stderr.write(`${err.stack}\n`);
    process.exit(1);
  });
}
