from conftest import in_one_session, insert_and_read


class TestOrders:
    def test_creates_one(self, client):
        insert_and_read(client, "orders")

    def test_creates_in_a_session(self, client):
        in_one_session(client, "orders")

    def test_lists_them(self, client):
        list(client.shop.orders.find())
