"""TPM signatures for certificate keys (TPM side): keyx hashes, the tpm backend signs the
digest with one TPM2_Sign (ECDSA, RSASSA PKCS#1 v1.5, RSASSA-PSS).

Every signature is checked by the default provider alone with the public key tpm2_readpublic
gives (the independent side), and against tpm2_sign with the same key. Refusals come at
EVP_DigestSignInit time, before any data, with a message. TLS: `openssl s_server -key ref.pem`
with `backends = tpm` and no resource manager, the client on the default provider alone.

The tests run on a private swtpm with their own persistent handles (0x81000060..0x81000066).
"""

import os
import re

import pytest

import kxutil
from fixture_swtpm import Swtpm, tpm_cnf
from kxutil import base_env, openssl

EC_KEYS = [("P-256", 0x81000060), ("P-384", 0x81000061), ("P-521", 0x81000062)]
RSA_HANDLE = 0x81000063
SIGNONLY_HANDLE = 0x81000064
ORDER = {"P-256": 32, "P-384": 48, "P-521": 66}
DIGESTS = ["sha256", "sha384", "sha512"]


@pytest.fixture(scope="module")
def tpm(tmp_path_factory):
    t = Swtpm(tmp_path_factory.mktemp("swtpm-sign")).start()
    yield t
    t.kill()


@pytest.fixture(scope="module")
def keys(tpm, tmp_path_factory):
    """Persistent keys made by `genpkey -pkeyopt keyx-persist:` (once per module): name ->
    (reference file, tpm2_readpublic's public key PEM, handle)."""
    d = tmp_path_factory.mktemp("sign-keys")
    env = base_env(OPENSSL_CONF=tpm_cnf(d / "openssl.cnf", tpm))
    out = {}
    curves = tpm.tools("tpm2_getcap", "ecc-curves").out
    for group, handle in EC_KEYS:
        if group == "P-521" and "NIST_P521" not in curves:
            continue
        out[group] = make_key(tpm, d, env, handle, "EC", ["-pkeyopt", f"group:{group}"])
    out["RSA"] = make_key(tpm, d, env, RSA_HANDLE, "RSA", ["-pkeyopt", "rsa_keygen_bits:2048"])
    return out


def make_key(tpm, d, env, handle, alg, opts):
    evict(tpm, handle)
    ref = d / f"ref-{handle:x}.pem"
    openssl("genpkey", "-algorithm", alg, *opts, "-pkeyopt", "keyx-backend:tpm", "-pkeyopt",
            f"keyx-persist:0x{handle:08x}", "-out", ref, env=env).ok(f"genpkey {alg} keyx-persist")
    pub = d / f"pub-{handle:x}.pem"
    tpm.tools("tpm2_readpublic", "-c", f"0x{handle:x}", "-f", "pem", "-o", pub)
    return ref, pub, handle


def evict(tpm, handle):
    if f"0x{handle:x}" in tpm.tools("tpm2_getcap", "handles-persistent").out.lower():
        tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", f"0x{handle:x}")


def keyx_env(tmp, tpm, **keyx):
    return base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", tpm, keyx=keyx or None))


def sign(env, tmp, key, md, data, *sigopts, name="sig.bin"):
    sig = tmp / name
    if sig.exists():
        sig.unlink()
    args = []
    for o in sigopts:
        args += ["-sigopt", o]
    r = openssl("dgst", f"-{md}", "-sign", key, *args, "-out", sig, data, env=env)
    return r, sig


def verify(pub, md, data, sig, *sigopts):
    """The default provider alone (no keyx in the configuration) verifies."""
    args = []
    for o in sigopts:
        args += ["-sigopt", o]
    r = openssl("dgst", f"-{md}", "-verify", pub, *args, "-signature", sig, data, env=base_env())
    return r.rc == 0 and "Verified OK" in r.out


def data_file(tmp, n=1000):
    f = tmp / "data.bin"
    f.write_bytes(os.urandom(n))
    return f


def sign_events(log):
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    return [e for e in events if e["event"] == "sign"]


