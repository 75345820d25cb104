"""TLS through keyx: s_server and s_client on 127.0.0.1 with an openssl.cnf preferring keyx.

Each handshake must complete with the group asked for, and the audit log must show the server's
ephemeral key generated and derived by keyx (keygen + derive from the server's pid).
"""

import re

import pytest

import kxutil
from kxutil import base_env

# group -> (audit alg, pattern of the peer key share s_client describes: kxutil.temp_key)
GROUPS = {
    "P-256": ("EC", r"ECDH, (prime256v1|P-256), 256 bits"),
    "P-384": ("EC", r"ECDH, (secp384r1|P-384), 384 bits"),
    "P-521": ("EC", r"ECDH, (secp521r1|P-521), 521 bits"),
    "X25519": ("X25519", r"X25519, 253 bits"),
    "X448": ("X448", r"X448, 448 bits"),
    "ffdhe2048": ("DH", r"DH, 2048 bits"),
}
# OpenSSL 3.5's hybrid ML-KEM groups -> (audit alg, audit group) of their classical half, which
# the default provider's hybrid makes and uses through keyx. s_client shows no peer temp key for
# them, it names the group ("Negotiated TLS1.3 group").
HYBRIDS = {
    "X25519MLKEM768": ("X25519", "X25519"),
    "SecP256r1MLKEM768": ("EC", "P-256"),
    "SecP384r1MLKEM1024": ("EC", "P-384"),
}


def group_alg(group):
    return GROUPS[group][0] if group in GROUPS else HYBRIDS[group][0]


def client_args(version, group):
    if version == "TLSv1.3":
        return ["-tls1_3", "-groups", group]
    if group == "ffdhe2048":
        # OpenSSL 3.0 negotiates no FFDHE group in TLS 1.2: DHE with the server's -dhparam
        return ["-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256"]
    return ["-tls1_2", "-groups", group, "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"]


def handshake(s_server, s_client, certs, env, version, group, server_extra=()):
    crt, key = certs["rsa"]
    srv = s_server(["-cert", crt, "-key", key, "-dhparam", certs["dhparam"], *server_extra], env)
    cli = s_client(srv.port, client_args(version, group), env)
    server_out = srv.wait()
    return srv, cli, server_out


def check_handshake(cli, server_out, version, group):
    pattern = GROUPS[group][1] if group in GROUPS else None
    assert cli.rc == 0, f"s_client failed:\n{cli!r}\n--- s_server ---\n{server_out}"
    assert kxutil.protocol(cli.out) == version, f"negotiated {kxutil.protocol(cli.out)!r}, not {version}:\n{cli!r}"
    if pattern is None:
        assert kxutil.negotiated_group(cli.out) == group, f"not {group}:\n{cli!r}"
    else:
        tk = kxutil.temp_key(cli.out)
        assert re.fullmatch(pattern, tk), f"peer temp key {tk!r} is not {group}:\n{cli!r}"
    for out, who in ((cli.err, "s_client"), (server_out, "s_server")):
        assert "re-entry" not in out, f"{who} reports re-entry:\n{out}"
        assert not re.search(r":error:", out), f"{who} reported an error:\n{out}\n{cli!r}"


def check_server_audit(log, pid, group, backend="software", audit_group=None):
    """audit_group: the group name keyx logs when it is not `group` (TLS 1.2 DHE without
    -dhparam runs on libssl's 2048-bit RFC 3526 group, which keyx names modp_2048)."""
    alg = group_alg(group)
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    mine = [e for e in events if e["pid"] == pid]
    keygens = [e for e in mine if e["event"] == "keygen" and e["ok"]]
    derives = [e for e in mine if e["event"] == "derive" and e["ok"]]
    hint = ""
    if not keygens and any(e["event"] == "load" and e.get("alg") == alg for e in mine):
        hint = ("\nThe server's key was made outside keyx and imported for the derive (event 'load'): "
                "OpenSSL 3.0 generates a TLS 1.2 DHE key from the -dhparam template in the "
                "template's own provider (EVP_PKEY_CTX_new_from_pkey ignores the property query), "
                "and the PEM parameters were decoded into the default provider.")
    assert keygens, f"no keygen by keyx from the server (pid {pid}){hint}\nall events:\n" + "\n".join(map(str, events))
    assert derives, f"no derive by keyx from the server (pid {pid}); all events:\n" + "\n".join(map(str, events))
    for e in keygens[-1:] + derives[-1:]:
        assert e.get("alg") == alg, f"server {e['event']} with alg {e.get('alg')}, expected {alg}: {e}"
        want = audit_group or (HYBRIDS[group][1] if group in HYBRIDS else group)
        assert e.get("group") == want, f"server {e['event']} with group {e.get('group')}, expected {want}: {e}"
        assert e.get("backend") == backend, e
    assert keygens[-1].get("ephemeral") is True, f"server key share not marked ephemeral: {keygens[-1]}"
    assert derives[-1].get("key") == keygens[-1].get("key"), "the server derived with another key than it generated"
    assert not [e for e in mine if not e["ok"]], "failed events from the server:\n" + "\n".join(
        str(e) for e in mine if not e["ok"]
    )
    return events


