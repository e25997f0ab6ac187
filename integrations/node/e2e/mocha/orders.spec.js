const shop = require('../shop.cjs');

let client;
before(() => { client = shop.connect('e2e-mocha-orders'); });
after(() => client.close());

describe('orders', () => {
  it('creates one', () => shop.insertAndRead(client, 'orders'));
  it('creates in a session', () => shop.inOneSession(client, 'orders'));
  it('lists them', async () => { await client.db('shop').collection('orders').find().toArray(); });
});
