"""TLS with `backends = tpm`: the server's ECDHE key share is a transient object in
swtpm, made with CreateLoaded, used by one ECDH_ZGen and flushed, with no resource manager in
front of swtpm (three object slots). The client runs on the default provider alone: swtpm serves
one connection at a time, and the client is the independent side of every handshake.
"""

import re

import pytest

import kxutil
from fixture_swtpm import tpm_cnf
from kxutil import base_env, run
from test_tls import GROUPS, check_handshake

CASES = [(v, g) for v in ("TLSv1.3", "TLSv1.2") for g in ("P-256", "P-384")] + [("TLSv1.3", "P-521")]


def client_args(version, group):
    if version == "TLSv1.3":
        return ["-tls1_3", "-groups", group]
    return ["-tls1_2", "-groups", group, "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"]


def tpm_events(log, pid):
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    return [e for e in events if e["pid"] == pid]


@pytest.mark.parametrize("version,group", CASES)
def test_handshake_with_tpm_keys(swtpm, s_server, s_client, certs, tmp, version, group):
    log = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"audit-log": log}))
    crt, key = certs["rsa"]
    srv = s_server(["-cert", crt, "-key", key], env)
    cli = s_client(srv.port, client_args(version, group), base_env())
    check_handshake(cli, srv.wait(), version, group)

    mine = tpm_events(log, srv.pid)
    assert not [e for e in mine if not e["ok"]], f"failed events: {mine}"
    keygens = [e for e in mine if e["event"] == "keygen"]
    derives = [e for e in mine if e["event"] == "derive"]
    frees = [e for e in mine if e["event"] == "free" and e.get("ephemeral")]
    assert len(keygens) == 1 and len(derives) == 1, f"server events: {mine}"
    for e in keygens + derives:
        assert e["backend"] == "tpm" and e["alg"] == "EC" and e["group"] == group, e
    assert keygens[0]["ephemeral"] is True and derives[0]["key"] == keygens[0]["key"], mine
    assert [e["key"] for e in frees] == [keygens[0]["key"]], f"key share not freed: {mine}"


# A client on the default provider making n handshakes in one process (Python's ssl module),
# printing "ok N" or the first failures.
CLIENT = r"""
import socket, ssl, sys
port, n, version, group = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
curve = {"P-256": "prime256v1", "P-384": "secp384r1"}[group]
ok, errors = 0, []
for i in range(n):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    v = ssl.TLSVersion.TLSv1_3 if version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ctx.maximum_version = v
    ctx.set_ecdh_curve(curve)
    if version == "TLSv1.2":
        ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            with ctx.wrap_socket(s, server_hostname="localhost") as t:
                assert t.version() == version, t.version()
                ok += 1
    except Exception as e:
        errors.append(f"{i}: {e!r}")
        if len(errors) > 5:
            break
print("ok", ok)
for e in errors:
    print("error", e)
"""


@pytest.mark.parametrize("version,group", [("TLSv1.3", "P-256"), ("TLSv1.2", "P-384")])
def test_200_handshakes_do_not_exhaust_slots(swtpm, s_server, certs, tmp, version, group):
    """tpm2-openssl fails with TPM_RC_OBJECT_MEMORY (0x902) here without a resource manager."""
    n = 200
    log = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"audit-log": log}))
    crt, key = certs["rsa"]
    srv = s_server(["-naccept", str(n), "-groups", group, "-cert", crt, "-key", key], env)
    script = tmp / "client.py"
    script.write_text(CLIENT)
    r = run(["/usr/bin/python3", script, srv.port, n, version, group], env=base_env(),
            timeout=max(kxutil.TIMEOUT, 300))
    server_out = srv.wait(timeout=60)
    assert r.rc == 0 and f"ok {n}" in r.out, f"handshakes failed:\n{r!r}\n--- s_server ---\n{server_out}"
    # The client closes without close_notify (s_server logs "unexpected eof"): any other error
    # fails the test.
    errors = kxutil.server_errors(server_out)
    assert "0x902" not in server_out and not errors, server_out

    mine = tpm_events(log, srv.pid)
    assert not [e for e in mine if not e["ok"]], "failed events:\n" + "\n".join(str(e) for e in mine if not e["ok"])
    for ev in ("keygen", "derive", "free"):
        hits = [e for e in mine if e["event"] == ev and e.get("ephemeral")]
        assert len(hits) == n, f"{len(hits)} {ev} events for {n} handshakes"
        assert all(e["backend"] == "tpm" and e["group"] == group for e in hits), hits[:3]
    assert len({e["key"] for e in mine if e["event"] == "keygen"}) == n, "a key share was reused"
    # Nothing left behind in the TPM once the server has exited.
    assert not swtpm.tools("tpm2_getcap", "handles-transient").out.strip()


def test_x25519_and_dh_not_served_by_tpm(swtpm, s_server, s_client, certs, tmp):
    """With backends = tpm, keyx makes no X25519/X448/DH key in software: generation fails
    naming the backends, and a client offering only X25519 gets no handshake, while a client
    that also offers P-256 gets P-256 in the TPM."""
    log = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"audit-log": log}))
    for args in (["-algorithm", "X25519"], ["-algorithm", "X448"],
                 ["-algorithm", "DH", "-pkeyopt", "group:ffdhe2048"]):
        r = kxutil.openssl("genpkey", *args, env=env)
        assert r.rc != 0, f"{args} generated without a backend that serves it:\n{r!r}"
        assert "backends = tpm" in r.err, f"error does not name the configured backends:\n{r!r}"
        # and the TLS fix: the Groups line for these backends
        assert f"'Groups = {kxutil.tls_groups('tpm')}'" in r.err and "docs/tls-servers.md" in r.err, r
    r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", env=env)
    # made in the TPM and ephemeral, so genpkey can write neither the key nor a reference to it
    assert r.rc != 0 and "BEGIN" not in r.out and "its private part stays in the tpm backend" in r.err, f"{r!r}"

    crt, key = certs["ec"]
    srv = s_server(["-cert", crt, "-key", key], env)
    cli = s_client(srv.port, ["-tls1_3", "-groups", "X25519"], base_env())
    srv.wait()
    assert cli.rc != 0 and not kxutil.protocol(cli.out), f"X25519-only client got a handshake:\n{cli!r}"
    srv = s_server(["-cert", crt, "-key", key], env)
    cli = s_client(srv.port, ["-tls1_3", "-groups", "X25519:P-256"], base_env())
    server_out = srv.wait()
    check_handshake(cli, server_out, "TLSv1.3", "P-256")
    events = kxutil.read_audit(log)
    made = [e for e in events if e["event"] == "keygen" and e["ok"]]
    assert made and all(e["backend"] == "tpm" and e["alg"] == "EC" for e in made), made
