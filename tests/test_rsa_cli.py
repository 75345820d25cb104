"""RSA key wrapping from the command line and through the C driver.

- `openssl pkeyutl -encrypt -pubin` / `-decrypt` with OAEP-SHA256 through keyx, for a software
  PEM key and for a token key (pkcs11-tool --keypairgen on keyx-a) by URI; the other side of
  each exchange is the default provider alone (or the public key pkcs11-tool reads off the token);
- PKCS#1 v1.5 decryption refused with the clear error, on both backends;
- RSASVE KEM round trips (keyx-test-wrap kem) per backend, and a decrypt context reused for two
  different ciphertexts;
- RSA key generation on the token (2048, 3072) with the private key not exportable;
- a TLS 1.2 RSA-key-exchange handshake (AES128-GCM-SHA256) with keyx preferred: libssl's
  constant-time TLS padding, served for the software key.
"""

import re

import pytest

import kxutil
from test_rsa_wycheproof import leak_checked, wrap_cmd

OAEP256 = ["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256",
           "-pkeyopt", "rsa_mgf1_md:sha256"]
OAEP1 = ["-pkeyopt", "rsa_padding_mode:oaep"]
REFUSED = "PKCS#1 v1.5 decryption is refused"
TOKEN_KEY = "pkcs11:token=keyx-a;object=srv-rsa;type=private"


@pytest.fixture
def sw_key(tmp):
    """A 2048-bit RSA key made by the default provider alone, and its public key."""
    env = kxutil.base_env()
    key, pub = tmp / "rsa.pem", tmp / "rsa.pub"
    kxutil.openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key,
                   env=env).ok("RSA key")
    kxutil.openssl("pkey", "-in", key, "-pubout", "-out", pub, env=env).ok("public key")
    return key, pub


@pytest.fixture(scope="module")
def token_key(softhsm, tmp_path_factory):
    """A decrypt-only RSA-2048 key pair on keyx-a made by pkcs11-tool (id 52), its public key as
    pkcs11-tool reads it (DER SubjectPublicKeyInfo); deleted again at teardown so that the other
    tests' object counts hold."""
    d = tmp_path_factory.mktemp("rsa-token")
    softhsm.tool("keyx-a", "--keypairgen", "--key-type", "rsa:2048", "--label", "srv-rsa", "--id", "52",
                 "--usage-decrypt").ok("token RSA key")
    pub = d / "token-rsa.der"
    try:
        softhsm.tool("keyx-a", "--read-object", "--type", "pubkey", "--id", "52", "-o", pub).ok("read pubkey")
        yield pub
    finally:
        for t in ("privkey", "pubkey"):
            softhsm.tool("keyx-a", "--delete-object", "--type", t, "--id", "52")


def keyx_env(cnf, log, **settings):
    return kxutil.base_env(OPENSSL_CONF=cnf(keyx={"audit-log": log, **settings}))


def pkcs11_env(softhsm, cnf, log, **more):
    return softhsm.env(OPENSSL_CONF=cnf(keyx={"audit-log": log, **softhsm.keyx_settings(**more)}))


def secret(tmp, n=32):
    import os

    m = tmp / "message.bin"
    m.write_bytes(os.urandom(n))
    return m


def events(log, event, pid=None):
    evs = kxutil.read_audit(log)
    kxutil.check_audit_schema(evs)
    return [e for e in evs if e["event"] == event and (pid is None or e["pid"] == pid)]


