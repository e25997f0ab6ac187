const shop = require('../shop.cjs');

let client;
before(() => { client = shop.connect('e2e-mocha-checkout'); });
after(() => client.close());

describe('checkout', () => {
  it('adds an item', () => shop.insertAndRead(client, 'carts'));
  it('reserves stock concurrently', () => shop.shareOneSession(client, 'stock'));
  it('pays', () => shop.inOneSession(client, 'payments'));
});
