"""TLS with the server's (and client's) ephemeral keys on a SoftHSM2 token.

backends = pkcs11: every handshake's key share is generated and derived on the token, and an
algorithm the token cannot do (X25519: SoftHSM 2.6 has no CKM_EC_MONTGOMERY_KEY_PAIR_GEN) is not
offered at all, never run in software; with backends = pkcs11, software it goes to software.
"""

import re
import subprocess
import time

import pytest

import kxutil
from conftest import pick_port
from test_tls import check_handshake, check_server_audit, client_args

CASES = [("TLSv1.3", "P-256"), ("TLSv1.3", "ffdhe2048"), ("TLSv1.2", "P-256"), ("TLSv1.2", "ffdhe2048")]


def pkcs11_env(softhsm, cnf, log, groups="auto", **settings):
    """The token's environment with the TLS `Groups` line for its backends, as docs/tls-servers.md
    has operators write it (groups=None: without)."""
    return softhsm.env(OPENSSL_CONF=cnf(keyx={"audit-log": log, **softhsm.keyx_settings(**settings)},
                                        groups=groups))


@pytest.mark.parametrize("version,group", CASES)
def test_handshake_on_the_token(softhsm, s_server, s_client, certs, cnf, tmp, version, group):
    log = tmp / "audit.jsonl"
    env = pkcs11_env(softhsm, cnf, log)
    crt, key = certs["rsa"]
    # TLS 1.2 DHE (OpenSSL 3.0 negotiates no ffdhe group there): without -dhparam libssl builds
    # its 2048-bit group through keyx; a -dhparam file would be decoded by the default provider
    # (see test_tls.test_tls12_ffdhe2048_from_dhparam_file)
    srv = s_server(["-cert", crt, "-key", key], env)
    cli = s_client(srv.port, client_args(version, group), env)
    check_handshake(cli, srv.wait(), version, group)
    dhe12 = "modp_2048" if (version, group) == ("TLSv1.2", "ffdhe2048") else None
    events = check_server_audit(log, srv.pid, group, backend="pkcs11", audit_group=dhe12)
    client = [e for e in events if e["pid"] == cli.pid and e["event"] in ("keygen", "derive")]
    assert {e["event"] for e in client} == {"keygen", "derive"}, client
    assert {e.get("backend") for e in client} == {"pkcs11"}, client


def test_x25519_is_not_offered_without_software(softhsm, s_server, s_client, certs, cnf, tmp):
    log = tmp / "audit.jsonl"
    env = pkcs11_env(softhsm, cnf, log)
    crt, key = certs["ec"]
    srv = s_server(["-cert", crt, "-key", key], env)
    cli = s_client(srv.port, ["-tls1_3", "-groups", "X25519"], env)
    srv.stop()
    assert cli.rc != 0, f"an X25519 handshake happened with backends = pkcs11:\n{cli!r}"
    if kxutil.openssl_version() < (3, 5):
        # 3.0 offers only the groups of keyx's TLS-GROUP list, which has no X25519 here
        assert "group 'X25519' cannot be set" in cli.err, cli
    else:
        # 3.5 knows every provider's groups: keyx refuses the client's key share, naming the fix
        assert "X25519: no backend in 'backends = pkcs11'" in cli.err, cli
        assert f"'Groups = {kxutil.tls_groups('pkcs11')}'" in cli.err, cli
    events = kxutil.read_audit(log) if log.exists() else []
    assert not [e for e in events if e.get("alg") == "X25519" and e["ok"]], events
    assert not [e for e in events if e.get("backend") == "software"], events

    # keyx itself refuses the key with the reason, rather than making it in software
    r = kxutil.openssl("genpkey", "-algorithm", "X25519", env=env)
    assert r.rc != 0 and "not supported by any configured keyx backend" in r.err, r


def test_x25519_goes_to_the_next_backend(softhsm, s_server, s_client, certs, cnf, tmp):
    log = tmp / "audit.jsonl"
    env = pkcs11_env(softhsm, cnf, log, backends="pkcs11, software")
    crt, key = certs["ec"]
    for group, backend in (("X25519", "software"), ("P-256", "pkcs11")):
        srv = s_server(["-cert", crt, "-key", key], env)
        cli = s_client(srv.port, ["-tls1_3", "-groups", group], env)
        check_handshake(cli, srv.wait(), "TLSv1.3", group)
        check_server_audit(log, srv.pid, group, backend=backend)


def test_200_handshakes_leave_no_token_object(softhsm, certs, cnf, tmp):
    """One s_server, 200 TLS 1.3 P-256 handshakes: a keygen and a derive on the token for each,
    every key freed, and the token holds exactly the objects it held before."""
    n = 200
    log = tmp / "audit.jsonl"
    env = pkcs11_env(softhsm, cnf, log)
    before = softhsm.token_objects("keyx-a")
    crt, key = certs["rsa"]
    port = pick_port()
    srv = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", str(n),
                            "-cert", crt, "-key", key, "-groups", "P-256", "-quiet"],
                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=env, text=True, start_new_session=True)
    try:
        client_env = kxutil.base_env()  # the client runs on the default provider
        deadline = time.monotonic() + 10
        ok = 0
        for i in range(n):
            while True:
                r = kxutil.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
                                "-groups", "P-256", "-brief"], env=client_env, input="")
                if r.rc == 0 or i > 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)  # the server may not be listening yet
            assert r.rc == 0, f"handshake {i + 1} failed:\n{r!r}"
            ok += 1
        srv.wait(kxutil.TIMEOUT)
    finally:
        kxutil.kill_group(srv)
        err = srv.stderr.read()
    assert ok == n
    assert not re.search(r":error:", err), err
    events = [e for e in kxutil.read_audit(log) if e["pid"] == srv.pid]
    kxutil.check_audit_schema(events)
    by = {ev: [e for e in events if e["event"] == ev and e["ok"] and e.get("backend") == "pkcs11"]
          for ev in ("keygen", "derive", "free")}
    assert len(by["keygen"]) == n and len(by["derive"]) == n, {k: len(v) for k, v in by.items()}
    assert {e["key"] for e in by["free"]} >= {e["key"] for e in by["keygen"]}, "ephemeral keys not freed"
    assert not [e for e in events if not e["ok"]], [e for e in events if not e["ok"]][:3]
    assert softhsm.token_objects("keyx-a") == before, "handshakes left objects on the token"
