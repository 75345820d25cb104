"""Failover between the tokens listed in pkcs11-token.

Two SoftHSM2 tokens of their own (the session's tokens are left alone); a TLS server with
pkcs11-token = keyx-a keyx-b. Deleting keyx-a while the server runs (softhsm2-util
--delete-token, SoftHSM's token removal) must not stop it: the next handshakes are served by
keyx-b, a `failover` audit event names both tokens, and when no token is left the handshake
fails cleanly, never in software.
"""

import subprocess
import time

import kxutil
from conftest import pick_port
from fixture_softhsm import SoftHSM


def handshake(port):
    return kxutil.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-groups", "P-256",
                       "-brief"], env=kxutil.base_env(), input="")


def test_first_token_removed_mid_run(tmp_path_factory, certs, cnf, tmp):
    hsm = SoftHSM(tmp_path_factory.mktemp("failover")).setup()
    log = tmp / "audit.jsonl"
    env = hsm.env(OPENSSL_CONF=cnf(keyx={"audit-log": log,
                                         **hsm.keyx_settings(tokens=("keyx-a", "keyx-b"))}))
    crt, key = certs["rsa"]
    port = pick_port()
    srv = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "9",
                            "-cert", crt, "-key", key, "-groups", "P-256", "-quiet"],
                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=env, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while (r := handshake(port)).rc != 0 and time.monotonic() < deadline:
            time.sleep(0.1)  # until the server listens
        assert r.rc == 0, r
        for _ in range(2):
            handshake(port).ok("handshake on keyx-a")

        kxutil.run(["softhsm2-util", "--delete-token", "--token", "keyx-a"], env=hsm.tool_env()).ok("remove keyx-a")
        time.sleep(1.2)  # keyx checks a token's presence at most once a second
        for i in range(4):
            handshake(port).ok(f"handshake {i + 1} after keyx-a was removed")

        kxutil.run(["softhsm2-util", "--delete-token", "--token", "keyx-b"], env=hsm.tool_env()).ok("remove keyx-b")
        time.sleep(1.2)
        for _ in range(3):
            r = handshake(port)
            assert r.rc != 0, f"a handshake succeeded with no token left:\n{r!r}"
        srv.wait(kxutil.TIMEOUT)
    finally:
        kxutil.kill_group(srv)
    err = srv.stderr.read()
    assert srv.returncode is not None and srv.returncode >= 0, f"s_server died (rc {srv.returncode}):\n{err}"
    assert "backend unavailable" in err and "keyx-b" in err, f"no clear error once both tokens are gone:\n{err}"

    events = [e for e in kxutil.read_audit(log) if e["pid"] == srv.pid]
    kxutil.check_audit_schema(events)
    failovers = [e for e in events if e["event"] == "failover"]
    assert failovers, events
    first = failovers[0]
    assert first["backend"] == "pkcs11" and "keyx-a" in first["error"] and first.get("next") == "keyx-b", first
    ok = [e for e in events if e["event"] in ("keygen", "derive") and e["ok"]]
    assert len([e for e in ok if e["event"] == "derive"]) == 7, "three handshakes before, four after the removal"
    assert {e["backend"] for e in ok} == {"pkcs11"}, ok
    # the certificate key is a software key (loaded and signing there): no key share ever is
    assert not [e for e in events if e.get("backend") == "software" and e["event"] in ("keygen", "derive")], \
        "fell back to software"
    assert {e["alg"] for e in events if e.get("backend") == "software"} <= {"RSA"}, events
    # failovers come before the handshakes they served: every derive after the first failover
    after = [e for e in ok if e["event"] == "derive" and e["ts"] >= first["ts"]]
    assert len(after) == 4, after
