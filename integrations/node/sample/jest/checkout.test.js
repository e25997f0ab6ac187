const { probe, barrier } = require('../probe.cjs');

describe('checkout', () => {
  const bothStarted = barrier(2);
  test.concurrent('reserves stock', async () => {
    await probe('jest-checkout-stock');
    await bothStarted();
  });
  test.concurrent('charges the card', async () => {
    await probe('jest-checkout-card');
    await bothStarted();
  });
  test('sends the receipt', () => probe('jest-checkout-receipt'));
});