def test_pkeyutl_oaep_sha256_software_key(cnf, tmp, sw_key):
    key, pub = sw_key
    log = tmp / "audit.jsonl"
    env = keyx_env(cnf, log)
    msg, ct, out = secret(tmp), tmp / "ct.bin", tmp / "out.bin"
    # encrypted by the default provider alone, decrypted through keyx
    kxutil.openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", pub, *OAEP256, "-in", msg, "-out", ct,
                   env=kxutil.base_env()).ok("encrypt (default provider)")
    r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", key, *OAEP256, "-in", ct, "-out", out, env=env).ok("decrypt")
    assert out.read_bytes() == msg.read_bytes()
    dec = events(log, "decrypt", r.pid)
    assert len(dec) == 1 and dec[0]["ok"] and dec[0]["backend"] == "software", dec
    # and the other way round: keyx encrypts, the default provider decrypts
    ct2, out2 = tmp / "ct2.bin", tmp / "out2.bin"
    r = kxutil.openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", pub, *OAEP256, "-in", msg, "-out", ct2,
                       env=env).ok("encrypt (keyx)")
    assert [e["ok"] for e in events(log, "encrypt", r.pid)] == [True], "keyx did not serve the encryption"
    kxutil.openssl("pkeyutl", "-decrypt", "-inkey", key, *OAEP256, "-in", ct2, "-out", out2,
                   env=kxutil.base_env()).ok("decrypt (default provider)")
    assert out2.read_bytes() == msg.read_bytes()
    kxutil.assert_no_secrets(log.read_text(), [msg.read_bytes().hex()], "audit log")


def test_pkeyutl_oaep_token_key_by_uri(softhsm, cnf, tmp, token_key):
    log = tmp / "audit.jsonl"
    msg = secret(tmp)
    for name, opts, raw in (("sha1", OAEP1, None), ("sha256", OAEP256, "1")):
        ct, out = tmp / f"ct-{name}.bin", tmp / f"out-{name}.bin"
        kxutil.openssl("pkeyutl", "-encrypt", "-pubin", "-keyform", "DER", "-inkey", token_key, *opts,
                       "-in", msg, "-out", ct, env=kxutil.base_env()).ok(f"encrypt {name}")
        settings = {"pkcs11-raw-rsa": raw} if raw else {}
        env = pkcs11_env(softhsm, cnf, log, **settings)
        r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", TOKEN_KEY, *opts, "-in", ct, "-out", out,
                           env=env).ok(f"decrypt {name} on the token")
        assert out.read_bytes() == msg.read_bytes(), name
        dec = events(log, "decrypt", r.pid)
        assert [(e["ok"], e["backend"]) for e in dec] == [(True, "pkcs11")], dec
    # SHA-256 without pkcs11-raw-rsa: SoftHSM's limitation, named with the setting
    r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", TOKEN_KEY, *OAEP256, "-in", tmp / "ct-sha256.bin",
                       "-out", tmp / "x.bin", env=pkcs11_env(softhsm, cnf, log))
    assert r.rc != 0 and "pkcs11-raw-rsa = 1" in r.err and "SHA256" in r.err, r


@pytest.mark.parametrize("backend", ["software", "pkcs11"])
def test_pkcs1_v15_decryption_is_refused(softhsm, cnf, tmp, sw_key, token_key, backend):
    key, pub = sw_key
    log = tmp / "audit.jsonl"
    if backend == "software":
        env, inkey, form = keyx_env(cnf, log), key, []
    else:
        env, inkey, form, pub = pkcs11_env(softhsm, cnf, log), TOKEN_KEY, ["-keyform", "DER"], token_key
    msg, ct = secret(tmp), tmp / "ct.bin"
    kxutil.openssl("pkeyutl", "-encrypt", "-pubin", *form, "-inkey", pub, "-in", msg, "-out", ct,
                   env=kxutil.base_env()).ok("PKCS#1 v1.5 encrypt (default provider)")
    r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", inkey, "-in", ct, "-out", tmp / "out.bin", env=env)
    assert r.rc != 0 and REFUSED in r.err and "use OAEP" in r.err, r
    assert "PKCS#1 v1.5 decryption refused (padding oracle)" in r.err, r  # its own reason
    assert not (tmp / "out.bin").exists() or (tmp / "out.bin").read_bytes() != msg.read_bytes()


def test_kem_round_trip_software(build, tmp):
    log = tmp / "audit.jsonl"
    r = kxutil.run(wrap_cmd() + ["kem", "gen:2048"], env=leak_checked(kxutil.base_env(KEYX_AUDIT_LOG=log)))
    assert r.rc == 0 and r.out.strip() == "kem ok 256", r
    dec = events(log, "decapsulate", r.pid)
    assert [(e["ok"], e["backend"]) for e in dec] == [(True, "software")], dec


