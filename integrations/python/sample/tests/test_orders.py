import pytest
from probe import probe


class TestOrders:
    class TestCreate:
        def test_inserts_one(self):
            probe("py-orders-one")

        @pytest.mark.parametrize("count", [2, 3])
        def test_inserts_many(self, count):
            probe(f"py-orders-many-{count}")

    def test_lists_them(self):
        probe("py-orders-list")
