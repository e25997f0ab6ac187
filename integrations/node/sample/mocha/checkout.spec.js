const { probe } = require('../probe.cjs');

// Mocha runs one test at a time in a process: no concurrent case.
describe('checkout', () => {
  it('reserves stock', () => probe('mocha-checkout-stock'));
  it('charges the card', () => probe('mocha-checkout-card'));
  it('sends the receipt', () => probe('mocha-checkout-receipt'));
});