def der_ecdsa_parts(der):
    """(r, s) of a DER ECDSA-Sig-Value."""
    assert der[0] == 0x30
    i = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = []
    for _ in range(2):
        assert der[i] == 0x02
        n = der[i + 1]
        out.append(int.from_bytes(der[i + 2:i + 2 + n], "big"))
        i += 2 + n
    return out


# ---- ECDSA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [g for g, _ in EC_KEYS])
def test_ecdsa_sign_verifies_in_default_provider(tpm, keys, tmp, group):
    if group not in keys:  # only P-521 is optional ("if the TPM lists it")
        pytest.skip(f"this swtpm lists no {group}")
    ref, pub, handle = keys[group]
    log = tmp / "audit.jsonl"
    env = keyx_env(tmp, tpm, **{"audit-log": log})
    data = data_file(tmp)
    for md in DIGESTS:
        r, sig = sign(env, tmp, ref, md, data)
        assert r.rc == 0, f"{group} {md}: keyx signing failed:\n{r!r}"
        assert verify(pub, md, data, sig), f"{group} {md}: the default provider rejects the signature"
        rr, ss = der_ecdsa_parts(sig.read_bytes())
        assert 0 < rr and 0 < ss
        # a signature over other data does not verify (the check can fail)
        other = tmp / "other.bin"
        other.write_bytes(data.read_bytes() + b"x")
        assert not verify(pub, md, other, sig), f"{group} {md}: verified over other data"
    # the keyx-persist key also signs by handle
    r, sig = sign(env, tmp, f"keyx:tpm:handle=0x{handle:08x}", "sha256", data)
    assert r.rc == 0 and verify(pub, "sha256", data, sig), r
    evs = sign_events(log)
    assert len(evs) == len(DIGESTS) + 1, evs
    assert all(e["backend"] == "tpm" and e["ok"] and e["alg"] == "EC" for e in evs), evs


def test_ecdsa_tpm2_sign_signature_verifies_the_same_way(tpm, keys, tmp):
    """tpm2_sign with the same key: its signature verifies with the same public key, like keyx's."""
    ref, pub, handle = keys["P-256"]
    data = data_file(tmp)
    theirs = tmp / "tpm2-sign.der"
    tpm.flush_transient()
    tpm.tools("tpm2_sign", "-c", f"0x{handle:x}", "-g", "sha256", "-s", "ecdsa", "-f", "plain",
              "-o", theirs, data)
    assert verify(pub, "sha256", data, theirs), "tpm2_sign's signature does not verify"
    r, mine = sign(keyx_env(tmp, tpm), tmp, ref, "sha256", data)
    assert r.rc == 0 and verify(pub, "sha256", data, mine), r
    assert mine.read_bytes() != theirs.read_bytes()  # ECDSA is randomized


# ---- RSA ----------------------------------------------------------------------------------------


def test_rsa_pkcs1_matches_tpm2_sign_byte_for_byte(tpm, keys, tmp):
    ref, pub, handle = keys["RSA"]
    env = keyx_env(tmp, tpm)
    data = data_file(tmp)
    for md in DIGESTS + ["sha1"]:
        r, sig = sign(env, tmp, ref, md, data)
        assert r.rc == 0, f"RSA PKCS#1 {md}:\n{r!r}"
        assert len(sig.read_bytes()) == 256
        assert verify(pub, md, data, sig), f"RSA PKCS#1 {md}: the default provider rejects it"
        theirs = tmp / f"tpm2-sign-{md}.bin"
        tpm.flush_transient()
        tpm.tools("tpm2_sign", "-c", f"0x{handle:x}", "-g", md, "-s", "rsassa", "-f", "plain",
                  "-o", theirs, data)
        assert sig.read_bytes() == theirs.read_bytes(), f"{md}: keyx and tpm2_sign differ"


