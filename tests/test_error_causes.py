"""Errors keep their cause: what the user reads when keyx refuses or its device fails names the
cause, with its own reason text, through the paths an application takes - `openssl` commands
(OSSL_STORE's file: loader), libssl (`s_server`), and applications calling OSSL_STORE or
PEM_read_bio_PrivateKey (Python + libcrypto via ctypes).

Cases: a key reference file with a wrong pkcs11-module path and with a wrong PIN (`pkey -in`,
`s_server -key`, the two application paths), PKCS#1 v1.5 decryption, writing an ephemeral TPM key,
a digest the token is never handed, a sign-only token key asked to derive, TPM object memory exhausted during a TLS handshake (a
tpm2-abrmd that allows one transient object per client), and a wrong PIN during a TLS handshake
whose key shares are made on the token. Everything on a SoftHSM2 token directory and swtpm of this
module's own; no PIN ever appears in the output.
"""

import subprocess
import time

import pytest

import kxutil
from conftest import pick_port
from fixture_abrmd import Abrmd
from fixture_softhsm import PIN, SoftHSM
from fixture_swtpm import tpm_cnf
from test_tpm_keyfiles import tss2_der, tss2_pem

WRONG_PIN = "kxwrong-3141"
MISSING_MODULE = "/nonexistent/keyx-no-such-module.so"

# What libssl 3.0 and 3.5 put on top of a failed key share (ssl/statem/extensions_srvr.c): the
# allocation is not what failed; keyx's line with the cause is in the queue before it.
LIBSSL_KEY_SHARE = "tls_construct_stoc_key_share"

APP = kxutil.LIBCRYPTO_CTYPES + r"""
# argv: config, how (store | pem), key file. Prints "loaded" or "refused", then the error queue.
ctx = LIB_new()
assert LIB_load(ctx, sys.argv[1].encode()) == 1, "config"
how, path = sys.argv[2], sys.argv[3]
if how == "store":
    store_open = fn("OSSL_STORE_open_ex", c_void_p, c_char_p, c_void_p, c_char_p, c_void_p, c_void_p,
                    c_void_p, c_void_p, c_void_p)
    store_load = fn("OSSL_STORE_load", c_void_p, c_void_p)
    store_close = fn("OSSL_STORE_close", c_int, c_void_p)
    st = store_open(("file:" + path).encode(), ctx, None, None, None, None, None, None)
    info = store_load(st) if st else None
    print("loaded" if info else "refused", flush=True)
    if st: store_close(st)
else:
    b = bio_file(path.encode(), b"r")
    k = read_pem(b, None, None, None, ctx, None)
    print("loaded" if k else "refused", flush=True)
    bio_free(b)
print_errors()
"""


def check_cause(r, *needles):
    """A clean failure whose output names every needle, and no PIN."""
    text = r.out + r.err
    assert r.rc is not None and 0 < r.rc < 128, f"expected a clean failure:\n{r!r}"
    for n in needles:
        assert n in text, f"the output does not say {n!r}:\n{r!r}"
    assert PIN not in text and WRONG_PIN not in text, f"a PIN in the output:\n{r!r}"


@pytest.fixture(scope="module")
def hsm(tmp_path_factory, build):
    return SoftHSM(tmp_path_factory.mktemp("softhsm-err")).setup()


@pytest.fixture(scope="module")
def ref(hsm, tmp_path_factory):
    """A KEYX KEY reference file to an EC P-256 key genpkey made on keyx-a."""
    d = tmp_path_factory.mktemp("ref")
    conf = kxutil.write_cnf(d / "openssl.cnf", keyx=hsm.keyx_settings())
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt", "keyx-label:err-ec",
                   "-out", d / "ref.pem", env=hsm.env(OPENSSL_CONF=conf)).ok("genpkey keyx-label")
    assert "BEGIN KEYX KEY" in (d / "ref.pem").read_text()
    return d / "ref.pem"


def fault_env(hsm, tmp, fault):
    """keyx on keyx-a with the fault: a pkcs11-module that does not exist, or a wrong PIN file."""
    more = {}
    if fault == "module":
        more["pkcs11-module"] = MISSING_MODULE
    else:
        bad = tmp / "wrong-pin"
        bad.write_text(WRONG_PIN)
        bad.chmod(0o600)
        more["pkcs11-pin"] = f"file:{bad}"
    conf = kxutil.write_cnf(tmp / "openssl.cnf", keyx=hsm.keyx_settings(**more))
    return conf, hsm.env(OPENSSL_CONF=conf)


