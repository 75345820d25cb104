"""Token keys by PKCS#11 URI, and the errors an operator meets.

A static P-256 key made on the token with pkcs11-tool is loaded by URI through keyx's STORE (by
reference: the private key stays on the token). The secret keyx derives with it must equal what
libp11's engine derives from the same token key, and what the default provider derives from the
peer's side with the public key keyx exported. Every configuration runs with
default_properties = ?provider=keyx, so SoftHSM's own libcrypto calls (PIN digest at C_Login)
would deadlock or recurse here if keyx were re-entered.
"""

import re

import pytest

import kxutil
from fixture_softhsm import PIN, SPY

WRONG_PIN = "kxwrong-3141"
URI = "pkcs11:token=keyx-a;object=srv-ecdh;type=private"
NEUTRAL = {"OPENSSL_CONF": None}


@pytest.fixture
def peer(softhsm, tmp):
    """A P-256 key pair from the default provider: the other party."""
    env = kxutil.base_env()
    key, pub = tmp / "peer.pem", tmp / "peer.pub"
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", key, env=env).ok("peer")
    kxutil.openssl("pkey", "-in", key, "-pubout", "-out", pub, env=env).ok("peer pub")
    return key, pub


def keyx_env(softhsm, cnf, tmp, **settings):
    log = tmp / "audit.jsonl"
    return softhsm.env(OPENSSL_CONF=cnf(keyx={"audit-log": log, **softhsm.keyx_settings(**settings)})), log


def derive_hex(r):
    return r.ok("derive").out


def run_bin(cmd, env, **kw):
    return kxutil.run(cmd, env=env, text=False, **kw)


@pytest.mark.parametrize("uri", [URI, "keyx:" + URI, "pkcs11:token=keyx-a;id=%01;type=private"])
def test_token_key_by_uri_derives_what_libp11_and_the_peer_derive(softhsm, cnf, tmp, peer, uri):
    env, log = keyx_env(softhsm, cnf, tmp)
    peer_key, peer_pub = peer
    ours = tmp / "keyx.bin"
    kxutil.openssl("pkeyutl", "-derive", "-inkey", uri, "-peerkey", peer_pub, "-out", ours, env=env).ok("keyx derive")

    # libp11's engine (Debian's libengine-pkcs11-openssl), same token key, same peer
    theirs = tmp / "libp11.bin"
    eng_env = softhsm.env(PKCS11_MODULE_PATH=softhsm.module)
    kxutil.openssl("pkeyutl", "-derive", "-engine", "pkcs11", "-keyform", "engine",
                   "-inkey", f"{URI};pin-value={PIN}", "-peerkey", peer_pub, "-out", theirs,
                   env=eng_env).ok("libp11 derive")

    # the peer's side, in the default provider, with the public key keyx exports
    srv_pub, other = tmp / "srv.pub", tmp / "peer-side.bin"
    kxutil.openssl("pkey", "-in", uri, "-pubout", "-out", srv_pub, env=env).ok("pubout")
    kxutil.openssl("pkeyutl", "-derive", "-inkey", peer_key, "-peerkey", srv_pub, "-out", other,
                   env=kxutil.base_env()).ok("peer derive")

    secret = ours.read_bytes()
    assert len(secret) == 32
    assert secret == theirs.read_bytes(), "keyx and libp11 derived different secrets"
    assert secret == other.read_bytes(), "keyx's secret differs from the peer's"

    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    loads = [e for e in events if e["event"] == "load" and e["ok"]]
    derives = [e for e in events if e["event"] == "derive" and e["ok"]]
    assert loads and derives and {e["backend"] for e in loads + derives} == {"pkcs11"}, events
    assert all(e["ephemeral"] is False for e in loads + derives), events
    assert secret.hex() not in log.read_text()


def test_two_loads_of_one_token_key_are_independent(softhsm, cnf, tmp):
    env, _ = keyx_env(softhsm, cnf, tmp)
    kxutil.derive_twice(env["OPENSSL_CONF"], URI, "P-256", env)


def test_exported_public_key_is_the_tokens(softhsm, cnf, tmp):
    env, _ = keyx_env(softhsm, cnf, tmp)
    r = kxutil.openssl("pkey", "-in", URI, "-pubout", "-outform", "DER", "-out", tmp / "keyx.der", env=env)
    r.ok("pubout")
    softhsm.tool("keyx-a", "--read-object", "--type", "pubkey", "--id", "01", "-o", tmp / "tool.der").ok("read")
    assert (tmp / "keyx.der").read_bytes() == (tmp / "tool.der").read_bytes()


def test_private_key_never_leaves_the_token(softhsm, cnf, tmp):
    env, _ = keyx_env(softhsm, cnf, tmp)
    # what is written is a key reference, never the private key
    kxutil.openssl("pkey", "-in", URI, "-out", tmp / "priv.pem", env=env).ok("key reference")
    ref = (tmp / "priv.pem").read_text()
    assert ref.startswith("-----BEGIN KEYX KEY-----") and "PRIVATE" not in ref, ref
    r = kxutil.openssl("pkey", "-in", URI, "-traditional", "-out", tmp / "trad.pem", env=env)
    assert not (tmp / "trad.pem").exists() or "PRIVATE KEY" not in (tmp / "trad.pem").read_text(), r


