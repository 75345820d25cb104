"""Threads and fork() on the PKCS#11 backend.

Threads: Python's ssl module runs handshakes in 4 threads at once (it releases the GIL in
do_handshake), all with their key shares on the token through the shared session pool.

Fork: a forked child re-initializes the PKCS#11 module before its first use.

Python's ssl module (Debian's /usr/bin/python3, on the system libssl) in one process: TLS
handshakes over memory BIOs with keyx preferred and backends = pkcs11, so both key shares are made
on the token. The parent handshakes, forks, the child handshakes, then the parent again. OpenSC's
pkcs11-spy sits between keyx and SoftHSM and records the calls: the child must call C_Initialize
itself (PKCS#11 forbids using the parent's sessions), the parent only once.
"""

import re

import kxutil
from fixture_softhsm import SPY

HANDSHAKE = kxutil.MEMORY_HANDSHAKE + r"""
import os, ssl, sys, threading

crt, key = sys.argv[1], sys.argv[2]

def handshake():
    srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv.load_cert_chain(crt, key)
    srv.set_ecdh_curve("prime256v1")
    cli = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cli.check_hostname, cli.verify_mode = False, ssl.CERT_NONE
    cli.set_ecdh_curve("prime256v1")
    return memory_handshake(srv, cli)
"""

FORK = HANDSHAKE + r"""
print("parent", os.getpid(), handshake(), flush=True)
pid = os.fork()
if pid == 0:
    try:
        print("child", os.getpid(), handshake(), flush=True)
        os._exit(0)
    except BaseException as e:
        print("child failed:", e, flush=True)
        os._exit(1)
_, status = os.waitpid(pid, 0)
print("child status", status, flush=True)
print("parent again", handshake(), flush=True)
sys.exit(1 if status else 0)
"""


def test_child_reinitializes_the_module(softhsm, certs, cnf, tmp):
    log, spy_log = tmp / "audit.jsonl", tmp / "spy.log"
    settings = {**softhsm.keyx_settings(), "pkcs11-module": SPY}
    env = softhsm.spy_env(spy_log, OPENSSL_CONF=cnf(keyx={"audit-log": log, **settings}))
    (tmp / "fork.py").write_text(FORK)
    crt, key = certs["ec"]
    r = kxutil.run(["/usr/bin/python3", tmp / "fork.py", crt, key], env=env).ok("fork script")
    pids = {w[0]: int(w[1]) for w in map(str.split, r.out.splitlines()) if len(w) == 3 and w[1].isdigit()}
    assert set(pids) == {"parent", "child"}, r
    assert "parent again TLSv1.3" in r.out, r

    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    for who, pid in pids.items():
        mine = [e for e in events if e["pid"] == pid and e["event"] in ("keygen", "derive") and e["ok"]]
        assert {e["event"] for e in mine} == {"keygen", "derive"}, f"{who}: {mine}"
        assert {e["backend"] for e in mine} == {"pkcs11"}, f"{who}: {mine}"
    # spy numbers calls per process from 0, in each process's own copy of its counter
    inits = re.findall(r"^\d+: C_Initialize$", spy_log.read_text(), re.M)
    assert len(inits) == 2, f"{len(inits)} C_Initialize calls: expected the parent's and the child's"


THREADS = HANDSHAKE + r"""
results = []

def worker():
    for _ in range(25):
        try:
            results.append(handshake())
        except BaseException as e:
            results.append(repr(e))

threads = [threading.Thread(target=worker) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(results), sorted(set(results)))
sys.exit(0 if results == ["TLSv1.3"] * 100 else 1)
"""


def test_handshakes_in_four_threads(softhsm, certs, cnf, tmp):
    log = tmp / "audit.jsonl"
    env = softhsm.env(OPENSSL_CONF=cnf(keyx={"audit-log": log, **softhsm.keyx_settings()}))
    (tmp / "threads.py").write_text(THREADS)
    crt, key = certs["ec"]
    r = kxutil.run(["/usr/bin/python3", tmp / "threads.py", crt, key], env=env, timeout=max(kxutil.TIMEOUT, 120))
    r.ok("100 handshakes in 4 threads")
    events = [e for e in kxutil.read_audit(log) if e["pid"] == r.pid]
    kxutil.check_audit_schema(events)
    for ev in ("keygen", "derive"):
        done = [e for e in events if e["event"] == ev and e["ok"] and e["backend"] == "pkcs11"]
        assert len(done) == 200, f"{len(done)} {ev} events for 100 handshakes (server and client)"
    assert not [e for e in events if not e["ok"]], [e for e in events if not e["ok"]][:3]