# The cause of each fault as the user reads it: keyx's reason text, then its detail.
CAUSES = {
    "module": ["PKCS#11 module cannot be loaded", f"cannot load PKCS#11 module '{MISSING_MODULE}'",
               "check pkcs11-module"],
    "pin": ["token login failed", "CKR_PIN_INCORRECT", "fix pkcs11-pin"],
}
REFERENCE = 'key reference file: the pkcs11 key "'


@pytest.fixture
def after_wrong_pin(hsm):
    """A wrong PIN leaves the token counting a failed login, and keyx then no longer tries a PIN
    (no lockout): the right PIN logs in once afterwards, which resets the count."""
    yield
    hsm.tool("keyx-a", "--list-objects").ok("the right PIN logs in")


def run_app(conf, how, path, env):
    script = conf.parent / "app.py"
    script.write_text(APP)
    return kxutil.run(["/usr/bin/python3", script, conf, how, path], env=env)


@pytest.mark.parametrize("fault", ["module", "pin"])
@pytest.mark.parametrize("reader", ["pkey", "s_server", "store", "pem"])
def test_reference_file_says_why_its_key_cannot_be_loaded(hsm, ref, certs, tmp, fault, reader, after_wrong_pin):
    conf, env = fault_env(hsm, tmp, fault)
    if reader == "pkey":
        r = kxutil.openssl("pkey", "-in", ref, "-noout", env=env)
    elif reader == "s_server":
        crt, _ = certs["ec"]
        r = kxutil.run(["openssl", "s_server", "-accept", f"127.0.0.1:{pick_port()}", "-naccept", "1",
                        "-cert", crt, "-key", ref, "-quiet"], env=env, input="")
    else:
        r = run_app(conf, reader, ref, env)
        assert r.out.strip() == "refused", r
        r.rc = 1  # the program itself ends normally; refusing the key is the failure checked
    check_cause(r, *CAUSES[fault], REFERENCE)
    # the cause comes first, the reference file's line after it
    text = r.out + r.err
    assert text.index(CAUSES[fault][0]) < text.index(REFERENCE), r
    assert "STORE routines" not in text or CAUSES[fault][0] in text, r


@pytest.mark.parametrize("fault", ["module", "pin"])
def test_der_reference_file_through_the_openssl_tool(hsm, ref, tmp, fault, after_wrong_pin):
    """The same reference as DER (`pkey -inform DER`), on both versions. OpenSSL 3.0's file:
    store drops the errors of a key load that fails inside it and prints only `unsupported`;
    keyx's DER decoder hands the reference on and raises the cause again above it (as its PEM
    decoder does for PEM). The key is still loaded once: a wrong PIN is tried once."""
    der = tmp / "ref.der"
    good = kxutil.write_cnf(tmp / "good.cnf", keyx=hsm.keyx_settings())
    kxutil.openssl("pkey", "-in", ref, "-outform", "DER", "-out", der,
                   env=hsm.env(OPENSSL_CONF=good)).ok("DER reference")
    conf, env = fault_env(hsm, tmp, fault)
    log = tmp / "audit.jsonl"
    conf.write_text(conf.read_text().replace("[keyx_sect]\n", f"[keyx_sect]\naudit-log = {log}\n"))
    r = kxutil.openssl("pkey", "-inform", "DER", "-in", der, "-noout", env=env)
    loads = [e for e in kxutil.read_audit(log) if e["event"] == "load" and e["pid"] == r.pid]
    assert len(loads) == 1 and not loads[0]["ok"] and CAUSES[fault][1] in loads[0]["error"], loads
    assert PIN not in log.read_text() and WRONG_PIN not in log.read_text()
    check_cause(r, *CAUSES[fault], REFERENCE)
    text = r.out + r.err
    assert text.index(CAUSES[fault][0]) < text.index(REFERENCE), r
    assert text.count(CAUSES[fault][1]) == 1, r


