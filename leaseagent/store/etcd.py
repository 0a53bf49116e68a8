"""The LeaseStore adapter for etcd v3, over etcd3aio (gRPC).

    etcd3aio / grpc exception                  -> ours
    EtcdConnectionError, EtcdTransientError,
    TimeoutError, AioRpcError UNAVAILABLE/
    DEADLINE_EXCEEDED, INTERNAL of a stream
    reset by a member shutting down, etcd's
    "leader changed", "no leader", "request
    timed out"... whatever the code (its
    proxy sends them as UNKNOWN), a watch
    stream's UsageError or InvalidStateError
    ("RPC already finished": the server or
    its proxy ended it)                        -> StoreUnavailable (retryable)
    "invalid auth token", "revision of auth
    store is old" (a token lost in an etcd
    restart or expired)                        -> authenticate again, send again
                                                  (a watch: resume on the new token)
    "authentication failed" (wrong password)   -> ConfigError (exit 2)
    EtcdUnauthenticatedError,
    EtcdPermissionDeniedError                  -> StoreAuthError
    "requested lease not found"                -> LeaseLost
    anything else from grpc                    -> StoreError

Quirks of etcd3aio 0.3.0 handled here:
- unary calls (txn included) are retried on UNAVAILABLE, so a transaction
  can be applied and then reported failed by the retry: callers of
  `create`/`replace` get the key as it is after the txn (read in the failure
  branch of the same txn) and check whether the winner is in fact them;
- a watch from a compacted revision yields one response with
  compact_revision set (and canceled): we raise Compacted on it;
- its watch helper logs a line per reconnect, leaks a task per dead stream
  and may resume past unsent events: `watch` here drives the raw stream
  itself, resumes from the last event it received + 1, and probes a silent
  stream with a progress request (half-open detection); etcd's gRPC proxy
  drops progress requests, so an unanswered probe on a single endpoint is
  checked with a read on the same connection before the stream is given up,
  and that read also finds a change of the prefix the silent stream did not
  send (a shared watch of the proxy that stopped: Missed, list again).
  A progress report never moves the resume point: etcd before 3.4.25 / 3.5.8
  answers a requested one with its current revision even while the watcher
  still has events to send (etcd-io/etcd#15220; v3.4.23
  etcdserver/api/v3rpc/watch.go:369-375), so a stream lost after such a
  report would resume past them. A stream (first or resumed) with more than
  WATCH_CATCH_UP_REVS revisions to catch up (etcd's `created` answer says its
  revision) is not kept (Behind: list again, once in a row): etcd sends a
  catch-up in responses of at most that many revisions, each with its
  current revision in the header, and its gRPC proxy (3.4.23, and main as of
  this writing: watch_broadcast.go bcast) takes that header as where the
  broadcast has got to and may then move the watcher onto another broadcast
  that is already past the rest (watch_broadcasts.go coalesce): the watcher
  misses every event between (tests/faults/test_watch_resume.py);
- its LeaseKeepalive helper shows a lost lease only through a flag and logs a
  traceback per failed attempt, so `keepalive` here is one request on the
  raw stream, bounded by a timeout; the agent drives the loop. Its
  `keep_alive` stream closes the client's side after the request, and
  etcd's gRPC proxy then ends the stream before it forwards the answer
  (every renewal failed with "context canceled"): ours writes the request
  and keeps its side open until the answer is read;
- gRPC's reconnect backoff (up to 120 s by default) is capped at 1 s, so a
  member that returns after an outage is used again within about a second;
- endpoints are given to gRPC as an `ipv4:` target (round robin over
  members); URLs are parsed here, names resolved to IPv4 addresses, and
  https:// switches TLS on.

A listing is taken in pages (`list_prefix`: a range request with a limit,
each continuing after the last key, all at the first page's revision): gRPC
receives at most 4 MiB in one message, which a large cluster or large lease
values exceed. A page over it is asked for again with fewer keys; a single
value over it is skipped and named (`Listing.oversize`). A watch response over
it cannot be received either: the watch raises TooLarge (not resumed: it would
bring the same response again) and the caller lists again.

Every call has a deadline (`timeout`), so a member that holds the
connection open without answering (SIGSTOP) costs a bounded wait, after
which gRPC's round robin moves on to another member.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

# gRPC's C core otherwise prints its own multi-line reports to stderr (a TLS
# handshake failure, for one); our errors are one line, translated below.
# Read once, when grpc is first imported: hence before the imports.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc
import grpc.aio
from etcd3aio.client import Etcd3Client
from etcd3aio.errors import (
    EtcdConnectionError,
    EtcdError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
)
from etcd3aio.kv import prefix_range_end

from leaseagent.errors import (
    Behind,
    Compacted,
    ConfigError,
    LeaseLost,
    Missed,
    StoreAuthError,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
    TooLarge,
)
from leaseagent.retrying import Backoff
from leaseagent.store.base import CENSUS_KEYS, Census, EventType, KeyValue, Listing, WatchEvent
from leaseagent.store.settings import Endpoint, EtcdSettings, parse_endpoints
from leaseagent.waiting import within

__all__ = ["EtcdSettings", "EtcdStore"]
# Keys per range request of a listing (`list_prefix`): ~200 KB of flannel's lease values.
LIST_PAGE_KEYS = 1000
# A listing whose revision is compacted away between its pages is started again this often.
LIST_RESTARTS = 3
# A member that is back is reconnected to within about a second (see connect()).
RECONNECT_BACKOFF_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# A watch silent this long (at least 2 x the timeout) is asked for a progress report.
WATCH_PROBE_AFTER = 5.0
# A lost watch stream is resumed this many times in a row before the caller must list again.
WATCH_RESUMES = 3
# The most revisions etcd sends a lagging watcher in one response (mvcc watchBatchMaxRevs):
# a resume with more than this to catch up is listed again instead (Behind; module docstring).
WATCH_CATCH_UP_REVS = 1000


def _resolve(endpoint: Endpoint) -> list[str]:
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--etcd-endpoints: cannot resolve {endpoint.host}: {exc}") from None
    return sorted({f"{info[4][0]}:{endpoint.port}" for info in infos})


def _read_file(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror}") from None


# What gRPC reports when the TLS handshake fails on a certificate: not a transient
# outage but a setting to fix, so not retried (the agent stops with the reason).
_SERVER_CERT_REFUSED = ("CERTIFICATE_VERIFY_FAILED", "unable to get local issuer certificate")
_CLIENT_CERT_REFUSED = ("BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "UNKNOWN_CA",
                        "TSI_DATA_CORRUPTED", "CERTIFICATE_UNKNOWN")


def _tls_refused(detail: str, what: str) -> StoreAuthError | None:
    if any(s in detail for s in _SERVER_CERT_REFUSED):
        return StoreAuthError(f"TLS handshake with etcd failed during {what}: the server's "
                              f"certificate does not verify against --etcd-cafile")
    if any(s in detail for s in _CLIENT_CERT_REFUSED):
        return StoreAuthError(f"TLS handshake with etcd failed during {what}: etcd refused our "
                              f"client certificate (check --etcd-certfile and --etcd-keyfile)")
    return None


# What gRPC reports (status INTERNAL) for a stream the server reset as it shut down (etcd
# stopped with SIGTERM, `systemctl restart etcd`), and gRPC core's own "Internal error from
# Core" (seen once on a config watch during a compaction test): an outage or a transport
# hiccup, not an error of ours, so retried like one.
_STREAM_RESET = ("RST_STREAM", "Stream removed", "GOAWAY", "Internal error from Core")
# etcd's own errors of a cluster between two states (an election, a member stopping, a
# request that outlived its leader, overload): UNAVAILABLE from a member, but etcd
# 3.4's gRPC proxy passes them on as UNKNOWN with the same text, so matched by it.
# An agent whose listing met "leader changed" through the proxy stopped (a 5,000-host
# simulation's restart, docs/benchmarks.md); each is an outage to wait out.
_CLUSTER_IN_TRANSITION = ("etcdserver: leader changed", "etcdserver: no leader",
                          "etcdserver: not leader", "etcdserver: server stopped",
                          "etcdserver: request timed out", "etcdserver: unhealthy cluster",
                          "etcdserver: too many requests")


# Go's texts of a request's context that ran out or was canceled at the server (etcd 3.4
# passes them on as UNKNOWN, not DEADLINE_EXCEEDED or CANCELLED): 49 of 5,000 simulated
# agents stopped on "context deadline exceeded" from a lease's replace at a full restart
# straight to the members (docs/benchmarks.md). A timeout and an outage, whatever the code.
_CONTEXT_TIMED_OUT = "context deadline exceeded"
_CONTEXT_CANCELED = "context canceled"


def _in_transition(detail: str) -> bool:
    """etcd said the cluster is between two states (`_CLUSTER_IN_TRANSITION`)."""
    return detail.startswith(_CLUSTER_IN_TRANSITION)


def _translate(exc: BaseException, what: str) -> StoreError | LeaseLost:
    if isinstance(exc, (EtcdUnauthenticatedError, EtcdPermissionDeniedError)):
        return StoreAuthError(f"etcd refused {what}: {exc}")
    tls = _tls_refused(str(exc), what)
    if tls is None and isinstance(exc, grpc.aio.AioRpcError):
        tls = _tls_refused(exc.details() or "", what)
    if tls is not None:
        return tls
    if _wrong_password(exc):
        return StoreAuthError(f"etcd refused {what}: wrong user name or password")
    if isinstance(exc, (EtcdConnectionError, EtcdTransientError)):
        return StoreUnavailable(f"etcd unavailable during {what}: {exc}")
    if isinstance(exc, TimeoutError):
        return StoreTimeout(f"etcd did not answer {what} in time")
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        detail = exc.details() or code.name
        if "lease not found" in detail:
            return LeaseLost(f"etcd: {detail}")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED or _CONTEXT_TIMED_OUT in detail:
            return StoreTimeout(f"etcd unavailable during {what}: {detail}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) or (
                code is grpc.StatusCode.INTERNAL and any(s in detail for s in _STREAM_RESET)) or (
                _in_transition(detail)) or _CONTEXT_CANCELED in detail:
            return StoreUnavailable(f"etcd unavailable during {what}: {detail}")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return StoreAuthError(f"etcd refused {what}: {detail}")
        return StoreError(f"etcd error during {what}: {detail}")
    return StoreError(f"etcd error during {what}: {exc}")


def _details(exc: BaseException) -> str:
    detail = str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        detail += " " + (exc.details() or "")
    return detail


# What etcd says of a token it no longer knows (a simple token lost in a restart or past
# --auth-token-ttl, an expired JWT), of a token older than a change of users or roles,
# and of a request with no token at all: a new token is the cure (etcd's own client
# re-authenticates on the first two).
_TOKEN_PROBLEMS = ("invalid auth token", "revision of auth store is old",
                   "user name is empty")


def _token_problem(exc: BaseException) -> bool:
    detail = _details(exc)
    return any(p in detail for p in _TOKEN_PROBLEMS)


def _wrong_password(exc: BaseException) -> bool:
    return "authentication failed" in _details(exc)


def _rpc_error(exc: BaseException) -> grpc.aio.AioRpcError | None:
    """The gRPC error of a translated error's cause (or the error itself)."""
    for e in (exc, exc.__cause__):
        if isinstance(e, grpc.aio.AioRpcError):
            return e
    return None


