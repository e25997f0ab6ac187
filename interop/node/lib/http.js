'use strict';
// A tiny cookie-keeping HTTP client over node's fetch, for driving the Express app.

const { COOKIE_NAME } = require('../express-app');

class Browser {
  constructor(baseUrl) {
    this.baseUrl = baseUrl;
    this.cookie = null; // "connect.sid=..." as the server set it
  }

  async request(method, path, body) {
    const headers = {};
    if (this.cookie) headers.cookie = this.cookie;
    if (body !== undefined) headers['content-type'] = 'application/json';
    const res = await fetch(this.baseUrl + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    for (const line of res.headers.getSetCookie()) {
      const [pair] = line.split(';');
      const [name, value] = pair.split('=');
      if (name !== COOKIE_NAME) continue;
      // clearCookie sets an empty value with a date in the past.
      this.cookie = value ? pair : null;
    }
    const text = await res.text();
    let json = null;
    try {
      json = JSON.parse(text);
    } catch {
      json = null;
    }
    return { status: res.status, json };
  }

  /** The session id inside the signed cookie ("s:<id>.<signature>"). */
  sessionId() {
    if (!this.cookie) return null;
    const value = decodeURIComponent(this.cookie.slice(COOKIE_NAME.length + 1));
    if (!value.startsWith('s:')) return null;
    return value.slice(2, value.lastIndexOf('.'));
  }
}

module.exports = { Browser };