def test_pkcs1_decryption_is_refused_with_its_own_reason(tmp, cnf):
    """PKCS#1 v1.5 decryption (a software key, keyx preferred): refused with the reason
    and what to do instead; the same key decrypts OAEP."""
    plain = kxutil.base_env()
    key, pub, msg = tmp / "rsa.pem", tmp / "rsa.pub", tmp / "msg"
    kxutil.openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "bits:2048", "-out", key, env=plain).ok("key")
    kxutil.openssl("pkey", "-in", key, "-pubout", "-out", pub, env=plain).ok("pub")
    msg.write_bytes(b"k" * 32)
    for pad in ("pkcs1", "oaep"):
        kxutil.openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", pub, "-in", msg, "-out", tmp / pad,
                       "-pkeyopt", f"rsa_padding_mode:{pad}", env=plain).ok(f"encrypt {pad}")
    env = kxutil.base_env(OPENSSL_CONF=cnf())
    r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", key, "-in", tmp / "pkcs1",
                       "-pkeyopt", "rsa_padding_mode:pkcs1", env=env)
    check_cause(r, "PKCS#1 v1.5 decryption refused (padding oracle)", "Bleichenbacher",
                "rsa_padding_mode:oaep")
    assert "not supported by any configured keyx backend" not in r.err, r
    r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", key, "-in", tmp / "oaep",
                       "-pkeyopt", "rsa_padding_mode:oaep", env=env)
    assert r.rc == 0 and r.out == "k" * 32, r


def test_an_ephemeral_tpm_key_cannot_be_written(swtpm, tmp):
    conf = tpm_cnf(tmp / "openssl.cnf", swtpm)
    r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", tmp / "x.pem",
                       env=kxutil.base_env(OPENSSL_CONF=conf))
    check_cause(r, "key cannot be written: an ephemeral hardware key has no reference",
                "ephemeral TPM key has no locator; generate it with keyx-persist")
    assert "not supported by any configured keyx backend" not in r.err, r


def test_a_digest_the_token_is_not_handed(hsm, tmp):
    """MD5 RSA signatures with a token key (genpkey keyx-label): keyx hands tokens SHA-1 and
    SHA-2 digests only."""
    conf = kxutil.write_cnf(tmp / "openssl.cnf", keyx=hsm.keyx_settings())
    env = hsm.env(OPENSSL_CONF=conf)
    kxutil.openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "bits:2048", "-pkeyopt", "keyx-label:err-rsa",
                   "-out", tmp / "rsa.pem", env=env).ok("genpkey keyx-label")
    data = tmp / "data"
    data.write_bytes(b"signed")
    r = kxutil.openssl("dgst", "-md5", "-sign", tmp / "rsa.pem", "-out", tmp / "sig", data, env=env)
    check_cause(r, "digest not supported for this key", "digest md5", "token 'keyx-a'")
    assert "not supported by any configured keyx backend" not in r.err, r


def test_a_sign_only_token_key_refuses_to_derive(hsm, tmp):
    """A P-256 key pair pkcs11-tool made for signing only (CKA_DERIVE false): key agreement is
    refused with the key's own reason, not as something no backend supports."""
    hsm.tool("keyx-a", "--keypairgen", "--key-type", "EC:prime256v1", "--label", "err-sign", "--id", "e5",
             "--usage-sign").ok("sign-only key")
    plain = kxutil.base_env()
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", tmp / "peer.pem",
                   env=plain).ok("peer")
    kxutil.openssl("pkey", "-in", tmp / "peer.pem", "-pubout", "-out", tmp / "peer.pub", env=plain).ok("peer pub")
    conf = kxutil.write_cnf(tmp / "openssl.cnf", keyx=hsm.keyx_settings())
    r = kxutil.openssl("pkeyutl", "-derive", "-inkey", "pkcs11:token=keyx-a;object=err-sign;type=private",
                       "-peerkey", tmp / "peer.pub", env=hsm.env(OPENSSL_CONF=conf))
    check_cause(r, "the key does not allow this operation", "does not allow derivation (CKA_DERIVE is false)")
    assert "not supported by any configured keyx backend" not in r.err, r


def connect(port, srv, *client_args):
    """A default-provider s_client handshake with the s_server on port (retried until it
    listens)."""
    deadline = time.monotonic() + kxutil.TIMEOUT
    while True:
        r = kxutil.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief", *client_args],
                       env=kxutil.base_env(), input="")
        if "Connection refused" not in r.err and "connect:errno" not in r.err:
            return r
        assert time.monotonic() < deadline and srv.poll() is None, "s_server does not listen"
        time.sleep(0.1)


