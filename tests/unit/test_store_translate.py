"""The etcd adapter's error translation: transport hiccups are outages (retried), not
errors that stop the agent."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from leaseagent.errors import StoreError, StoreTimeout, StoreUnavailable
from leaseagent.store.etcd import EtcdStore, _too_large, _translate
from leaseagent.store.settings import EtcdSettings


def _rpc_error(code: grpc.StatusCode, details: str) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(), details=details)


@pytest.mark.parametrize("details", ["Internal error from Core", "Received RST_STREAM with error code 2",
                                     "Stream removed", "GOAWAY received"])
def test_an_internal_transport_error_is_an_outage(details: str) -> None:
    err = _translate(_rpc_error(grpc.StatusCode.INTERNAL, details), "watch")
    assert isinstance(err, StoreUnavailable)


def test_another_internal_error_is_not_retried_as_an_outage() -> None:
    err = _translate(_rpc_error(grpc.StatusCode.INTERNAL, "something else broke"), "list")
    assert isinstance(err, StoreError) and not isinstance(err, StoreUnavailable)


@pytest.mark.parametrize("exc", [TimeoutError(), _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                            "Deadline Exceeded")])
def test_no_answer_within_the_timeout_is_a_timeout_outage(exc: BaseException) -> None:
    """A StoreTimeout has waited the timeout already: the renewal sends its retry at once
    (leaseagent.retrying); a refused connection is an outage only."""
    assert isinstance(_translate(exc, "keepalive lease 1"), StoreTimeout)
    refused = _translate(_rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused"), "get")
    assert isinstance(refused, StoreUnavailable) and not isinstance(refused, StoreTimeout)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN])
@pytest.mark.parametrize("details", ["etcdserver: leader changed", "etcdserver: no leader",
                                     "etcdserver: request timed out, possibly due to previous "
                                     "leader failure", "etcdserver: too many requests"])
def test_a_cluster_between_two_states_is_an_outage_whatever_the_code(
        code: grpc.StatusCode, details: str) -> None:
    """etcd 3.4's gRPC proxy passes a member's "leader changed" on as UNKNOWN: a listing
    that met it stopped an agent in a 5,000-host simulation; it is waited out."""
    err = _translate(_rpc_error(code, details), "list /coreos.com/network/subnets/")
    assert isinstance(err, StoreUnavailable)


@pytest.mark.parametrize(("details", "timed_out"), [("context deadline exceeded", True),
                                                    ("context canceled", False)])
def test_a_request_context_ended_at_the_server_is_an_outage_whatever_the_code(
        details: str, timed_out: bool) -> None:
    """etcd 3.4 passes Go's context errors on as UNKNOWN: at a 5,000-host restart straight
    to the members, 49 agents stopped on "context deadline exceeded" from their lease's
    replace. A timeout (the renewal's retry is sent at once) or an outage."""
    for code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.CANCELLED):
        err = _translate(_rpc_error(code, details), "replace /coreos.com/network/subnets/x")
        assert isinstance(err, StoreUnavailable)
        if code is grpc.StatusCode.UNKNOWN:
            assert isinstance(err, StoreTimeout) is timed_out


def test_another_etcd_error_still_stops() -> None:
    err = _translate(_rpc_error(grpc.StatusCode.UNKNOWN, "etcdserver: mvcc: database space "
                                "exceeded"), "put")
    assert isinstance(err, StoreError) and not isinstance(err, StoreUnavailable)


def _as_raised(exc: BaseException) -> StoreError:
    """`exc` as the adapter raises it: translated, with it as the cause."""
    try:
        raise _translate(exc, "list /coreos.com/network/subnets/") from exc
    except StoreError as translated:
        return translated


def test_a_response_over_the_receive_limit_is_too_large() -> None:
    over = _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      "Received message larger than max (5242880 vs. 4194304)")
    assert _too_large(_as_raised(over))


def test_etcds_overload_has_the_same_code_but_is_an_outage_not_a_size() -> None:
    """etcd's "too many requests" comes as RESOURCE_EXHAUSTED, gRPC's code for a message
    over the receive limit: it is waited out, not answered by cutting a listing's pages
    (which ends at one key listed as oversize) or by re-listing a watch at once."""
    busy = _as_raised(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 "etcdserver: too many requests"))
    assert isinstance(busy, StoreUnavailable)
    assert not _too_large(busy)


class _BusyThenServing:
    """A KV service that answers its first `busy` range requests with etcd's overload
    error, then one page holding every key."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.limits: list[int] = []

    async def get(self, *args: Any, limit: int = 0, **kwargs: Any) -> Any:
        self.limits.append(limit)
        if self.busy:
            self.busy -= 1
            raise _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests")
        kv = SimpleNamespace(key=b"/coreos.com/network/subnets/10.5.1.0-24", value=b"{}",
                             create_revision=2, mod_revision=2, version=1, lease=0)
        return SimpleNamespace(kvs=[kv], more=False, header=SimpleNamespace(revision=2,
                                                                            member_id=0))


async def test_a_listing_that_meets_an_overloaded_etcd_fails_as_an_outage() -> None:
    """Not halved page by page down to one key listed as oversize: the caller's retry
    policy waits the overload out and lists again, whole."""
    kv = _BusyThenServing(busy=1)
    store = EtcdStore(SimpleNamespace(kv=kv), EtcdSettings())  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable):
        await store.list_prefix("/coreos.com/network/subnets/")
    assert kv.limits == [store.page]
    listing = await store.list_prefix("/coreos.com/network/subnets/")
    assert [item.key for item in listing.items] == ["/coreos.com/network/subnets/10.5.1.0-24"]
    assert listing.oversize == []
