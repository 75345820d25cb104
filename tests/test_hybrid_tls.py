"""OpenSSL 3.5's hybrid ML-KEM TLS groups with their classical half in keyx's backends.

SecP256r1MLKEM768 and SecP384r1MLKEM1024 with the ECDH half in the TPM and on the token, and
X25519MLKEM768 in software, as server and as client. The hybrids are the default provider's: its
hybrid key management fetches the classical half with the library's default properties, so with
`default_properties = ?provider=keyx` that half is keyx's (made, exported as a public key only,
and used in the configured backend), while the ML-KEM half runs in the default provider. The
audit log shows where each classical half was made and used; the peers load only the default
provider, so a completed handshake means both sides derived the same hybrid secret. Invalid key
shares get an alert, never a crash and never a software key share.

Not on OpenSSL 3.0, which has no ML-KEM: the module says so and is skipped there.
"""

import os
import socket
import struct

import pytest

import kxutil
from fixture_nginx import pki  # noqa: F401  (fixture)
from fixture_swtpm import tpm_cnf
from kxutil import TIMEOUT, base_env, run

pytestmark = pytest.mark.skipif(kxutil.openssl_version() < (3, 5),
                                reason="hybrid ML-KEM TLS groups exist from OpenSSL 3.5 on (3.0 has no ML-KEM)")

# group -> (TLS id, classical audit alg and group, classical share bytes, ML-KEM client share bytes,
# classical part first on the wire)
HYBRIDS = {
    "SecP256r1MLKEM768": (0x11EB, "EC", "P-256", 65, 1184, True),
    "SecP384r1MLKEM1024": (0x11ED, "EC", "P-384", 97, 1568, True),
    "X25519MLKEM768": (0x11EC, "X25519", "X25519", 32, 1184, False),
}


def keyx_env(backend, tmp, swtpm, softhsm):
    """(env, audit log) preferring keyx with backend and the Groups line of docs/tls-servers.md."""
    log = tmp / "audit.jsonl"
    if backend == "tpm":
        return base_env(OPENSSL_CONF=tpm_cnf(tmp / "tpm.cnf", swtpm, keyx={"audit-log": log})), log
    keyx = {"audit-log": log, "backends": backend}
    if backend == "pkcs11":
        keyx.update(softhsm.keyx_settings(**{"audit-log": log}))
        return softhsm.env(OPENSSL_CONF=kxutil.write_cnf(tmp / "p11.cnf", keyx=keyx, groups="auto")), log
    return base_env(OPENSSL_CONF=kxutil.write_cnf(tmp / "sw.cnf", keyx=keyx, groups="auto")), log


def classical_events(log, pid):
    return [e for e in kxutil.read_audit(log) if e["pid"] == pid and e.get("ephemeral") is True
            and e["event"] in ("keygen", "derive")]


def check_classical_half(log, pid, backend, group):
    """One classical key made and used in backend by pid, no other key exchange there and no
    failed operation. (A hardware key's private part cannot be exported at all: keyx refuses,
    and the hybrid would fail. A completed handshake shows the hybrid needed its public key only.)"""
    _, alg, cgroup, *_ = HYBRIDS[group]
    failed = [e for e in kxutil.read_audit(log) if e["pid"] == pid and not e["ok"]]
    assert not failed, failed
    events = classical_events(log, pid)
    assert events and all(e["ok"] for e in events), events
    assert {(e["event"], e["backend"], e["alg"], e.get("group")) for e in events} == {
        ("keygen", backend, alg, cgroup), ("derive", backend, alg, cgroup)}, events
    keygen = [e for e in events if e["event"] == "keygen"]
    assert len(keygen) == 1 and {e["key"] for e in events} == {keygen[0]["key"]}, events


CASES = [("tpm", "SecP256r1MLKEM768"), ("tpm", "SecP384r1MLKEM1024"), ("pkcs11", "SecP256r1MLKEM768"),
         ("pkcs11", "SecP384r1MLKEM1024"), ("software", "X25519MLKEM768"), ("software", "SecP256r1MLKEM768")]