def token_env(softhsm, log, **more):
    s = softhsm.keyx_settings()
    env = dict(KEYX_AUDIT_LOG=log, KEYX_BACKENDS=s["backends"], KEYX_PKCS11_MODULE=s["pkcs11-module"],
               KEYX_PKCS11_TOKEN=s["pkcs11-token"], KEYX_PKCS11_PIN=s["pkcs11-pin"], **more)
    return softhsm.env(**env)


@pytest.mark.parametrize("key", ["gen:2048", TOKEN_KEY])
def test_kem_round_trip_pkcs11(softhsm, tmp, token_key, key):
    log = tmp / "audit.jsonl"
    before = len(softhsm.token_objects("keyx-a"))
    r = kxutil.run(wrap_cmd() + ["kem", key], env=leak_checked(token_env(softhsm, log)))
    assert r.rc == 0 and r.out.strip() == "kem ok 256", r
    dec = events(log, "decapsulate", r.pid)
    assert [(e["ok"], e["backend"]) for e in dec] == [(True, "pkcs11")], dec
    assert len(softhsm.token_objects("keyx-a")) == before, "a generated key left an object behind"


@pytest.mark.parametrize("where", ["software", "pkcs11"])
def test_reused_decrypt_context_returns_each_plaintext(softhsm, tmp, where):
    log = tmp / "audit.jsonl"
    env = kxutil.base_env(KEYX_AUDIT_LOG=log) if where == "software" else token_env(softhsm, log)
    r = kxutil.run(wrap_cmd() + ["reuse", "gen:2048", "SHA1"], env=leak_checked(env))
    assert r.rc == 0 and r.out.strip() == "reuse ok", r
    dec = events(log, "decrypt", r.pid)
    assert [(e["ok"], e["backend"]) for e in dec] == [(True, where)] * 2, dec


@pytest.mark.parametrize("bits", [2048, 3072])
def test_rsa_keygen_on_the_token_keeps_the_private_key(softhsm, tmp, bits):
    log = tmp / "audit.jsonl"
    before = len(softhsm.token_objects("keyx-a"))
    r = kxutil.run(wrap_cmd() + ["export", f"gen:{bits}"], env=token_env(softhsm, log))
    assert r.rc == 0 and r.out.strip() == f"export refused bits {bits}", r
    gens = events(log, "keygen", r.pid)
    assert [(e["ok"], e["backend"], e["alg"]) for e in gens] == [(True, "pkcs11", "RSA")], gens
    assert len(softhsm.token_objects("keyx-a")) == before, "session objects only"
    # and a KEM round trip with such a key at the same size
    r = kxutil.run(wrap_cmd() + ["kem", f"gen:{bits}"], env=token_env(softhsm, log))
    assert r.rc == 0 and r.out.strip() == f"kem ok {bits // 8}", r


def test_openssl_genpkey_on_the_token_refuses_the_private_pem(softhsm, cnf, tmp):
    log = tmp / "audit.jsonl"
    r = kxutil.openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                       "-out", tmp / "k.pem", env=pkcs11_env(softhsm, cnf, log))
    # an ephemeral token key has no reference a file could hold, and its private part stays
    assert r.rc != 0 and "its private part stays in the pkcs11 backend" in r.err, r
    assert "PRIVATE KEY" not in ((tmp / "k.pem").read_text() if (tmp / "k.pem").exists() else "")


