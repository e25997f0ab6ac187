"""What the end-to-end suite's tests do with MongoDB (integrations/test.sh,
the `e2e-pytest*` cases): real work with PyMongo through `sessionguard exec`,
correct in every test but one, which shares one session across threads at
the same time (PyMongo documents sessions as not thread-safe). The emulator
answers late (--latency), so those operations are surely in flight together.
"""
import os
import threading

import pytest
from pymongo import MongoClient


@pytest.fixture(scope="module")
def client():
    uri = os.environ.get("MONGODB_URI")
    if not uri:
        raise RuntimeError("MONGODB_URI is not set: run under sessionguard exec")
    client = MongoClient(uri, appname="e2e-pytest", maxPoolSize=8)
    yield client
    client.close()


def insert_and_read(client, what):
    coll = client.shop[what]
    coll.insert_one({"what": what})
    return coll.find_one({"what": what})


def in_one_session(client, what):
    with client.start_session() as session:
        coll = client.shop[what]
        coll.insert_one({"what": what}, session=session)
        coll.count_documents({"what": what}, session=session)


def share_one_session(client, what):
    """THE BUG: one session used by three threads at once."""
    coll = client.shop[what]
    shared = client.start_session()
    barrier = threading.Barrier(3)

    def work(i):
        barrier.wait()
        coll.insert_one({"what": what, "i": i}, session=shared)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    shared.end_session()
