const shop = require('../shop.cjs');

let client;
before(() => { client = shop.connect('e2e-mocha-users'); });
after(() => client.close());

describe('users', () => {
  describe('sign up', () => {
    it('stores the user', () => shop.insertAndRead(client, 'users'));
  });
  it('logs in', () => shop.inOneSession(client, 'users'));
});
