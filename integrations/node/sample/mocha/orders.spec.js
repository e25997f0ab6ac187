const { probe } = require('../probe.cjs');

describe('orders', () => {
  describe('create', () => {
    it('inserts one', () => probe('mocha-orders-one'));
    it('inserts many', () => probe('mocha-orders-many'));
  });
  it('lists them', () => probe('mocha-orders-list'));
});