@pytest.mark.parametrize("backend,group", CASES)
def test_server_hybrid_with_its_classical_half_in_the_backend(backend, group, swtpm, softhsm, certs, s_server,
                                                              s_client, tmp):
    env, log = keyx_env(backend, tmp, swtpm, softhsm)
    crt, key = certs["ec"]
    srv = s_server(["-cert", crt, "-key", key], env)
    cli = s_client(srv.port, ["-groups", group], base_env())  # the default provider alone
    out = srv.wait()
    assert cli.rc == 0 and kxutil.negotiated_group(cli.out) == group, f"{cli!r}\n--- server ---\n{out}"
    check_classical_half(log, srv.pid, backend, group)


@pytest.mark.parametrize("backend,group", CASES)
def test_client_hybrid_with_its_classical_half_in_the_backend(backend, group, swtpm, softhsm, certs, s_server,
                                                              tmp):
    """keyx's side is the client here; the server loads only the default provider."""
    env, log = keyx_env(backend, tmp, swtpm, softhsm)
    crt, key = certs["ec"]
    srv = s_server(["-cert", crt, "-key", key, "-groups", group], base_env())
    cli = run(["openssl", "s_client", "-connect", f"127.0.0.1:{srv.port}", "-servername", "localhost",
               "-groups", group], env=env, input="")
    out = srv.wait()
    assert cli.rc == 0 and kxutil.negotiated_group(cli.out) == group, f"{cli!r}\n--- server ---\n{out}"
    check_classical_half(log, cli.pid, backend, group)


def test_go_client_gets_x25519mlkem768_from_the_software_backend(softhsm, swtpm, pki, go_client, s_server, tmp):
    """Go's crypto/tls in its default settings against a server that accepts only X25519MLKEM768."""
    env, log = keyx_env("software", tmp, swtpm, softhsm)
    crt, key = pki.software_cert("srv")
    srv = s_server(["-cert", crt, "-key", key, "-groups", "X25519MLKEM768"], env)
    r = run([go_client, f"127.0.0.1:{srv.port}", "localhost", pki.crt], env=kxutil.plain_client_env())
    out = srv.wait()
    assert r.rc == 0 and r.out.startswith("ok 0x0304"), f"{r!r}\n--- server ---\n{out}"
    check_classical_half(log, srv.pid, "software", "X25519MLKEM768")


# ---- invalid key shares ------------------------------------------------------------------------


