from conftest import in_one_session, insert_and_read, share_one_session


def test_adds_an_item(client):
    insert_and_read(client, "carts")


def test_reserves_stock_concurrently(client):
    share_one_session(client, "stock")


def test_pays(client):
    in_one_session(client, "payments")
