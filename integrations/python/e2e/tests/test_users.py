from conftest import in_one_session, insert_and_read


def test_stores_the_user(client):
    insert_and_read(client, "users")


def test_logs_in(client):
    in_one_session(client, "users")
