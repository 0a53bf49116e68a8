"""etcd auth tokens come and go: the agent authenticates again and goes on.

A real etcd with TLS and auth (tests/security/conftest.py) with --auth-token-ttl 1:
simple tokens unused for a second expire, so every renewal (every 2 s at
--lease-ttl 6) finds its token gone; a restart of etcd loses every token.

- two agents keep renewing across token expiries, a config change (each lists
  the leases again on an expired token) and an etcd restart, with the same lease
  keys and etcd lease ids; a host that joins after the restart is
  seen by both (their watches resumed on new tokens); no lease lost, no ERROR;
- an agent started while etcd is down waits and leases when it is up (as
  without auth), instead of exiting;
- a permission revoked under a running agent (the role no longer reads the
  prefix) when it must list again: it keeps running and its data plane, says so
  once, and lists again once the permission is back;
- the password changed in etcd under a running agent: it goes on while it needs
  no new token (renewals, open watches); at the next authentication (here after
  an etcd restart) one line, exit 2 (a wrong password, as at start).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

from polling import wait_for as _wait_for
from test_tls_auth import agent, one_line_error, put_config

PREFIX = "/coreos.com/network"
TTL = 6  # renewals every 2 s, tokens gone after 1 s


def leases(secure) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """lease key -> etcd lease id."""
    import base64

    out = json.loads(secure.cluster.etcdctl("get", "--prefix", f"{PREFIX}/subnets/", "-w", "json"))
    return {base64.b64decode(kv["key"]).decode(): int(kv.get("lease", 0))
            for kv in out.get("kvs", [])}


def wait_for(what: str, cond: Callable[[], bool], timeout: float) -> float:
    return _wait_for(cond, timeout=timeout, what=what, every=0.1)


def peers(a) -> float | None:  # type: ignore[no-untyped-def]
    assert a.proc is not None and a.proc.alive, a.log()
    return a.metric("leaseagent_peers", 'backend="alloc"')


def set_config(secure, **fields: str) -> None:  # type: ignore[no-untyped-def]
    secure.cluster.etcdctl("put", f"{PREFIX}/config", json.dumps(
        {"Network": "10.6.0.0/16", "Backend": {"Type": "alloc"}, **fields}))


def test_agents_go_on_across_token_expiry_and_an_etcd_restart(short_token_etcd, tmp_path):
    s = short_token_etcd
    set_config(s, SubnetMax="10.6.254.0")
    flags = [*s.tls_flags(), *s.auth_flags()]
    a = agent(s, tmp_path, "a", flags, ttl=TTL)
    b = agent(s, tmp_path, "b", flags, ttl=TTL)
    b.public_ip = "10.200.0.2"
    c = agent(s, tmp_path, "c", flags, ttl=TTL)
    c.public_ip = "10.200.0.3"
    try:
        for x in (a, b):
            x.start(metrics=True)
            x.wait_subnet()
        wait_for("a and b see each other", lambda: peers(a) == peers(b) == 1, 15)
        before = leases(s)
        renewed = {x.name: x.metric("leaseagent_lease_renewals_total") or 0 for x in (a, b)}
        time.sleep(TTL)  # 3 renewals each, every one on an expired token
        # A config change (the range widened: every lease kept) makes each agent list the
        # leases again: a request its expired token no longer covers.
        set_config(s)
        wait_for("the config change applied", lambda: all(x.metric(
            "leaseagent_network_config_changes_total", 'class="re-lease"') == 1
            for x in (a, b)), 10)
        for x in (a, b):
            assert x.proc is not None and x.proc.alive, x.log()
            assert (x.metric("leaseagent_lease_renewals_total") or 0) >= renewed[x.name] + 2
        s.cluster.restart(0)  # every token is gone
        restarted = time.monotonic()
        c.start(metrics=True)
        c.wait_subnet()
        seen = wait_for("the joiner seen by a and b", lambda: peers(a) == peers(b) == 2, 20)
        renewed = {x.name: x.metric("leaseagent_lease_renewals_total") or 0 for x in (a, b)}
        wait_for("a and b renewing after the restart", lambda: all(
            (x.metric("leaseagent_lease_renewals_total") or 0) > renewed[x.name]
            for x in (a, b)), 10)
        after = leases(s)
        for key, lease in before.items():
            assert after.get(key) == lease, f"{key}: lease {lease:x} now {after.get(key)}"
        for x in (a, b, c):
            log = x.log()
            assert x.proc is not None and x.proc.alive, log
            assert " ERROR " not in log and "Traceback" not in log, log
            assert not re.search(r"lease on \S+ lost|SUBNET LOST", log), log
            assert s.password not in log
    finally:
        for x in (a, b, c):
            x.stop()
    print(f"\nauth tokens: 2 agents across {TTL}s of 1 s tokens and an etcd restart: same "
          f"{len(before)} lease keys and ids, joiner seen {seen:.2f}s after it leased "
          f"({time.monotonic() - restarted:.1f}s after the restart), no ERROR")


def test_an_agent_started_while_etcd_is_down_waits_for_it(short_token_etcd, tmp_path):
    s = short_token_etcd
    put_config(s)
    s.cluster.stop(0)
    a = agent(s, tmp_path, "a", [*s.tls_flags(), *s.auth_flags()], ttl=TTL)
    try:
        a.start()
        time.sleep(3)
        assert a.proc is not None and a.proc.alive, a.log()
        s.cluster.restart(0)
        a.wait_subnet()
        a.wait_log("ready:")
    finally:
        a.stop()
    assert "Traceback" not in a.log()
    print("\nauth tokens: an agent started while etcd (auth on) was down waited and leased")


def test_a_password_changed_under_a_running_agent_is_one_line_and_exit_2(
        short_token_etcd, tmp_path):
    s = short_token_etcd
    put_config(s)
    a = agent(s, tmp_path, "a", [*s.tls_flags(), *s.auth_flags()], ttl=TTL)
    try:
        a.start()
        a.wait_subnet()
        new = "changed-" + s.password[:8]
        s.cluster.etcdctl("user", "passwd", "leaseagent", "--interactive=true",
                          input=f"{new}\n{new}\n".encode())
        # Renewals and open watches need no new token (etcd checks a watch at its start):
        # a restart ends the streams, and the agent needs one to list again.
        s.cluster.restart(0)
        code = a.wait_exit(TTL + 10)
    finally:
        a.stop()
    assert code == 2, a.log()
    errors = [line for line in a.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in a.log(), a.log()
    line = one_line_error("\n".join(errors))
    assert "--etcd-password-file" in line and "wrong user name or password" in line, line
    assert s.password not in a.log() and new not in a.log()
    print(f"\nauth tokens: password changed under a running agent: exit 2: "
          f"{line.split(' ', 2)[-1]}")


def test_a_permission_revoked_under_a_running_agent_stops_nothing(short_token_etcd, tmp_path):
    s = short_token_etcd
    put_config(s)
    a = agent(s, tmp_path, "a", [*s.tls_flags(), *s.auth_flags()], ttl=TTL)
    try:
        a.start(metrics=True)
        a.wait_subnet()
        a.wait_log("ready:")
        before = leases(s)
        ctl = s.cluster.etcdctl
        ctl("role", "revoke-permission", "leaseagent", "--prefix=true", f"{PREFIX}/")
        s.cluster.restart(0)  # the open watches end: the agent must list again, and may not
        wait_for("the refusal reported", lambda: "permission denied" in a.log(), 20)
        time.sleep(3)
        assert a.proc is not None and a.proc.alive, a.log()
        assert a.metric("leaseagent_etcd_up") == 1  # it answers: a refusal is no outage
        ctl("role", "grant-permission", "leaseagent", "--prefix=true", "readwrite",
            f"{PREFIX}/")
        back = wait_for("listing again", lambda: "etcd lists the leases again" in a.log(), 20)
        assert a.proc.alive and leases(s) == before, a.log()
        log = a.log()
        assert "Traceback" not in log and " ERROR " not in log, log
        assert log.count("permission denied") == 1, log
    finally:
        a.stop()
    print(f"\nauth: a permission revoked under a running agent: it kept running (logged once), "
          f"listed again {back:.2f}s after the grant, same lease")
