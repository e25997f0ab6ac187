import pytest
from probe import probe


def test_signs_up():
    probe("py-users-signup")


# A test's fixtures are set up and torn down inside its marks.
@pytest.fixture
def session(request):
    probe(f"hook:{request.node.nodeid}")
    yield
    probe(f"hook:{request.node.nodeid}")


def test_logs_in(session):
    probe("py-users-login")


def test_logs_out(session):
    probe("py-users-logout")
