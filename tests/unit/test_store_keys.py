"""How the etcd store reads a key (leaseagent.store.etcd._kv): one string object for
every read of the same key while any is alive, so a changed lease's key from the watch
is the object the lease book already holds (docs/benchmarks.md, "Soak (no leak)")."""

from __future__ import annotations

from etcd3aio.proto.etcd.api.mvccpb import kv_pb2

from leaseagent.store.etcd import _as_bytes, _kv

KEY = "/coreos.com/network/subnets/10.5.3.0-24"


def _message(key: bytes, revision: int) -> kv_pb2.KeyValue:
    # Parsed from the wire, as a listing's and a watch event's are: separate messages.
    sent = kv_pb2.KeyValue(key=key, value=b"{}", create_revision=2, mod_revision=revision)
    return kv_pb2.KeyValue.FromString(sent.SerializeToString())


def test_the_same_key_read_twice_is_one_object() -> None:
    listed = _kv(_message(KEY.encode(), 2))
    watched = _kv(_message(KEY.encode(), 7))
    assert listed.key == watched.key == KEY
    assert listed.key is watched.key
    assert watched.mod_revision == 7


def test_a_key_that_is_not_utf8_reads_back_as_its_bytes() -> None:
    raw = b"/coreos.com/network/subnets/\xff-24"
    first, second = _kv(_message(raw, 2)), _kv(_message(raw, 3))
    assert first.key is second.key and _as_bytes(first.key) == raw
