import { before, after, describe, test } from 'node:test';
import shop from '../shop.cjs';

let client;
before(() => { client = shop.connect('e2e-node-test-orders'); });
after(() => client.close());

describe('orders', () => {
  test('creates one', () => shop.insertAndRead(client, 'orders'));
  test('creates in a session', () => shop.inOneSession(client, 'orders'));
  test('lists them', async () => { await client.db('shop').collection('orders').find().toArray(); });
});