def serve_one_handshake(env, crt, key, *client_args):
    """s_server (keyx through env) serving one handshake to a default-provider s_client; the
    server's stderr and the client's result."""
    port = pick_port()
    srv = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1",
                            "-cert", crt, "-key", key, "-groups", "P-256", "-quiet"],
                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=env, text=True, start_new_session=True)
    try:
        r = connect(port, srv, "-groups", "P-256", *client_args)
        srv.wait(kxutil.TIMEOUT)
    finally:
        kxutil.kill_group(srv)
    return srv.stderr.read(), r


def check_server_cause(err, client, *needles):
    assert client.rc != 0, f"the handshake succeeded:\n{client!r}"
    for m in kxutil.SANITIZER_MARKERS:
        assert m not in err, err
    for n in needles:
        assert n in err, f"the server's errors do not say {n!r}:\n{err[-3000:]}"
    assert PIN not in err and WRONG_PIN not in err, "a PIN in the server's output"
    # where libssl adds its own line for the failed key share, keyx's cause comes before it
    if LIBSSL_KEY_SHARE in err:
        assert err.index(needles[0]) < err.index(LIBSSL_KEY_SHARE), err[-3000:]


def abrmd_tools(a, *args):
    return kxutil.run(list(args), env=a.tools_env()).ok(" ".join(map(str, args[:2])))


def test_tpm_object_memory_exhausted_during_tls(tmp_path, certs):
    """tpm2-abrmd allowing one loaded object per client, and the server's certificate key (a
    TSS2 key file under a persistent parent, made with tpm2-tools) holding it: the handshake's
    key share cannot be made in the TPM, and the server's error queue says the TPM is out of
    object memory and what to do (abrmd's limit), before libssl's own line."""
    a = Abrmd(tmp_path / "abrmd", max_transients=1)
    d = tmp_path
    parent = 0x81000041
    try:
        a.start()
        abrmd_tools(a, "tpm2_createprimary", "-Q", "-C", "o", "-G", "rsa2048", "-c", d / "p.ctx")
        abrmd_tools(a, "tpm2_evictcontrol", "-Q", "-C", "o", "-c", d / "p.ctx", f"0x{parent:x}")
        abrmd_tools(a, "tpm2_create", "-Q", "-C", f"0x{parent:x}", "-G", "ecc256:null", "-a",
                    "sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
                    "-u", d / "k.pub", "-r", d / "k.priv")
        key = d / "k.pem"
        key.write_text(tss2_pem(tss2_der((d / "k.pub").read_bytes(), (d / "k.priv").read_bytes(), parent)))
        conf = tpm_cnf(d / "openssl.cnf", None, keyx={"tpm-tcti": a.tcti}, groups=None)
        env = a.env(OPENSSL_CONF=conf)
        kxutil.openssl("pkey", "-in", key, "-pubout", "-out", d / "k.pub.pem", env=env).ok("public key")
        cakey, cacrt = certs["ec"][1], certs["ec"][0]
        kxutil.openssl("x509", "-new", "-force_pubkey", d / "k.pub.pem", "-subj", "/CN=localhost", "-CA", cacrt,
                       "-CAkey", cakey, "-days", "2", "-out", d / "k.crt", env=kxutil.base_env()).ok("certificate")
        err, client = serve_one_handshake(env, d / "k.crt", key, "-tls1_3")
    finally:
        a.stop()
    check_server_cause(err, client, "TPM out of object memory", "tpm2-abrmd --max-transients")


def test_wrong_pin_during_tls(tmp_path_factory, certs, tmp, cnf):
    """Key shares on the token with a wrong PIN: the handshake fails and the server's error
    queue says the login failed (or, once a login failed, that keyx does not try it again)."""
    hsm = SoftHSM(tmp_path_factory.mktemp("tlspin")).setup()
    bad = tmp / "bad-pin"
    bad.write_text(WRONG_PIN)
    conf = cnf(keyx=hsm.keyx_settings(**{"pkcs11-pin": f"file:{bad}"}), groups="P-256")
    crt, key = certs["ec"]
    err, client = serve_one_handshake(hsm.env(OPENSSL_CONF=conf), crt, key, "-tls1_3")
    check_server_cause(err, client, "token login failed", "CKR_PIN_INCORRECT", "fix pkcs11-pin")
    hsm.tool("keyx-a", "--list-objects").ok("the right PIN still logs in")
