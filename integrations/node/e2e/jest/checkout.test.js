const shop = require('../shop.cjs');

let client;
beforeAll(() => { client = shop.connect('e2e-jest-checkout'); });
afterAll(() => client.close());

describe('checkout', () => {
  test('adds an item', () => shop.insertAndRead(client, 'carts'));
  test('reserves stock concurrently', () => shop.shareOneSession(client, 'stock'));
  test('pays', () => shop.inOneSession(client, 'payments'));
});