def test_rsa_pss_salt_is_digest_length(tpm, keys, tmp):
    """swtpm 0.7 / libtpms 0.9 sign RSA-PSS with a salt as long as the digest: tpm2_sign's
    signatures verify with rsa_pss_saltlen:digest (an exact check) and not with a longer salt.
    keyx's PSS signatures (rsa_pss_saltlen:digest, as TLS 1.3 asks) verify the same way."""
    ref, pub, handle = keys["RSA"]
    env = keyx_env(tmp, tpm)
    data = data_file(tmp)
    for md in DIGESTS:
        theirs = tmp / f"tpm2-pss-{md}.bin"
        tpm.flush_transient()
        tpm.tools("tpm2_sign", "-c", f"0x{handle:x}", "-g", md, "-s", "rsapss", "-f", "plain",
                  "-o", theirs, data)
        pss = ["rsa_padding_mode:pss"]
        assert verify(pub, md, data, theirs, *pss, "rsa_pss_saltlen:digest"), md
        assert not verify(pub, md, data, theirs, *pss, "rsa_pss_saltlen:max"), md
        r, sig = sign(env, tmp, ref, md, data, *pss, "rsa_pss_saltlen:digest")
        assert r.rc == 0, f"RSA-PSS {md}:\n{r!r}"
        assert verify(pub, md, data, sig, *pss, "rsa_pss_saltlen:digest"), md
        r, sig2 = sign(env, tmp, ref, md, data, *pss, "rsa_pss_saltlen:digest", name="sig2.bin")
        assert r.rc == 0 and sig2.read_bytes() != sig.read_bytes()  # the salt is random
        # the salt length as a number
        n = {"sha256": 32, "sha384": 48, "sha512": 64}[md]
        r, sig = sign(env, tmp, ref, md, data, *pss, f"rsa_pss_saltlen:{n}")
        assert r.rc == 0 and verify(pub, md, data, sig, *pss, f"rsa_pss_saltlen:{n}"), r


# ---- TSS2 keys ----------------------------------------------------------------------------------


def test_tss2_key_from_tpm2_openssl_signs(tpm, tmp):
    """A TSS2 PRIVATE KEY made by tpm2-openssl (a signing key, no decrypt) signs through keyx;
    tpm2-openssl gives the public key."""
    tpm2o = base_env(TPM2OPENSSL_TCTI=tpm.tcti, LD_PRELOAD=None, ASAN_OPTIONS=None,
                     UBSAN_OPTIONS=None)
    env = keyx_env(tmp, tpm)
    data = data_file(tmp)
    for alg, opts, sigopts in [("EC", ["group:P-256"], []), ("RSA", ["bits:2048"], []),
                               ("RSA", ["bits:2048"], ["rsa_padding_mode:pss",
                                                       "rsa_pss_saltlen:digest"])]:
        key, pub = tmp / f"tss2-{alg}.pem", tmp / f"tss2-{alg}.pub"
        if not key.exists():
            tpm.flush_transient()
            args = ["genpkey", "-provider", "tpm2", "-provider", "base", "-algorithm", alg]
            for o in opts:
                args += ["-pkeyopt", o]
            r = openssl(*args, "-out", key, env=tpm2o)
            assert r.rc == 0, f"tpm2-openssl genpkey failed:\n{r!r}"
            assert "-----BEGIN TSS2 PRIVATE KEY-----" in key.read_text()
            openssl("pkey", "-provider", "tpm2", "-provider", "default", "-in", key, "-pubout",
                    "-out", pub, env=tpm2o).ok("tpm2-openssl public key")
        tpm.flush_transient()
        r, sig = sign(env, tmp, key, "sha256", data, *sigopts)
        assert r.rc == 0, f"TSS2 {alg} {sigopts}: keyx signing failed:\n{r!r}"
        assert verify(pub, "sha256", data, sig, *sigopts), f"TSS2 {alg} {sigopts}"


# ---- refusals -----------------------------------------------------------------------------------


