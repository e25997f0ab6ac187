const shop = require('../shop.cjs');

let client;
beforeAll(() => { client = shop.connect('e2e-jest-orders'); });
afterAll(() => client.close());

describe('orders', () => {
  test('creates one', () => shop.insertAndRead(client, 'orders'));
  test('creates in a session', () => shop.inOneSession(client, 'orders'));
  test('lists them', async () => { await client.db('shop').collection('orders').find().toArray(); });
});