def client_hello(group_id, share):
    """A TLS 1.3 ClientHello offering one group with the given key share (RFC 8446 4.1.2)."""
    def ext(kind, body):
        return struct.pack(">HH", kind, len(body)) + body

    exts = b"".join([
        ext(0x0000, struct.pack(">HBH", 12, 0, 9) + b"localhost"),               # server_name
        ext(0x000A, struct.pack(">HH", 2, group_id)),                            # supported_groups
        ext(0x000D, struct.pack(">HHHH", 6, 0x0403, 0x0804, 0x0401)),            # signature_algorithms
        ext(0x002B, struct.pack(">BH", 2, 0x0304)),                              # supported_versions
        ext(0x0033, struct.pack(">HHH", 4 + len(share), group_id, len(share)) + share),  # key_share
    ])
    body = (struct.pack(">H", 0x0303) + os.urandom(32) + b"\x20" + os.urandom(32)
            + struct.pack(">HH", 2, 0x1301) + b"\x01\x00" + struct.pack(">H", len(exts)) + exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack(">H", len(hs)) + hs


def first_record(port, hello):
    """(content type, first bytes) of the server's answer to hello."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(hello)
        data = b""
        while len(data) < 7:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert len(data) >= 7, f"the server closed without answering: {data!r}"
    return data[0], data[5:7]


def valid_share(group, tmp):
    """A well-formed client share for group from the default provider's keys: the raw public keys
    are the last bytes of their SubjectPublicKeyInfo."""
    _, alg, cgroup, classical, mlkem, classical_first = HYBRIDS[group]
    env = base_env()

    def raw_public(name, *genargs, n):
        key, der = tmp / f"{name}.pem", tmp / f"{name}.der"
        kxutil.openssl("genpkey", *genargs, "-out", key, env=env).ok(name)
        kxutil.openssl("pkey", "-in", key, "-pubout", "-outform", "DER", "-out", der, env=env).ok(name)
        return der.read_bytes()[-n:]

    ec = raw_public("ec", "-algorithm", alg, *(["-pkeyopt", f"group:{cgroup}"] if alg == "EC" else []), n=classical)
    kem = raw_public("kem", "-algorithm", f"ML-KEM-{768 if mlkem == 1184 else 1024}", n=mlkem)
    return ec + kem if classical_first else kem + ec


def bad_shares(group):
    gid, _, _, classical, mlkem, classical_first = HYBRIDS[group]
    size = classical + mlkem

    def compose(ec, kem):
        return ec + kem if classical_first else kem + ec

    kem = os.urandom(mlkem)
    cases = {
        "too short": os.urandom(size - 1),
        "too long": os.urandom(size + 1),
        "ML-KEM part of another size": compose(b"\x04" + os.urandom(classical - 1) if classical_first
                                               else os.urandom(classical), os.urandom(mlkem - 32)),
        "ML-KEM key with coefficients out of range": compose(
            b"\x04" + os.urandom(classical - 1) if classical_first else os.urandom(classical), b"\xff" * mlkem),
    }
    if classical_first:  # an EC point
        cases["point not on the curve"] = compose(b"\x04" + b"\x01" * (classical - 1), kem)
        cases["the identity"] = compose(b"\x00" * classical, kem)
    else:  # X25519: a small-order point (all zero)
        cases["small-order X25519 point"] = compose(b"\x00" * classical, kem)
    return gid, cases


@pytest.mark.parametrize("backend,group", [("tpm", "SecP256r1MLKEM768"), ("pkcs11", "SecP384r1MLKEM1024"),
                                           ("software", "X25519MLKEM768")])
def test_invalid_hybrid_shares_get_an_alert(backend, group, swtpm, softhsm, certs, s_server, tmp):
    env, log = keyx_env(backend, tmp, swtpm, softhsm)
    crt, key = certs["ec"]
    gid, cases = bad_shares(group)
    # the control: the same ClientHello with a well-formed share gets a ServerHello
    srv = s_server(["-cert", crt, "-key", key], env)
    ctype, _ = first_record(srv.port, client_hello(gid, valid_share(group, tmp)))
    srv.wait()  # the client went away: the server frees its key share (a TPM object) and exits
    assert ctype == 22, f"a well-formed {group} share got record type {ctype}, not a ServerHello"
    answers = {}
    for name, share in cases.items():
        srv = s_server(["-cert", crt, "-key", key], env)
        ctype, alert = first_record(srv.port, client_hello(gid, share))
        out = srv.wait()  # exits after its one connection: it did not crash (and no sanitizer report)
        assert srv.proc.returncode >= 0, f"{name}: s_server died of signal {-srv.proc.returncode}:\n{out}"
        answers[name] = (ctype, alert[0], alert[1])
        assert ctype == 21 and alert[0] == 2, f"{name}: answered with record type {ctype} {alert.hex()}, not a fatal alert"
        assert "keyx: internal" not in out, out
    # no key share was made anywhere but in the configured backend, and none in software for hardware
    events = kxutil.read_audit(log) if log.exists() else []
    made = [e for e in events if e["event"] == "keygen" and e.get("ephemeral") is True]
    assert all(e["backend"] == backend for e in made), made
    print(f"{group} in {backend}: alerts {answers}")