# TLS 1.2 with ffdhe2048 means DHE with the server's -dhparam file: see the test after this one.
CASES = [(v, g) for v in ("TLSv1.3", "TLSv1.2") for g in GROUPS if (v, g) != ("TLSv1.2", "ffdhe2048")]
# the hybrids exist from OpenSSL 3.5 on, in TLS 1.3 only
CASES += [("TLSv1.3", g) for g in HYBRIDS if kxutil.openssl_version() >= (3, 5)]


@pytest.mark.parametrize("version,group", CASES)
def test_handshake_through_keyx(s_server, s_client, certs, cnf, tmp, version, group):
    log = tmp / "audit.jsonl"
    # OpenSSL 3.5's default server list has X25519MLKEM768 only: the other hybrids need the
    # Groups line of docs/tls-servers.md
    env = base_env(OPENSSL_CONF=cnf(keyx={"audit-log": log}, groups="auto" if group in HYBRIDS else None))
    srv, cli, server_out = handshake(s_server, s_client, certs, env, version, group)
    check_handshake(cli, server_out, version, group)
    events = check_server_audit(log, srv.pid, group)
    # The client prefers keyx too: its key share is keyx's as well.
    client = [e for e in events if e["pid"] == cli.pid and e["event"] in ("keygen", "derive") and e["ok"]]
    assert {e["event"] for e in client} == {"keygen", "derive"}, f"client events: {client}"
    assert all(e.get("alg") == group_alg(group) for e in client), f"client events: {client}"


def test_tls12_ffdhe2048_from_dhparam_file(s_server, s_client, certs, cnf, tmp):
    """TLS 1.2 DHE on ffdhe2048 parameters the server reads from a file (-dhparam).

    The client builds the server's parameters through keyx and its ffdhe2048 key share is
    generated and used by keyx. On the server, OpenSSL 3.0 decodes the PEM parameters into the
    default provider and generates the DHE key with the template's own keymgmt, ignoring the
    property query: keyx receives the finished key for the derive (event 'load'). This is the
    known limit in docs/guide.md, until keyx decodes DH parameter files itself. Should OpenSSL or
    keyx change, this test fails and check_server_audit applies here as for every other group.
    """
    log = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=cnf(keyx={"audit-log": log}))
    srv, cli, server_out = handshake(s_server, s_client, certs, env, "TLSv1.2", "ffdhe2048")
    check_handshake(cli, server_out, "TLSv1.2", "ffdhe2048")
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    client = [e for e in events if e["pid"] == cli.pid and e["ok"] and e.get("alg") == "DH"]
    for ev in ("keygen", "derive"):
        hits = [e for e in client if e["event"] == ev]
        assert hits and all(e.get("group") == "ffdhe2048" for e in hits), f"client {ev}: {client}"
    server = [e for e in events if e["pid"] == srv.pid and e["ok"] and e.get("alg") == "DH"]
    assert [e["event"] for e in server if e["event"] != "free"] == ["load", "derive"], server
    assert server[0]["key"] == server[1]["key"] and server[1].get("group") == "ffdhe2048", server


@pytest.mark.parametrize("group", ["X25519", "P-256", "ffdhe2048"])
def test_handshake_with_ephemeral_max_uses_1(s_server, s_client, certs, cnf, tmp, group):
    """A TLS key share is derived once: ephemeral-max-uses = 1 must not break handshakes."""
    log = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=cnf(keyx={"audit-log": log, "ephemeral-max-uses": 1}))
    srv, cli, server_out = handshake(s_server, s_client, certs, env, "TLSv1.3", group)
    check_handshake(cli, server_out, "TLSv1.3", group)
    check_server_audit(log, srv.pid, group)


def test_default_group_goes_through_keyx(s_server, s_client, certs, cnf, tmp):
    """No -groups anywhere: the group OpenSSL picks by default (3.0: X25519; 3.5: the hybrid
    X25519MLKEM768, whose X25519 half is keyx's) is served by keyx."""
    log = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=cnf(keyx={"audit-log": log}))
    crt, key = certs["ec"]
    srv = s_server(["-cert", crt, "-key", key], env)
    cli = s_client(srv.port, [], env)
    server_out = srv.wait()
    group = "X25519" if kxutil.openssl_version() < (3, 5) else "X25519MLKEM768"
    check_handshake(cli, server_out, "TLSv1.3", group)
    check_server_audit(log, srv.pid, group)


def test_tls12_dhe_with_automatic_parameters(s_server, s_client, certs, cnf, tmp):
    """TLS 1.2 DHE without -dhparam: libssl builds the parameters itself (through keyx's
    keymgmt, by name), so the server's key is generated and derived by keyx."""
    log = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=cnf(keyx={"audit-log": log}))
    crt, key = certs["rsa"]
    srv = s_server(["-cert", crt, "-key", key], env)
    cli = s_client(srv.port, ["-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256"], env)
    server_out = srv.wait()
    check_handshake(cli, server_out, "TLSv1.2", "ffdhe2048")  # "DH, 2048 bits"
    mine = [e for e in kxutil.read_audit(log) if e["pid"] == srv.pid and e["ok"]]
    assert {"keygen", "derive"} <= {e["event"] for e in mine if e.get("alg") == "DH"}, mine
