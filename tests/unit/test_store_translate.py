"""The etcd adapter's error translation: transport hiccups are outages (retried), not
errors that stop the agent."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from leaseagent.errors import StoreError, StoreTimeout, StoreUnavailable
from leaseagent.store.etcd import _translate


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


def test_another_etcd_error_still_stops() -> None:
    err = _translate(_rpc_error(grpc.StatusCode.UNKNOWN, "etcdserver: mvcc: database space "
                                "exceeded"), "put")
    assert isinstance(err, StoreError) and not isinstance(err, StoreUnavailable)
