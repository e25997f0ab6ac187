// The default import, and subtests (t.test): a subtest runs inside its parent.
import test from 'node:test';
import { probe } from '../probe.cjs';

test('orders', async (t) => {
  await probe('node-orders');
  await t.test('inserts one', () => probe('node-orders-one'));
  await t.test('inserts many', () => probe('node-orders-many'));
});
test('lists orders', () => probe('node-orders-list'));
