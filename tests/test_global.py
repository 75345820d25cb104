"""keyx preferred for everything (default_properties = ?provider=keyx): ordinary work still works.

keyx registers EC, X25519, X448, DH and RSA key management, so key generation, PEM encoding,
certificates and signatures all pass through keyx's keys while the signature itself runs in the
default provider. Nothing may recurse (keyx's software backend uses its own library context):
every command completes within its timeout, and no re-entry error appears.
"""

import pytest

import kxutil
from kxutil import base_env, openssl


def no_recursion(*results):
    for r in results:
        text = (r.out if isinstance(r.out, str) else "") + r.err
        assert "re-entry" not in text and "recursion" not in text.lower(), f"re-entry reported:\n{r!r}"


@pytest.fixture
def pref(cnf, tmp):
    log = tmp / "audit.jsonl"
    return base_env(OPENSSL_CONF=cnf(keyx={"audit-log": log})), log


@pytest.mark.parametrize("keyalg", ["EC", "RSA"])
def test_keygen_cert_sign_verify_with_keyx_preferred(pref, tmp, keyalg):
    env, log = pref
    key, pub, crt = tmp / "key.pem", tmp / "pub.pem", tmp / "cert.pem"
    data, sig = tmp / "data.txt", tmp / "sig.bin"
    data.write_text("keyx signs nothing itself, but every key passes through it\n")
    args = (["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"] if keyalg == "EC"
            else ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])

    gen = openssl("genpkey", *args, "-out", key, env=env)
    gen.ok("genpkey with keyx preferred")
    assert "PRIVATE KEY" in key.read_text()
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    keygen = [e for e in events if e["pid"] == gen.pid and e["event"] == "keygen" and e["ok"]]
    assert keygen and keygen[0].get("alg") == keyalg, f"genpkey did not generate in keyx: {events}"
    if keyalg == "EC":
        assert keygen[0].get("group") == "P-256", keygen

    steps = [
        openssl("pkey", "-in", key, "-pubout", "-out", pub, env=env),
        openssl("req", "-x509", "-new", "-key", key, "-subj", "/CN=localhost", "-days", "1", "-out", crt, env=env),
        openssl("dgst", "-sha256", "-sign", key, "-out", sig, data, env=env),
    ]
    for r in steps:
        r.ok(" ".join(r.cmd[:2]))
    ver = openssl("dgst", "-sha256", "-verify", pub, "-signature", sig, data, env=env)
    ver.ok("dgst -verify")
    assert "Verified OK" in ver.out, ver
    no_recursion(gen, *steps, ver)

    # An independent check with the default provider alone.
    plain = base_env()
    v = openssl("dgst", "-sha256", "-verify", pub, "-signature", sig, data, env=plain)
    assert "Verified OK" in v.out, f"the default provider rejects the signature:\n{v!r}"
    openssl("verify", "-CAfile", crt, crt, env=plain).ok("certificate does not verify")


def test_server_with_ecdsa_certificate_made_under_keyx(pref, tmp, s_server, s_client):
    env, log = pref
    key, crt = tmp / "key.pem", tmp / "cert.pem"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key, env=env).ok()
    openssl("req", "-x509", "-new", "-key", key, "-subj", "/CN=localhost", "-days", "1", "-out", crt, env=env).ok()

    srv = s_server(["-cert", crt, "-key", key], env)
    cli = s_client(srv.port, ["-CAfile", crt, "-verify_return_error"], env)
    server_out = srv.wait()
    assert cli.rc == 0, f"handshake with the ECDSA server failed:\n{cli!r}\n--- s_server ---\n{server_out}"
    assert kxutil.protocol(cli.out) == "TLSv1.3", cli
    assert "Verify return code: 0 (ok)" in cli.out, f"certificate chain not verified:\n{cli!r}"
    assert kxutil.peer_signature(cli.out) == "ECDSA", f"no ECDSA peer signature reported:\n{cli!r}"
    assert "re-entry" not in cli.err + server_out
    derives = [e for e in kxutil.read_audit(log) if e["pid"] == srv.pid and e["event"] == "derive" and e["ok"]]
    assert derives, "the server's key exchange did not go through keyx"


def test_pkey_and_x509_tools_with_keyx_preferred(pref, tmp):
    """Reading, converting and printing keys made elsewhere, with keyx preferred."""
    env, _ = pref
    plain = base_env()
    made = {}
    for alg, args in (("ec", ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]),
                      ("x25519", ["-algorithm", "X25519"]),
                      ("dh", ["-algorithm", "DH", "-pkeyopt", "group:ffdhe2048"])):
        p = tmp / f"{alg}.pem"
        openssl("genpkey", *args, "-out", p, env=plain).ok()
        made[alg] = p
    for alg, p in made.items():
        r = openssl("pkey", "-in", p, "-text", "-noout", env=env)
        r.ok(f"pkey -text of a {alg} key with keyx preferred")
        d = openssl("pkey", "-in", p, "-outform", "DER", "-out", tmp / f"{alg}.der", env=env)
        d.ok(f"pkey -outform DER of a {alg} key with keyx preferred")
        plain_der = openssl("pkey", "-in", p, "-outform", "DER", env=plain, text=False).ok().out
        assert (tmp / f"{alg}.der").read_bytes() == plain_der, f"{alg}: re-encoding through keyx changed the key"
        no_recursion(r, d)
