import { beforeAll, afterAll, describe, test } from 'vitest';
import shop from '../shop.cjs';

let client;
beforeAll(() => { client = shop.connect('e2e-vitest-users'); });
afterAll(() => client.close());

describe('users', () => {
  describe('sign up', () => {
    test('stores the user', () => shop.insertAndRead(client, 'users'));
  });
  test('logs in', () => shop.inOneSession(client, 'users'));
});