def test_refusals_name_the_cause(tpm, keys, tmp):
    env = keyx_env(tmp, tpm)
    data = data_file(tmp)
    ref, pub, _ = keys["RSA"]
    # a PSS salt the TPM does not use, naming the TPM's salt: refused at init ("20"), or for
    # "max" and "auto" (which reads as "max" while parameters are being set) at the signature,
    # before any TPM command
    for salt in ("max", "20", "auto"):
        r, _ = sign(env, tmp, ref, "sha256", data, "rsa_padding_mode:pss", f"rsa_pss_saltlen:{salt}")
        assert r.rc != 0 and "TPM2_Sign chooses the salt itself and uses 32 bytes" in r.err, r
        assert "rsa_pss_saltlen:digest" in r.err, r
    # PSS's default salt, as the default provider signs: "auto" on OpenSSL 3.0, refused like it;
    # "auto-digestmax" since 3.1, the digest's length, which is the TPM's own salt
    r, sig = sign(env, tmp, ref, "sha256", data, "rsa_padding_mode:pss")
    if kxutil.openssl_version() < (3, 1):
        assert r.rc != 0 and "TPM2_Sign chooses the salt itself and uses 32 bytes" in r.err, r
    else:
        assert r.rc == 0 and verify(pub, "sha256", data, sig, "rsa_padding_mode:pss",
                                    "rsa_pss_saltlen:digest"), r
    # MGF1 with another digest
    r, _ = sign(env, tmp, ref, "sha256", data, "rsa_padding_mode:pss", "rsa_pss_saltlen:digest",
                "rsa_mgf1_md:sha384")
    assert r.rc != 0 and "TPM2_Sign always uses the message digest for MGF1" in r.err, r
    # a digest the TPM does not sign
    ec_ref = keys["P-256"][0]
    for md in ("sha3-256", "sha224"):
        r, _ = sign(env, tmp, ec_ref, md, data)
        assert r.rc != 0 and "this TPM does not sign" in r.err and "SHA256" in r.err, r


def test_ephemeral_key_cannot_sign(tpm, tmp):
    """An ephemeral TPM key (key agreement only, no sign attribute) is refused at init."""
    env = keyx_env(tmp, tpm)
    code = r"""
import ctypes, sys
L = ctypes.CDLL("libcrypto.so.3")
V = ctypes.c_void_p
L.EVP_PKEY_Q_keygen.restype = V
L.EVP_PKEY_Q_keygen.argtypes = [V, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
L.EVP_MD_CTX_new.restype = V
L.EVP_DigestSignInit_ex.argtypes = [V, V, ctypes.c_char_p, V, V, V, V]
L.ERR_print_errors_fp.argtypes = [V]
L.EVP_PKEY_free.argtypes = [V]
L.EVP_MD_CTX_free.argtypes = [V]
L.OPENSSL_init_crypto(ctypes.c_uint64(0x40), None)  # load openssl.cnf
k = L.EVP_PKEY_Q_keygen(None, None, b"EC", b"P-256")
assert k
m = L.EVP_MD_CTX_new()
ok = L.EVP_DigestSignInit_ex(m, None, b"SHA256", None, None, k, None)
print("init", ok)
libc = ctypes.CDLL(None)
libc.fdopen.restype = V
L.ERR_print_errors_fp(libc.fdopen(2, b"w"))
L.EVP_MD_CTX_free(m)
L.EVP_PKEY_free(k)
"""
    r = kxutil.run(["/usr/bin/python3", "-c", code], env=env)
    assert "init 1" not in r.out, r
    assert "init 0" in r.out, r
    assert "this TPM key cannot sign: it has no sign attribute" in r.err, r


def test_signing_only_persistent_key_loads_and_signs(tpm, tmp):
    """A persistent key made by tpm2_create for signing only (no decrypt) loads by handle and
    signs; ECDH with it is refused with a message."""
    h = SIGNONLY_HANDLE
    evict(tpm, h)
    tpm.flush_transient()
    tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256",
              "-c", tmp / "prim.ctx")
    tpm.tools("tpm2_create", "-Q", "-C", tmp / "prim.ctx", "-G", "ecc256:null", "-a",
              "sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
              "-u", tmp / "k.pub", "-r", tmp / "k.priv")
    tpm.flush_transient()
    tpm.tools("tpm2_load", "-Q", "-C", tmp / "prim.ctx", "-u", tmp / "k.pub", "-r", tmp / "k.priv",
              "-c", tmp / "k.ctx")
    tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", tmp / "k.ctx", f"0x{h:x}")
    tpm.flush_transient()
    pub = tmp / "so.pub.pem"
    tpm.tools("tpm2_readpublic", "-c", f"0x{h:x}", "-f", "pem", "-o", pub)
    env = keyx_env(tmp, tpm)
    data = data_file(tmp)
    uri = f"keyx:tpm:handle=0x{h:08x}"
    r, sig = sign(env, tmp, uri, "sha384", data)
    assert r.rc == 0 and verify(pub, "sha384", data, sig), r
    peer = tmp / "peer.pem"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", peer,
            env=base_env()).ok()
    openssl("pkey", "-in", peer, "-pubout", "-out", tmp / "peer.pub", env=base_env()).ok()
    r = openssl("pkeyutl", "-derive", "-inkey", uri, "-peerkey", tmp / "peer.pub", "-out",
                tmp / "z.bin", env=env)
    assert r.rc != 0 and "cannot do key agreement" in r.err, r
    evict(tpm, h)


