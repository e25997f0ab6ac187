import { before, after, describe, test } from 'node:test';
import shop from '../shop.cjs';

let client;
before(() => { client = shop.connect('e2e-node-test-checkout'); });
after(() => client.close());

describe('checkout', () => {
  test('adds an item', () => shop.insertAndRead(client, 'carts'));
  test('reserves stock concurrently', () => shop.shareOneSession(client, 'stock'));
  test('pays', () => shop.inOneSession(client, 'payments'));
});
