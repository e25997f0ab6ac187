const shop = require('../shop.cjs');

let client;
beforeAll(() => { client = shop.connect('e2e-jest-users'); });
afterAll(() => client.close());

describe('users', () => {
  describe('sign up', () => {
    test('stores the user', () => shop.insertAndRead(client, 'users'));
  });
  test('logs in', () => shop.inOneSession(client, 'users'));
});