def _too_large(exc: BaseException) -> bool:
    """A response over gRPC's receive limit (4 MiB by default). etcd's "too many requests"
    (a member whose applied index lags its commits) comes with the same status,
    RESOURCE_EXHAUSTED: it is an overload to wait out (`_translate`), not a page to cut,
    which would end at one key listed as oversize and a watch re-listed at once."""
    rpc = _rpc_error(exc)
    return (rpc is not None and rpc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            and not _in_transition(rpc.details() or ""))


# What gRPC's aio call raises on a write or read on a stream the server has already
# ended ("RPC already finished": etcd restarted or stopped under it, or its gRPC proxy
# ended it): the stream is gone, and a new one is made like for any lost stream.
_FINISHED_STREAM = (grpc.aio.UsageError, asyncio.InvalidStateError)


def _compacted(exc: BaseException) -> bool:
    return "required revision has been compacted" in _details(exc.__cause__ or exc)


def _past(events: list[WatchEvent], revision: int) -> int:
    """The revision a stream owes next once it sent `events` (a batch in revision order),
    having owed `revision` before."""
    return max(revision, events[-1].revision + 1)


def _as_bytes(data: str | bytes) -> bytes:
    """A key as etcd holds it. Keys are read with surrogateescape (`_kv`): a key that
    is not UTF-8 (anyone may write one) comes back as the same bytes, so it can be
    judged, shown (escaped) and deleted like any other."""
    return data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data


