"""A forked child re-initializes the PKCS#11 module before its first use (issue 3).

Python's ssl module (Debian's /usr/bin/python3, on the system libssl) in one process: TLS
handshakes over memory BIOs with keyx preferred and backends = pkcs11, so both key shares are made
on the token. The parent handshakes, forks, the child handshakes, then the parent again. OpenSC's
pkcs11-spy sits between keyx and SoftHSM and records the calls: the child must call C_Initialize
itself (PKCS#11 forbids using the parent's sessions), the parent only once.
"""

import re

import kxutil
from fixture_softhsm import SPY

SCRIPT = r"""
import os, ssl, sys

crt, key = sys.argv[1], sys.argv[2]

def handshake():
    srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv.load_cert_chain(crt, key)
    srv.set_ecdh_curve("prime256v1")
    cli = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cli.check_hostname, cli.verify_mode = False, ssl.CERT_NONE
    cli.set_ecdh_curve("prime256v1")
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s = srv.wrap_bio(bios[0], bios[1], server_side=True)
    c = cli.wrap_bio(bios[2], bios[3], server_hostname="localhost")
    done = [False, False]
    for _ in range(20):
        for i, (obj, inb, outb) in enumerate(((c, bios[2], bios[3]), (s, bios[0], bios[1]))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            data = outb.read()
            (bios[0] if obj is c else bios[2]).write(data)
        if all(done):
            return c.version()
    raise SystemExit("handshake did not finish")

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
    (tmp / "fork.py").write_text(SCRIPT)
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
