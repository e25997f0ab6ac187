import { describe, test } from 'vitest';
import { barrier, probe } from '../probe.cjs';

describe('checkout', () => {
  const bothStarted = barrier(2);
  test.concurrent('reserves stock', async () => {
    await probe('vitest-checkout-stock');
    await bothStarted();
  });
  test.concurrent('charges the card', async () => {
    await probe('vitest-checkout-card');
    await bothStarted();
  });
  test('sends the receipt', () => probe('vitest-checkout-receipt'));
});