# ---- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    d = tmp_path_factory.mktemp("sign-ca")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", d / "ca.key", "-out", d / "ca.crt", "-subj", "/CN=keyx test CA", "-days", "2", *kxutil.CA_EXTENSIONS,
            env=base_env()).ok("CA")
    return d / "ca.crt", d / "ca.key"


def tpm_cert(tmp, ca, pub, name):
    crt = tmp / f"{name}.crt"
    openssl("x509", "-new", "-force_pubkey", pub, "-CA", ca[0], "-CAkey", ca[1], "-subj",
            "/CN=localhost", "-days", "2", "-out", crt, env=base_env()).ok("cert for the TPM key")
    return crt


TLS_CASES = [(k, v, None) for k in ("P-256", "RSA") for v in ("TLSv1.3", "TLSv1.2")] + [
    ("P-384", "TLSv1.3", "ECDSA+SHA384"), ("RSA", "TLSv1.2", "RSA+SHA256"),
    ("RSA", "TLSv1.3", "rsa_pss_rsae_sha512")]


@pytest.mark.parametrize("key,version,sigalgs", TLS_CASES)
def test_tls_server_with_tpm_certificate_key(tpm, keys, ca, s_server, s_client, tmp, key, version,
                                             sigalgs):
    ref, pub, _ = keys[key]
    crt = tpm_cert(tmp, ca, pub, key)
    log = tmp / "audit.jsonl"
    env = keyx_env(tmp, tpm, **{"audit-log": log})
    srv = s_server(["-cert", crt, "-key", ref], env)
    if version == "TLSv1.3":
        args = ["-tls1_3", "-groups", "P-256"]
    else:
        args = ["-tls1_2", "-groups", "P-256", "-cipher",
                "ECDHE-ECDSA-AES128-GCM-SHA256" if key == "P-256" else "ECDHE-RSA-AES128-GCM-SHA256"]
    if sigalgs:
        args += ["-sigalgs", sigalgs]
    cli = s_client(srv.port, [*args, "-CAfile", ca[0], "-verify_return_error", "-verify", "1"],
                   base_env())
    out = srv.wait()
    assert cli.rc == 0, f"client:\n{cli!r}\nserver:\n{out}"
    assert f"Protocol  : {version}" in cli.out or f"New, {version}" in cli.out, cli.out
    assert "Verify return code: 0 (ok)" in cli.out, cli.out
    if key == "RSA" and (version == "TLSv1.3" or sigalgs is None):
        assert kxutil.peer_signature(cli.out) == "RSA-PSS", cli.out
    if sigalgs == "RSA+SHA256":  # PKCS#1 v1.5 in TLS 1.2
        assert kxutil.peer_signature(cli.out) == "RSA" and "Peer signing digest: SHA256" in cli.out, cli.out
    if sigalgs == "rsa_pss_rsae_sha512":
        assert "Peer signing digest: SHA512" in cli.out, cli.out
    if sigalgs == "ECDSA+SHA384":
        assert "Peer signing digest: SHA384" in cli.out, cli.out
    events = [e for e in sign_events(log) if e["pid"] == srv.pid]
    assert len(events) == 1 and events[0]["ok"] and events[0]["backend"] == "tpm", events


# ---- authorization and bus ----------------------------------------------------------------------

SIGN_CC = b"\x00\x00\x01\x5d"  # TPM2_CC_Sign
PARENT_RSA = 0x81000065