def test_tls12_rsa_key_exchange_with_keyx_preferred(s_server, s_client, certs, cnf, tmp):
    """libssl decrypts the premaster with RSA_PKCS1_WITH_TLS_PADDING: keyx delegates it for the
    software key, and the handshake completes."""
    log = tmp / "audit.jsonl"
    env = keyx_env(cnf, log)
    crt, key = certs["rsa"]
    srv = s_server(["-cert", crt, "-key", key], env)
    cli = s_client(srv.port, ["-tls1_2", "-cipher", "AES128-GCM-SHA256"], env)
    server_out = srv.wait()
    assert cli.rc == 0, f"{cli!r}\n--- s_server ---\n{server_out}"
    assert kxutil.protocol(cli.out) == "TLSv1.2" and kxutil.cipher(cli.out) == "AES128-GCM-SHA256", cli
    assert not re.search(r":error:", server_out), server_out
    dec = events(log, "decrypt", srv.pid)
    assert [(e["ok"], e["backend"]) for e in dec] == [(True, "software")], dec
    enc = events(log, "encrypt", cli.pid)
    assert [e["ok"] for e in enc] == [True], "the client's premaster encryption went through keyx"


@pytest.mark.parametrize("where", ["software", "pkcs11"])
def test_wrap_example(softhsm, cnf, tmp, sw_key, token_key, where):
    """examples/wrap.c: a fresh AES-256 key wrapped to the public key, unwrapped with the private
    key by URI through keyx, and a message through AES-256-GCM under it."""
    exe = kxutil.build_dir() / "examples" / "keyx-wrap-example"
    assert exe.exists(), f"{exe} not built"
    log = tmp / "audit.jsonl"
    if where == "software":
        key, pub = sw_key
        env, args = keyx_env(cnf, log), [pub, key]
    else:
        env, args = pkcs11_env(softhsm, cnf, log, **{"pkcs11-raw-rsa": "1"}), [token_key, TOKEN_KEY]
    r = kxutil.run([exe, *args, "wrapped by keyx"], env=env).ok("example")
    assert "decrypted: wrapped by keyx" in r.out, r
    dec = events(log, "decrypt", r.pid)
    assert [(e["ok"], e["backend"]) for e in dec] == [(True, where)], dec


@pytest.mark.parametrize("where", ["software", "pkcs11"])
def test_ephemeral_max_uses_counts_decryptions(softhsm, tmp, where):
    log = tmp / "audit.jsonl"
    env = (kxutil.base_env(KEYX_AUDIT_LOG=log, KEYX_EPHEMERAL_MAX_USES=1) if where == "software"
           else token_env(softhsm, log, KEYX_EPHEMERAL_MAX_USES="1"))
    r = kxutil.run(wrap_cmd() + ["reuse", "gen:2048", "SHA1"], env=leak_checked(env))
    assert r.rc != 0 and "key used up (ephemeral-max-uses reached)" in r.out, r
    dec = events(log, "decrypt", r.pid)
    assert [(e["ok"], e["backend"]) for e in dec] == [(True, where), (False, where)], dec
    assert [e["ok"] for e in events(log, "free", r.pid)] == [True], "destroyed after its last use"


@pytest.mark.parametrize("backend", ["software", "pkcs11"])
def test_decryption_without_padding_software_only(softhsm, cnf, tmp, sw_key, token_key, backend):
    import os

    key, pub = sw_key
    log = tmp / "audit.jsonl"
    if backend == "software":
        env, inkey, form = keyx_env(cnf, log), key, []
    else:
        env, inkey, form, pub = pkcs11_env(softhsm, cnf, log), TOKEN_KEY, ["-keyform", "DER"], token_key
    msg, ct, out = tmp / "m.bin", tmp / "ct.bin", tmp / "out.bin"
    msg.write_bytes(b"\x00" + os.urandom(255))  # below the modulus
    none = ["-pkeyopt", "rsa_padding_mode:none"]
    kxutil.openssl("pkeyutl", "-encrypt", "-pubin", *form, "-inkey", pub, *none, "-in", msg, "-out", ct,
                   env=kxutil.base_env()).ok("raw encrypt (default provider)")
    r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", inkey, *none, "-in", ct, "-out", out, env=env)
    if backend == "software":
        assert r.rc == 0 and out.read_bytes() == msg.read_bytes(), r
    else:
        assert r.rc != 0 and "without padding is refused for a pkcs11 key" in r.err, r
