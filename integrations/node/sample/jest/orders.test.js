const { probe } = require('../probe.cjs');

describe('orders', () => {
  describe('create', () => {
    test('inserts one', () => probe('jest-orders-one'));
    test('inserts many', () => probe('jest-orders-many'));
  });
  test('lists them', () => probe('jest-orders-list'));
});