@pytest.mark.parametrize("mode", ["keyx-session", "password", "esys-session"])
def test_one_tpm2_sign_per_signature_authorized_as_configured(tpm, keys, tmp, mode):
    """Each signature is exactly one TPM2_Sign on the bus, authorized by keyx's salted HMAC
    session (default), by the empty password (tpm-encrypt-sessions = 0), or by ESYS's session
    (an RSA tpm-parent keyx cannot salt its own session with)."""
    ref, pub, handle = keys["P-256"]
    pcap = tmp / "tpm.pcap"
    env = keyx_env(tmp, tpm)
    env["KEYX_TPM_TCTI"] = f"pcap:{tpm.tcti}"
    env["TCTI_PCAP_FILE"] = str(pcap)
    if mode == "password":
        env["KEYX_TPM_ENCRYPT_SESSIONS"] = "0"
    if mode == "esys-session":
        if f"0x{PARENT_RSA:x}" not in tpm.tools("tpm2_getcap", "handles-persistent").out.lower():
            tpm.flush_transient()
            tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-G", "rsa2048", "-c", tmp / "srk.ctx")
            tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", tmp / "srk.ctx",
                      f"0x{PARENT_RSA:x}")
            tpm.flush_transient()
        env["KEYX_TPM_PARENT"] = f"0x{PARENT_RSA:x}"
    data = data_file(tmp)
    for md in ("sha256", "sha512"):
        r, sig = sign(env, tmp, ref, md, data)
        assert r.rc == 0 and verify(pub, md, data, sig), r
    raw = pcap.read_bytes()
    # tag (sessions) | size | command code | key handle | auth area size | session handle
    calls = re.findall(rb"\x80\x02.{4}" + SIGN_CC + rb"(.{4}).{4}(.{4})", raw, re.S)
    assert len(calls) == 2, f"{len(calls)} TPM2_Sign commands for 2 signatures"
    for key, sess in calls:
        assert key == handle.to_bytes(4, "big"), key.hex()
        if mode == "password":
            assert sess == b"\x40\x00\x00\x09", sess.hex()  # TPM2_RS_PW
        else:
            assert sess[0] == 0x02, f"not an HMAC session: {sess.hex()}"


# ---- TPM restart and loss -----------------------------------------------------------------------

# One process (its own library context from openssl.cnf) that loads a key file and signs sha256
# digests of stdin lines, one signature per line: "sig <hex>" or "err <errors>".
SIGNER = kxutil.LIBCRYPTO_CTYPES + r"""
md_new = fn("EVP_MD_CTX_new", c_void_p)
md_free = fn("EVP_MD_CTX_free", None, c_void_p)
ds_init = fn("EVP_DigestSignInit_ex", c_int, c_void_p, c_void_p, c_char_p, c_void_p, c_char_p, c_void_p, c_void_p)
ds = fn("EVP_DigestSign", c_int, c_void_p, c_char_p, POINTER(c_size_t), c_char_p, c_size_t)
get_err = fn("ERR_get_error_all", ctypes.c_ulong, POINTER(c_char_p), POINTER(c_int), POINTER(c_char_p), POINTER(c_char_p), POINTER(c_int))
def errors():
    msgs = []
    while True:
        f, l, func, data, flags = c_char_p(), c_int(), c_char_p(), c_char_p(), c_int()
        if not get_err(byref(f), byref(l), byref(func), byref(data), byref(flags)): break
        msgs.append(data.value.decode() if data.value else "")
    return " | ".join(msgs)
cnf, keyfile = sys.argv[1:3]
ctx = LIB_new()
assert LIB_load(ctx, cnf.encode()) == 1, errors()
b = bio_file(keyfile.encode(), b"rb")
key = read_pem(b, None, None, None, ctx, None)
bio_free(b)
assert key, errors()
print("loaded", flush=True)
for line in sys.stdin:
    data = line.strip().encode()
    m = md_new()
    if data == b"init":  # EVP_DigestSignInit alone (what TLS does before it has data)
        print("init", ds_init(m, None, b"SHA256", ctx, None, key, None), flush=True)
        md_free(m)
        continue
    buf = ctypes.create_string_buffer(1024)
    n = c_size_t(len(buf))
    if ds_init(m, None, b"SHA256", ctx, None, key, None) == 1 and ds(m, buf, byref(n), data, len(data)) == 1:
        print("sig", buf.raw[:n.value].hex(), flush=True)
    else:
        print("err", errors(), flush=True)
    md_free(m)
pkey_free(key)
LIB_free(ctx)
"""


