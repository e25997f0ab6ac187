'use strict';
// Which major of the official Node.js driver a scenario runs with.
//
// package.json installs both current majors side by side: 7 as `mongodb`
// (what `npm install mongodb` gives a user today, and what Mongoose 9 and
// connect-mongo 6 resolve), 6 as the npm alias `mongodb6`. Every scenario and
// express-app.js take the driver from here, never `require('mongodb')`
// directly, so one environment variable picks the major for the whole
// process: INTEROP_NODE_DRIVER=6 or 7 (default 7). run.sh sets it from the
// scenario's name suffix (`bad-global-session@node6`), and the harness
// appends the same suffix to the name the scenario prints, so a report always
// says which driver produced it.
//
// It must not guess: an unknown major, or a package whose version does not
// match the major asked for (a broken install), is a fatal error.

const PACKAGES = { 6: 'mongodb6', 7: 'mongodb' };
const DEFAULT_MAJOR = '7';

const major = process.env.INTEROP_NODE_DRIVER || DEFAULT_MAJOR;
const packageName = PACKAGES[major];
if (!packageName) {
  throw new Error(`INTEROP_NODE_DRIVER=${major}: no such driver major here (one of ${Object.keys(PACKAGES).join(', ')})`);
}
const mongodb = require(packageName);
const version = require(`${packageName}/package.json`).version;
if (version.split('.')[0] !== major) {
  throw new Error(`INTEROP_NODE_DRIVER=${major} loaded ${packageName}@${version}: run npm ci in interop/node`);
}

module.exports = {
  mongodb,
  MongoClient: mongodb.MongoClient,
  major,
  version,
  /** The suffix of scenario names: `node6`, `node7`. */
  tag: `node${major}`,
  PACKAGES,
};
