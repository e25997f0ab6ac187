import { describe, test } from 'vitest';
import { probe } from '../probe.cjs';

describe('orders', () => {
  describe('create', () => {
    test('inserts one', () => probe('vitest-orders-one'));
    test('inserts many', () => probe('vitest-orders-many'));
  });
  test('lists them', () => probe('vitest-orders-list'));
});
