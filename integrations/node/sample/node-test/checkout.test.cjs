// CommonJS, and tests running concurrently in one process.
const test = require('node:test');
const { probe, barrier } = require('../probe.cjs');

test.describe('checkout', { concurrency: true }, () => {
  const bothStarted = barrier(2);
  test.it('reserves stock', async () => {
    await probe('node-checkout-stock');
    await bothStarted();
  });
  test.it('charges the card', async () => {
    await probe('node-checkout-card');
    await bothStarted();
  });
});
test('sends the receipt', () => probe('node-checkout-receipt'));