def check_error(r, *needles):
    text = r.out + r.err
    assert r.rc not in (0, -11, -6) and r.rc > 0, f"expected a clean failure:\n{r!r}"
    for n in needles:
        assert n in text, f"error does not say {n!r}:\n{r!r}"
    for pin in (PIN, WRONG_PIN):
        assert pin not in text, f"a PIN appears in the output:\n{r!r}"


def test_wrong_pin_is_one_clear_error_and_one_login(softhsm, cnf, tmp, peer):
    """A wrong PIN: one C_Login (seen through OpenSC's pkcs11-spy) in all processes together,
    one clear error, the PIN never printed, the token still unlocked afterwards. The second
    process finds the token's failed-login flag and does not try at all: N workers or restarts
    with a wrong PIN never use up the token's tries."""
    bad = tmp / "bad-pin"
    bad.write_text(WRONG_PIN)
    spy_log = tmp / "spy.log"
    cnf_path = cnf(keyx={**softhsm.keyx_settings(**{"pkcs11-pin": f"file:{bad}"}), "pkcs11-module": SPY,
                         "debug": 1})
    env = softhsm.spy_env(spy_log, OPENSSL_CONF=cnf_path)
    # a key load, then two key generations in one process: all need the login
    r = kxutil.openssl("pkeyutl", "-derive", "-inkey", URI, "-peerkey", peer[1], env=env)
    check_error(r, "PIN incorrect", "pkcs11-pin")
    r = kxutil.run([kxutil.derive_bin(), "--config", cnf_path, "uses", "EC", "P-256", "2"], env=env)
    check_error(r, "reports an earlier failed login", "pkcs11-tool --login")
    logins = re.findall(r"^\d+: C_Login$", spy_log.read_text(), re.M)
    assert len(logins) == 1, f"{len(logins)} C_Login calls in two processes (expected one in all)"
    softhsm.tool("keyx-a", "--list-objects").ok("the right PIN still works: token not locked")
    # that login reset the count: keyx with the right PIN serves again
    right = cnf(name="right.cnf", keyx=softhsm.keyx_settings())
    kxutil.run(kxutil.driver_cmd(config=right) + ["uses", "EC", "P-256", "1"],
               env=softhsm.env(OPENSSL_CONF=right)).ok("a token key after the count was reset")


def test_token_showing_a_failed_login_is_not_tried(softhsm, cnf, tmp):
    """A token whose flags show an earlier failed login (another program's wrong PIN): keyx, even
    with the right PIN, does not log in and says how to reset the count; after one right login
    it serves."""
    r = softhsm.tool("keyx-b", "--login", "--pin", WRONG_PIN, "--list-objects", login=False)
    assert r.rc != 0, f"the wrong PIN logged in:\n{r!r}"
    assert "user PIN count low" in softhsm.tool("keyx-b", "-L", login=False).out, "the token shows no failed login"
    conf = cnf(keyx=softhsm.keyx_settings(tokens=("keyx-b",)))
    env = softhsm.env(OPENSSL_CONF=conf)
    r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", env=env)
    check_error(r, "token login not tried", "keyx-b", "CKF_USER_PIN_COUNT_LOW", "pkcs11-tool --login")
    softhsm.tool("keyx-b", "--list-objects").ok("one login with the right PIN")
    kxutil.run(kxutil.driver_cmd(config=conf) + ["uses", "EC", "P-256", "1"], env=env).ok("served again")


@pytest.mark.parametrize("settings,needles", [
    ({"pkcs11-module": "/nonexistent/libnothing.so"}, ["cannot load PKCS#11 module '/nonexistent/libnothing.so'"]),
    ({"pkcs11-token": "pkcs11:token=no-such-token"}, ["no token matches", "keyx-a"]),
    ({"pkcs11-pin": "env:KEYX_TEST_UNSET_PIN"}, ["KEYX_TEST_UNSET_PIN is not set"]),
])
def test_configuration_errors_are_clear(softhsm, cnf, tmp, settings, needles):
    env, _ = keyx_env(softhsm, cnf, tmp, **settings)
    r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", env=env)
    check_error(r, *needles)


@pytest.mark.parametrize("uri,needles", [
    ("pkcs11:token=keyx-a;object=%zz;type=private", ["invalid PKCS#11 URI"]),
    ("pkcs11:token=keyx-a;object=nothing-here;type=private", ["no key matches", "nothing-here"]),
    ("pkcs11:token=keyx-a;object=srv-ecdh;type=public", ["public key", "type=private"]),
])
def test_uri_errors_are_clear(softhsm, cnf, tmp, peer, uri, needles):
    env, _ = keyx_env(softhsm, cnf, tmp)
    r = kxutil.openssl("pkeyutl", "-derive", "-inkey", uri, "-peerkey", peer[1], env=env)
    check_error(r, *needles)