def test_sign_across_tpm_restart_and_loss(swtpm_factory, tmp):
    """One process: a signature; swtpm restarted silently (the persistent key is found again on
    a new connection): the next signature works; swtpm killed: a clear error naming the TCTI
    within 5 seconds; swtpm back: signing works again, without restarting the application."""
    import subprocess
    import time
    t = swtpm_factory()
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", t))
    ref, pub, _ = make_key(t, tmp, env, 0x81000066, "EC", ["-pkeyopt", "group:P-256"])
    app = tmp / "signer.py"
    app.write_text(SIGNER)
    p = subprocess.Popen(["/usr/bin/python3", str(app), str(tmp / "openssl.cnf"), str(ref)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=base_env(), text=True, start_new_session=True)

    def one(i):
        msg = f"message {i} {os.urandom(8).hex()}"
        p.stdin.write(msg + "\n")
        p.stdin.flush()
        start = time.monotonic()
        kind, _, rest = p.stdout.readline().strip().partition(" ")
        took = time.monotonic() - start
        if kind == "sig":
            (tmp / "d.txt").write_text(msg)
            (tmp / "s.der").write_bytes(bytes.fromhex(rest))
            assert verify(pub, "sha256", tmp / "d.txt", tmp / "s.der"), f"signature {i} is wrong"
        return kind, rest, took

    try:
        assert p.stdout.readline().strip() == "loaded"
        assert one(0)[0] == "sig"
        t.restart()
        assert one(1)[0] == "sig", "first signature after a TPM restart"
        t.kill()
        kind, err, took = one(2)
        assert kind == "err" and t.tcti in err, err
        assert took < 5, f"the failed signature took {took:.1f}s"
        t.start()
        kind, err, _ = one(3)
        assert kind == "sig", f"signing after swtpm came back: {err}"
        p.stdin.close()
        assert p.wait(30) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            kxutil.kill_group(p)


def test_sign_init_sends_no_tpm_command(tpm, keys, tmp):
    """sign_check decides from cached facts: 50 EVP_DigestSignInit calls after the key is loaded
    and has signed once send nothing to the TPM (pcap TCTI); the next signature is one TPM2_Sign."""
    import subprocess
    ref, pub, _ = keys["P-256"]
    pcap = tmp / "tpm.pcap"
    env = base_env(KEYX_TPM_TCTI=f"pcap:{tpm.tcti}", TCTI_PCAP_FILE=str(pcap))
    tpm_cnf(tmp / "openssl.cnf", tpm)
    app = tmp / "signer.py"
    app.write_text(SIGNER)
    p = subprocess.Popen(["/usr/bin/python3", str(app), str(tmp / "openssl.cnf"), str(ref)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, text=True, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "loaded"
        p.stdin.write("first\n")
        p.stdin.flush()
        assert p.stdout.readline().startswith("sig "), "first signature"
        before = pcap.stat().st_size
        # the capture is written as commands go (else the comparison below would prove nothing)
        assert SIGN_CC in re.findall(rb"\x80[\x01\x02].{4}(.{4})", pcap.read_bytes(), re.S)
        for _ in range(50):
            p.stdin.write("init\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "init 1"
        assert pcap.stat().st_size == before, "EVP_DigestSignInit sent TPM commands"
        p.stdin.write("second\n")
        p.stdin.flush()
        assert p.stdout.readline().startswith("sig "), "second signature"
        p.stdin.close()
        assert p.wait(30) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            kxutil.kill_group(p)
    raw = pcap.read_bytes()[before:]
    cmds = re.findall(rb"\x80[\x01\x02].{4}(.{4})", raw, re.S)
    assert SIGN_CC in cmds, "no TPM2_Sign after the inits"