def _key(pb: Any) -> str:
    """A KeyValue message's key, as `_as_bytes` reads it back."""
    return str(pb.key.decode("utf-8", "surrogateescape"))


def _kv(pb: Any) -> KeyValue:
    return KeyValue(
        key=_key(pb),
        value=bytes(pb.value),
        create_revision=pb.create_revision,
        mod_revision=pb.mod_revision,
        version=pb.version,
        lease=pb.lease,
    )


class EtcdStore:
    """LeaseStore over a live etcd cluster. Use `await EtcdStore.connect(settings)`."""

    def __init__(self, client: Etcd3Client, settings: EtcdSettings) -> None:
        self._client = client
        self._settings = settings
        self._timeout = settings.timeout
        self.page = LIST_PAGE_KEYS  # keys per range request of a listing
        self.census_limit = CENSUS_KEYS  # changed keys per census answer
        # (user, password) with auth on; a token is asked for at connect and again whenever
        # etcd refuses it (`_call`); the generation counts the tokens had so far.
        self._credentials: tuple[str, str] | None = None
        self._auth_lock = asyncio.Lock()
        self._auth_generation = 0
        # Told (operation, seconds) after every request, e.g. for a latency histogram.
        self.observer: Callable[[str, float], None] | None = None
        # Told the member id whenever the member answering us changes.
        self.member_id = 0
        self.on_member: Callable[[int], None] | None = None
        self._owns_client = True  # False for a store made by `sharing_channel`
        # One address to connect to (one member, or one proxy): every call on one
        # connection (see `_answers_beside`).
        self._one_target = False
        # Prefixes whose watch raised Behind: their next watch (after the listing) is not
        # held to the catch-up limit (`watch`).
        self._listed_behind: set[str] = set()

    @classmethod
    async def connect(cls, settings: EtcdSettings) -> EtcdStore:
        endpoints = parse_endpoints(settings.endpoints)
        targets: list[str] = []
        for endpoint in endpoints:
            targets.extend(_resolve(endpoint))
        tls: dict[str, bytes | None] = {}
        tls_server_name = None
        if endpoints[0].tls or settings.cafile:
            if settings.cafile is None:
                raise ConfigError("--etcd-cafile is required for https:// endpoints")
            tls["ca_cert"] = _read_file(settings.cafile, "--etcd-cafile")
            if settings.certfile or settings.keyfile:
                if not (settings.certfile and settings.keyfile):
                    raise ConfigError("--etcd-certfile and --etcd-keyfile go together")
                tls["cert_chain"] = _read_file(settings.certfile, "--etcd-certfile")
                tls["cert_key"] = _read_file(settings.keyfile, "--etcd-keyfile")
            tls_server_name = endpoints[0].host
        client = Etcd3Client(
            targets,
            rpc_max_attempts=2,
            tls_server_name=tls_server_name,
            **tls,  # type: ignore[arg-type]
        )
        # gRPC's default reconnect backoff grows to 120 s: after an outage of a few
        # seconds a member that is back stays unused for seconds more. etcd3aio has no
        # parameter for channel options, so they go on its manager before connect().
        client._manager.grpc_options.extend(RECONNECT_BACKOFF_OPTIONS)
        await client.connect()
        store = cls(client, settings)
        store._one_target = len(targets) == 1
        if settings.username:
            if settings.password_file is None:
                await client.close()
                raise ConfigError("--etcd-username needs --etcd-password-file")
            try:
                password = _read_file(settings.password_file, "--etcd-password-file")
            except ConfigError:
                await client.close()
                raise
            store._credentials = (settings.username, password.decode().rstrip("\r\n"))
            try:
                await store._authenticate()
            except StoreUnavailable:
                pass  # etcd is not up yet: the first request it refuses for want of a token
                # authenticates (`_call`), as without auth the agent waits for etcd
            except BaseException:
                await client.close()
                raise
        return store

    @property
    def _kvs(self) -> Any:
        return self._client.kv

    @property
    def _leases(self) -> Any:
        return self._client.lease

    async def _call(self, what: str, make: Callable[[], Awaitable[Any]]) -> Any:
        """`make()`'s request, bounded by the timeout, errors translated; a request refused
        for its auth token (lost in an etcd restart, expired) is sent again once after
        authenticating anew."""
        started = time.perf_counter()
        try:
            for attempt in (1, 2):
                generation = self._auth_generation
                try:
                    result = await within(make(), self._timeout)
                except (EtcdError, grpc.aio.AioRpcError) as exc:
                    if attempt == 2 or not self._token_refused(exc):
                        raise
                    await self._authenticate(generation)
                    continue
                # Every etcd response names the member that served it: which
                # endpoint we are on now, for the operator (a metric).
                member = getattr(getattr(result, "header", None), "member_id", 0)
                if member and member != self.member_id:
                    self.member_id = member
                    if self.on_member is not None:
                        self.on_member(member)
                return result
            raise AssertionError("unreachable")
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            raise _translate(exc, what) from exc
        finally:
            if self.observer is not None:
                self.observer(what.split(" ", 1)[0], time.perf_counter() - started)

    def _token_refused(self, exc: BaseException) -> bool:
        """etcd refused our auth token, not our credentials: simple tokens are lost when
        etcd restarts and expire after --auth-token-ttl unused; JWTs expire. Before the
        first token (etcd was down at connect) any refusal: the request went without one
        (as the client certificate's user, or as nobody)."""
        if self._credentials is None:
            return False
        if self._auth_generation == 0:
            return isinstance(exc, (EtcdUnauthenticatedError, EtcdPermissionDeniedError)) or (
                _token_problem(exc))
        return _token_problem(exc)

    async def _authenticate(self, generation: int | None = None) -> None:
        """Get a token for our user and send it from now on. With `generation`: only if no
        other request has authenticated since that generation (one re-authentication for
        the requests refused together). A wrong password is a ConfigError (exit 2)."""
        assert self._credentials is not None
        name, password = self._credentials
        async with self._auth_lock:
            if generation is not None and generation != self._auth_generation:
                return
            try:
                auth: Any = self._client.auth
                auth.set_token(None)  # etcd refuses Authenticate with a stale token too
                resp = await within(auth.authenticate(name, password), self._timeout)
            except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
                error = _translate(exc, f"authentication as {name!r}")
                if _wrong_password(exc):
                    raise ConfigError(f"--etcd-password-file: {error}") from None
                raise error from None
            self._client.set_token(resp.token)
            self._auth_generation += 1

    async def member_endpoints(self) -> dict[int, str]:
        """Member id -> its first client URL, from the cluster's member list."""
        cluster: Any = self._client.cluster
        resp = await self._call("members", lambda: cluster.member_list(timeout=self._timeout))
        return {int(m.ID): (list(m.clientURLs) or [m.name])[0] for m in resp.members}

    async def get(self, key: str) -> KeyValue | None:
        resp = await self._call(f"get {key}", lambda: self._kvs.get(_as_bytes(key), timeout=self._timeout))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def count(self, prefix: str, *, revision: int = 0) -> tuple[int, int]:
        """How many keys under `prefix` now, or at `revision`. A count at a revision is
        read serializable: the history is the same on every member (one that has not
        applied it yet refuses), and etcd's gRPC proxy then answers hosts asking at the
        same revision from its cache (a count now is not: its cache would be stale)."""
        start, end = _as_bytes(prefix), _as_bytes(prefix_range_end(prefix))
        try:
            resp = await self._call(f"count {prefix}", partial(
                self._kvs.get, start, end, revision=revision, count_only=True,
                serializable=revision > 0, timeout=self._timeout))
        except StoreError as exc:
            if _compacted(exc):
                raise Compacted(0) from exc  # a range error does not say the compact revision
            raise
        return int(resp.count), int(revision or resp.header.revision)

    def _changed_keys(self, start: bytes, end: bytes, *, since: int, revision: int,
                      limit: int, serializable: bool, max_attempts: int | None = None
                      ) -> Awaitable[Any]:
        """The range [start, end) at `revision`, keys only, filtered by etcd to the keys
        whose mod revision is `since` or later (`min_mod_revision`, which etcd3aio's `get`
        does not take: a Range of our own)."""
        from etcd3aio._protobuf import RangeRequest

        kvs: Any = self._kvs
        request = RangeRequest(key=start, range_end=end, revision=revision,
                               serializable=serializable, keys_only=True, limit=limit,
                               min_mod_revision=since)
        return kvs._rpc(kvs._stub.Range, request, operation="KV.Range", timeout=self._timeout,
                        max_attempts=max_attempts)

    async def census(self, prefix: str, *, changed_after: int, revision: int = 0) -> Census:
        """Ranges at `revision`, keys only, filtered by etcd to the keys whose mod revision
        is after `changed_after` (`min_mod_revision`: etcd filters before it applies the
        limit, and counts every key of the range, filtered or not: `applyKV.Range`). At a
        revision read serializable, like `count`, so the gRPC proxy caches it; more than
        `census_limit` changed keys: the rest in further ranges after the last, at the
        first one's revision."""
        start, end = _as_bytes(prefix), _as_bytes(prefix_range_end(prefix))
        count, changed = -1, dict[str, int]()
        while True:
            try:
                resp = await self._call(f"count {prefix}", partial(
                    self._changed_keys, start, end, since=changed_after + 1,
                    revision=revision, limit=self.census_limit, serializable=revision > 0))
            except StoreError as exc:
                if _compacted(exc):
                    raise Compacted(0) from exc
                raise
            if count < 0:
                count, revision = int(resp.count), revision or int(resp.header.revision)
            changed.update((_key(kv), int(kv.mod_revision)) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return Census(count, changed, revision)
            start = bytes(resp.kvs[-1].key) + b"\0"

    async def list_prefix(self, prefix: str) -> Listing:
        """The prefix in pages of at most `self.page` keys, all read at the revision of the
        first page (one consistent view, as one range request would give): a listing of
        any size stays under gRPC's 4 MiB receive limit. A page over the limit (large
        values) is asked for again with half as many keys, down to one; a single key over
        it is listed in `oversize` (its metadata only). The history of the first page's
        revision compacted away meanwhile: listed again from the start."""
        for _ in range(LIST_RESTARTS):
            try:
                return await self._list_pages(prefix)
            except StoreError as exc:
                if not _compacted(exc):
                    raise
        return await self._list_pages(prefix)

    async def _list_pages(self, prefix: str) -> Listing:
        end = _as_bytes(prefix_range_end(prefix))
        start, revision = _as_bytes(prefix), 0
        items: list[KeyValue] = []
        oversize: list[KeyValue] = []
        limit = self.page
        while True:
            try:
                resp = await self._call(f"list {prefix}", partial(
                    self._kvs.get, start, end, revision=revision, limit=limit,
                    timeout=self._timeout))
            except StoreError as exc:
                if not _too_large(exc):
                    raise
                if limit > 1:
                    limit = max(1, limit // 2)
                    continue
                resp = await self._call(f"list {prefix}", partial(
                    self._kvs.get, start, end, revision=revision, limit=1, keys_only=True,
                    timeout=self._timeout))
                oversize.extend(_kv(kv) for kv in resp.kvs)
            else:
                items.extend(_kv(kv) for kv in resp.kvs)
                limit = min(self.page, limit * 2)
            if not revision:
                revision = int(resp.header.revision)
            if not resp.more or not resp.kvs:
                return Listing(items=items, revision=revision, oversize=oversize)
            start = bytes(resp.kvs[-1].key) + b"\0"  # the next key after the last one

    async def put(self, key: str, value: bytes) -> None:
        await self._call(f"put {key}", lambda: self._kvs.put(_as_bytes(key), value, timeout=self._timeout))

    async def _txn(self, what: str, compare: Any, key: str, value: bytes, lease: int
                   ) -> tuple[bool, KeyValue | None]:
        kv = self._kvs
        resp = await self._call(
            what,
            lambda: kv.txn(
                [compare],
                [kv.txn_op_put(_as_bytes(key), value, lease=lease), kv.txn_op_get(_as_bytes(key))],
                [kv.txn_op_get(key)],
                timeout=self._timeout,
            ),
        )
        ranges = [r.response_range for r in resp.responses if r.HasField("response_range")]
        current = _kv(ranges[-1].kvs[0]) if ranges and ranges[-1].kvs else None
        return bool(resp.succeeded), current

    def _absent(self, key: str, guard: str | None) -> Any:
        """A compare that holds when `key` (or, with `guard`, every key under it) does
        not exist: create_revision == 0 over the range (an empty range compares as 0)."""
        from etcd3aio._protobuf import Compare

        if guard is None:
            return self._kvs.txn_compare_create_revision(key, 0)
        return Compare(result=Compare.EQUAL, target=Compare.CREATE, key=_as_bytes(guard),
                       range_end=_as_bytes(prefix_range_end(guard)), create_revision=0)

    async def create(self, key: str, value: bytes, *, lease: int, guard: str | None = None
                     ) -> tuple[bool, KeyValue | None]:
        return await self._txn(f"create {key}", self._absent(key, guard), key, value, lease)

    async def create_first(
        self, keys: Sequence[str], value: bytes, *, lease: int,
        guards: Sequence[str] | None = None,
    ) -> KeyValue | None:
        """One txn: guard, then a chain of nested txns "if k_i is absent put it, else next".

        The guard (no candidate carries our lease yet) makes a txn that etcd3aio
        retried after it had been applied fall to the failure branch, which reads
        the candidates back, instead of creating a second key (nested txns and
        LEASE compares: etcd 3.3 and newer).
        """
        from etcd3aio._protobuf import Compare, RequestOp, TxnRequest

        if not keys:
            return None
        kv = self._kvs
        chain: TxnRequest | None = None
        prefixes: Sequence[str | None] = guards or [None] * len(keys)
        for key, prefix in reversed(list(zip(keys, prefixes, strict=True))):
            chain = TxnRequest(
                compare=[self._absent(key, prefix)],
                success=[kv.txn_op_put(_as_bytes(key), value, lease=lease), kv.txn_op_get(_as_bytes(key))],
                failure=[RequestOp(request_txn=chain)] if chain is not None else [],
            )
        assert chain is not None
        guard = [Compare(result=Compare.NOT_EQUAL, target=Compare.LEASE, key=_as_bytes(key),
                         lease=lease) for key in keys] if lease else []
        resp = await self._call(
            f"allocate {keys[0]}",
            lambda: kv.txn(guard, [RequestOp(request_txn=chain)], [kv.txn_op_get(key) for key in keys],
                   timeout=self._timeout),
        )
        if not resp.succeeded:
            for op in resp.responses:
                for found in op.response_range.kvs:
                    if found.lease == lease:
                        return _kv(found)
            return None
        level = resp.responses[0].response_txn
        while True:
            if level.succeeded:
                got = level.responses[1].response_range.kvs
                return _kv(got[0]) if got else None
            if not level.responses:
                return None
            level = level.responses[0].response_txn

    async def replace(
        self, key: str, value: bytes, *, mod_revision: int, lease: int
    ) -> tuple[bool, KeyValue | None]:
        from etcd3aio._protobuf import Compare

        compare = Compare(result=Compare.EQUAL, target=Compare.MOD, key=_as_bytes(key),
                          mod_revision=mod_revision)
        return await self._txn(f"replace {key}", compare, key, value, lease)

    async def move(
        self, key: str, *, mod_revision: int, new_key: str, value: bytes, lease: int
    ) -> tuple[bool, KeyValue | None]:
        from etcd3aio._protobuf import Compare

        kv = self._kvs
        compare = [Compare(result=Compare.EQUAL, target=Compare.MOD, key=_as_bytes(key),
                           mod_revision=mod_revision),
                   kv.txn_compare_create_revision(new_key, 0)]
        resp = await self._call(
            f"move {key}",
            lambda: kv.txn(compare,
                   [kv.txn_op_delete(_as_bytes(key)), kv.txn_op_put(_as_bytes(new_key), value, lease=lease),
                    kv.txn_op_get(new_key)],
                   [kv.txn_op_get(new_key)], timeout=self._timeout),
        )
        ranges = [r.response_range for r in resp.responses if r.HasField("response_range")]
        current = _kv(ranges[-1].kvs[0]) if ranges and ranges[-1].kvs else None
        return bool(resp.succeeded), current

    async def delete(self, key: str, *, mod_revision: int | None = None) -> bool:
        kv = self._kvs
        if mod_revision is None:
            resp = await self._call(f"delete {key}", lambda: kv.delete(_as_bytes(key), timeout=self._timeout))
            return bool(resp.deleted)
        from etcd3aio._protobuf import Compare

        compare = Compare(result=Compare.EQUAL, target=Compare.MOD, key=_as_bytes(key),
                          mod_revision=mod_revision)
        resp = await self._call(
            f"delete {key}",
            lambda: kv.txn([compare], [kv.txn_op_delete(_as_bytes(key))], [], timeout=self._timeout),
        )
        return bool(resp.succeeded and resp.responses[0].response_delete_range.deleted)

    async def grant(self, ttl: int) -> tuple[int, int]:
        resp = await self._call("grant", lambda: self._leases.grant(ttl, timeout=self._timeout))
        return int(resp.ID), int(resp.TTL)

    async def keepalive(self, lease_id: int) -> int:
        from etcd3aio._protobuf import LeaseKeepAliveRequest

        async def once() -> int:
            # Our side of the stream stays open until the answer is read: etcd's gRPC
            # proxy ends a stream whose client closed its side, before it forwards the
            # answer ("context canceled"), which etcd3aio's keep_alive (a request
            # iterator of one request) did at every renewal.
            service: Any = self._leases
            call = service._stub.LeaseKeepAlive(metadata=service._metadata or None)
            try:
                await call.write(LeaseKeepAliveRequest(ID=lease_id))
                resp = await call.read()
                return 0 if resp is grpc.aio.EOF else int(resp.TTL)
            except _FINISHED_STREAM as exc:
                raise StoreUnavailable(f"etcd ended the keepalive stream of lease "
                                       f"{lease_id:x}: {exc}") from exc
            finally:
                call.cancel()

        return int(await self._call(f"keepalive lease {lease_id:x}", once))

    async def time_to_live(self, lease_id: int) -> int:
        resp = await self._call(
            f"time-to-live lease {lease_id:x}",
            lambda: self._leases.time_to_live(lease_id, timeout=self._timeout),
        )
        return int(resp.TTL)

    async def revoke(self, lease_id: int) -> None:
        try:
            await self._call(f"revoke lease {lease_id:x}",
                             lambda: self._leases.revoke(lease_id, timeout=self._timeout))
        except LeaseLost:
            return

    async def compact(self, revision: int) -> None:
        await self._call("compact", lambda: self._kvs.compact(revision, timeout=self._timeout))

    async def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Event batches from start_revision on; a lost stream is resumed where it stopped.

        etcd3aio's helper is not used: it logs a line per reconnect, leaks its
        request-iterator task every time a stream dies, and resumes from the
        header revision of a `created` response (which can skip events). Here
        the stream is resumed from the last event's revision + 1 up to
        WATCH_RESUMES times in a row, then StoreUnavailable tells the caller to
        list again; Compacted when the history is gone; Behind when a stream
        has more than WATCH_CATCH_UP_REVS revisions to catch up (module docstring),
        unless it is the first after a listing that Behind asked for; Missed when a
        silent stream on one endpoint is past a change it did not send
        (`_answers_beside`).
        """
        next_revision = start_revision
        backoff = Backoff()
        # The first stream after a listing that Behind asked for is not held to the limit:
        # a consumer that takes that long to apply a listing would list again for ever.
        guard = prefix not in self._listed_behind
        self._listed_behind.discard(prefix)
        while True:
            try:
                async for events in self._watch_stream(prefix, next_revision, guard=guard):
                    backoff.reset()
                    next_revision = _past(events, next_revision)
                    yield events
            except StoreUnavailable:
                if backoff.failures >= WATCH_RESUMES:
                    raise
                await backoff.sleep()
            except Behind:
                self._listed_behind.add(prefix)
                raise
            guard = True

    async def _watch_stream(self, prefix: str, start_revision: int, *, guard: bool
                            ) -> AsyncIterator[list[WatchEvent]]:
        """One stream: the events of each response that has some.

        `guard`: Behind if etcd's `created` answer says more than
        WATCH_CATCH_UP_REVS revisions from start_revision on are due.
        A stream silent for WATCH_PROBE_AFTER seconds (at least twice the
        timeout) is asked for a progress report; no answer within the timeout
        (a member paused, or the connection half-open) raises StoreUnavailable
        instead of waiting for gRPC keepalive to notice, unless the one endpoint
        answers a read on the same connection (`_answers_beside`: a proxy); when that
        read finds a change the stream has not sent, and the stream still sends nothing
        for one more timeout, Missed.
        """
        from etcd3aio.proto.etcd.api.etcdserverpb import rpc_pb2

        pb: Any = rpc_pb2  # generated code: no stubs for the watch messages

        service: Any = self._client.watch
        generation = self._auth_generation
        call: Any = service._stub.Watch(metadata=service._metadata or None)
        read: asyncio.Future[Any] | None = None
        probe_after = max(WATCH_PROBE_AFTER, 2 * self._timeout)
        try:
            await within(call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(
                key=_as_bytes(prefix), range_end=_as_bytes(prefix_range_end(prefix)),
                start_revision=start_revision))), self._timeout)
            probing = False
            # Where the stream has got to (the next revision it owes us), and the store's
            # revision up to which a check beside it found nothing it failed to send.
            after, checked = start_revision, 0
            while True:
                if read is None:
                    read = asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({read}, timeout=self._timeout if probing else probe_after)
                if not done:
                    if probing:
                        probing = False
                        beside = await self._answers_beside(prefix, after, checked)
                        if beside is None:
                            raise StoreUnavailable(
                                f"etcd did not answer on the watch of {prefix} within "
                                f"{self._timeout:g}s (member paused or connection half-open)")
                        checked, missed = beside
                        if missed is not None and not (await asyncio.wait(
                                {read}, timeout=self._timeout))[0]:
                            raise Missed(
                                f"the watch of {prefix} is silent past a change it did not "
                                f"send ({missed.key} at revision {missed.mod_revision}; "
                                f"the stream is at {after}): listing again")
                        continue  # a proxy that ignores progress requests, answering beside
                    await within(
                        call.write(pb.WatchRequest(progress_request=pb.WatchProgressRequest())),
                        self._timeout)
                    probing = True
                    continue
                resp, read, probing = read.result(), None, False
                if resp is grpc.aio.EOF:
                    raise StoreUnavailable(f"etcd ended the watch stream of {prefix}")
                if resp.compact_revision > 0:
                    raise Compacted(int(resp.compact_revision))
                if (guard and resp.created
                        and resp.header.revision - start_revision >= WATCH_CATCH_UP_REVS):
                    raise Behind(f"the watch of {prefix} would start "
                                 f"{resp.header.revision - start_revision + 1} revisions behind "
                                 f"etcd: listing again")
                if resp.canceled:
                    if self._credentials is not None and any(
                            p in resp.cancel_reason for p in _TOKEN_PROBLEMS):
                        # Our token is gone (etcd restarted, or it expired): a new one,
                        # and the caller resumes the stream with it.
                        await self._authenticate(generation)
                    raise StoreUnavailable(f"etcd canceled the watch: {resp.cancel_reason}")
                events = []
                for ev in resp.events:
                    if ev.type == 0:
                        kv = _kv(ev.kv)
                        events.append(WatchEvent(EventType.PUT, kv.key, kv.mod_revision, kv))
                    else:  # the key and revision only (a mass expiry is thousands)
                        events.append(WatchEvent(EventType.DELETE, _key(ev.kv),
                                                 ev.kv.mod_revision))
                if events:  # not `created` nor a progress report: where etcd is, not what it sent
                    after = _past(events, after)
                    yield events
        except _FINISHED_STREAM as exc:  # the watch request, the progress probe, a read
            raise StoreUnavailable(f"etcd ended the watch stream of {prefix}: {exc}") from exc
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            if _too_large(exc):
                raise TooLarge(f"a watch response on {prefix} was over gRPC's receive "
                                 f"limit (a value over 4 MiB): listing again") from exc
            raise _translate(exc, f"watch {prefix}") from exc
        finally:
            if read is not None:
                read.cancel()
            call.cancel()

    async def _answers_beside(self, prefix: str, after: int, checked: int
                              ) -> tuple[int, KeyValue | None] | None:
        """Whether the server that left a watch's progress request unanswered answers
        reads on the same connection, and if so whether the watch owes a change.

        etcd's gRPC proxy does not implement progress requests (it drops them;
        etcd-io/etcd#19710), so a silent watch through it would be taken for half-open
        and made again every 3 x timeout, each time a new watcher at the proxy and a
        permission-check Range at the members. With one endpoint the reads go on the
        watch's own connection, so an answer shows the connection and the server alive;
        with several, round robin may send them to another member than the watch's (a
        paused one): no answer is trusted then (None).

        An answer is (the store's revision checked up to, a key of the prefix changed at
        or after `after`, or None). A stream can be silent past a change while the server
        answers reads (a proxy's shared watch that lost it: docs/reliability.md), so
        silence is checked against the store. A serializable count of the range says a
        revision: the proxy answers it from its cache, which drops the entry when a write
        through it touches the range, so the revision is past every change of the range
        written through that proxy (a count at a member: its own revision). Only when
        that moved past both `after` and `checked` is the range read at that revision,
        keys only, for one key changed since `after` (`min_mod_revision` makes etcd read
        every key of the range, so a quiet cluster never pays it). Not found this way,
        and left to the lease count check: a deleted key, and a change written through
        another proxy or a member while the cached count stands. (A linearizable count
        would see those too: measured at 1,000 quiet hosts, 68 Ranges a second at the
        members, +3.7 % of a core.)"""
        if not self._one_target:
            return None
        start, end = _as_bytes(prefix), _as_bytes(prefix_range_end(prefix))
        try:
            resp = await within(self._kvs.get(start, end, serializable=True, count_only=True,
                                              limit=1, timeout=self._timeout, max_attempts=1),
                                self._timeout)
            revision = int(resp.header.revision)
            if revision < max(after, checked + 1):
                return max(checked, revision), None
            resp = await within(self._changed_keys(
                start, end, since=after, revision=revision, limit=1, serializable=False,
                max_attempts=1), self._timeout)
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError):
            return None
        return revision, (_kv(resp.kvs[0]) if resp.kvs else None)

    def sharing_channel(self) -> EtcdStore:
        """Another store on this one's gRPC channel: its own calls, streams and watches,
        one connection per member under them (HTTP/2 streams). Closing it leaves the
        channel to this store. Without auth only (the token is the channel's). For
        simulating thousands of hosts in one process (bench.cluster)."""
        if self._credentials is not None:
            raise ConfigError("a store sharing a channel cannot authenticate on its own")
        store = EtcdStore(self._client, self._settings)
        store._owns_client = False
        store._one_target = self._one_target
        return store

    async def close(self) -> None:
        if self._owns_client:
            await self._client.close()
