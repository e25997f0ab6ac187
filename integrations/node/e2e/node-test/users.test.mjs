import { before, after, describe, test } from 'node:test';
import shop from '../shop.cjs';

let client;
before(() => { client = shop.connect('e2e-node-test-users'); });
after(() => client.close());

describe('users', () => {
  describe('sign up', () => {
    test('stores the user', () => shop.insertAndRead(client, 'users'));
  });
  test('logs in', () => shop.inOneSession(client, 'users'));
});
