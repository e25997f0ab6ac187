from probe import probe

# pytest runs one test at a time in a process: no concurrent case.


def test_reserves_stock():
    probe("py-checkout-stock")


def test_charges_the_card():
    probe("py-checkout-card")


def test_sends_the_receipt():
    probe("py-checkout-receipt")
