"""Long-lived TPM keys from the openssl tool (TPM side): `genpkey -pkeyopt keyx-persist:`
makes a persistent key (TPM2_Create, Load, EvictControl), used by handle and by key reference
file; TSS2 PRIVATE KEY files made by Debian's tpm2-openssl load as TPM keys.

Every secret is checked against an independent implementation: tpm2-tools (tpm2_ecdhzgen), the
default provider (the peer's private key with the TPM key's public key; OAEP encryption to
tpm2_readpublic's key) and tpm2-openssl itself. The tests run on a private swtpm (their handles do
not meet test_tpm_persistent.py's on the session one).
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

import kxutil
from fixture_swtpm import Swtpm, tpm_cnf
from kxutil import base_env, openssl

FIELD = {"P-256": 32, "P-384": 48, "P-521": 66}
ECC_SRK = ("restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda")


@pytest.fixture(scope="module")
def tpm(tmp_path_factory):
    t = Swtpm(tmp_path_factory.mktemp("swtpm-keyfiles")).start()
    yield t
    t.kill()


def keyx_env(tmp, tpm, name="openssl.cnf", **keyx):
    return base_env(OPENSSL_CONF=tpm_cnf(tmp / name, tpm, keyx=keyx or None))


def tpm2_openssl_env(tpm):
    """tpm2-openssl on the same swtpm (the independent side: no sanitizer preload)."""
    return base_env(TPM2OPENSSL_TCTI=tpm.tcti, LD_PRELOAD=None, ASAN_OPTIONS=None,
                    UBSAN_OPTIONS=None)


def persistent_handles(tpm):
    return set(re.findall(r"0x[0-9a-f]+", tpm.tools("tpm2_getcap", "handles-persistent").out.lower()))


def evict(tpm, handle):
    if f"0x{handle:x}" in persistent_handles(tpm):
        tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", f"0x{handle:x}")


def genpkey_persist(env, out, alg, handle, *opts):
    args = ["genpkey", "-algorithm", alg]
    if alg == "EC":
        args += ["-pkeyopt", f"group:{opts[0]}"]
        opts = opts[1:]
    for o in opts:
        args += ["-pkeyopt", o]
    args += ["-pkeyopt", "keyx-backend:tpm", "-pkeyopt", f"keyx-persist:0x{handle:08x}"]
    if out is not None:
        args += ["-out", out]
    return openssl(*args, env=env)


def peer_point(tmp, group, name):
    """A fresh peer key pair (default provider): private PEM, public PEM and the
    TPM2B_ECC_POINT file tpm2_ecdhzgen reads."""
    priv, pub, der = tmp / f"{name}.pem", tmp / f"{name}.pub", tmp / f"{name}.der"
    env = base_env()
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", f"group:{group}", "-out", priv,
            env=env).ok("peer key (default provider)")
    openssl("pkey", "-in", priv, "-pubout", "-out", pub, env=env).ok("peer public key")
    openssl("pkey", "-in", priv, "-pubout", "-outform", "DER", "-out", der, env=env).ok("peer DER")
    point = der.read_bytes()[-(1 + 2 * FIELD[group]):]  # SPKI ends with the uncompressed point
    assert point[0] == 4
    n = FIELD[group]
    body = n.to_bytes(2, "big") + point[1:1 + n] + n.to_bytes(2, "big") + point[1 + n:]
    pt = tmp / f"{name}.point"
    pt.write_bytes(len(body).to_bytes(2, "big") + body)
    return priv, pub, pt


def ecdhzgen(tpm, tmp, key, point, group):
    z = tmp / "zgen.bin"
    tpm.tools("tpm2_ecdhzgen", "-c", key, "-u", point, "-o", z)
    raw = z.read_bytes()  # TPM2B_ECC_POINT: size, x.size, x, y.size, y
    xlen = int.from_bytes(raw[2:4], "big")
    return raw[4:4 + xlen].rjust(FIELD[group], b"\0")


def derive(env, tmp, inkey, peer, *extra):
    out = tmp / "secret.bin"
    if out.exists():
        out.unlink()
    r = openssl("pkeyutl", "-derive", *extra, "-inkey", inkey, "-peerkey", peer, "-out", out, env=env)
    assert r.rc == 0, f"derive with {inkey} failed:\n{r!r}"
    return out.read_bytes()


def oaep_encrypt(tmp, pubkey, msg):
    """The default provider encrypts msg to pubkey with RSA-OAEP-SHA256."""
    (tmp / "msg.bin").write_bytes(msg)
    ct = tmp / "ct.bin"
    openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", pubkey, "-in", tmp / "msg.bin", "-out", ct,
            "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256",
            env=base_env()).ok("OAEP encryption (default provider)")
    return ct


def oaep_decrypt(env, tmp, inkey, ct, *extra):
    out = tmp / "plain.bin"
    if out.exists():
        out.unlink()
    r = openssl("pkeyutl", "-decrypt", *extra, "-inkey", inkey, "-in", ct, "-out", out,
                "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256", env=env)
    assert r.rc == 0, f"decrypt with {inkey} failed:\n{r!r}"
    return out.read_bytes()


def readpublic(tpm, tmp, handle):
    pem = tmp / f"tpm-{handle:x}.pem"
    r = tpm.tools("tpm2_readpublic", "-c", f"0x{handle:x}", "-f", "pem", "-o", pem)
    return r.out, pem


# An application reading a private key file with PEM_read_bio_PrivateKey_ex (PEM) or
# d2i_PrivateKey_ex_bio (DER) in its own library context (openssl.cnf argv[1]), then deriving with
# a peer's public key, decrypting RSA-OAEP-SHA256 or decapsulating RSASVE; the result goes to a
# file, never to output.
APP = kxutil.LIBCRYPTO_CTYPES + r"""
read_der = fn("d2i_PrivateKey_ex_bio", c_void_p, c_void_p, c_void_p, c_void_p, c_char_p)
read_pub = fn("PEM_read_bio_PUBKEY_ex", c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_char_p)
dec_init = fn("EVP_PKEY_decrypt_init", c_int, c_void_p)
set_pad = fn("EVP_PKEY_CTX_set_rsa_padding", c_int, c_void_p, c_int)
set_md = fn("EVP_PKEY_CTX_set_rsa_oaep_md_name", c_int, c_void_p, c_char_p, c_char_p)
decrypt = fn("EVP_PKEY_decrypt", c_int, c_void_p, c_char_p, POINTER(c_size_t), c_char_p, c_size_t)
decap_init = fn("EVP_PKEY_decapsulate_init", c_int, c_void_p, c_void_p)
kem_op = fn("EVP_PKEY_CTX_set_kem_op", c_int, c_void_p, c_char_p)
decap = fn("EVP_PKEY_decapsulate", c_int, c_void_p, c_char_p, POINTER(c_size_t), c_char_p, c_size_t)
write_pem = fn("PEM_write_bio_PrivateKey", c_int, c_void_p, c_void_p, c_void_p, c_char_p, c_int, c_void_p, c_void_p)
get_err = fn("ERR_get_error_all", ctypes.c_ulong, POINTER(c_char_p), POINTER(c_int), POINTER(c_char_p), POINTER(c_char_p), POINTER(c_int))
def fail(stage):
    msgs = []
    while True:
        f, l, func, data, flags = c_char_p(), c_int(), c_char_p(), c_char_p(), c_int()
        e = get_err(byref(f), byref(l), byref(func), byref(data), byref(flags))
        if not e: break
        msgs.append(f"{func.value.decode() if func.value else ''}:{data.value.decode() if data.value else ''}")
    print(f"err {stage}: " + " | ".join(msgs), file=sys.stderr)
    # a clean exit: keyx flushes what it holds in the TPM when its library context goes
    # (without a resource manager nothing else would)
    for k in held:
        pkey_free(k)
    LIB_free(ctx)
    sys.exit(1)
held = []
cnf, mode, keyfile, arg, out = sys.argv[1:6]
ctx = LIB_new()
if LIB_load(ctx, cnf.encode()) != 1: fail("config")
b = bio_file(keyfile.encode(), b"rb")
key = (read_der(b, None, ctx, None) if keyfile.endswith(".der")
       else read_pem(b, None, None, None, ctx, None))
bio_free(b)
if not key: fail("read key")
held.append(key)
print("provider", prov_name(get_prov(key)).decode())
c = CTX_pkey(ctx, key, None)
buf = ctypes.create_string_buffer(1024)
n = c_size_t(len(buf))
if mode in ("derive", "derive2"):
    b = bio_file(arg.encode(), b"rb")
    peer = read_pub(b, None, None, None, ctx, None)
    bio_free(b)
    held.append(peer)
    if not peer or d_init(c) != 1 or d_peer(c, peer) != 1 or d_derive(c, buf, byref(n)) != 1:
        fail("derive")
    if mode == "derive2":  # derive again with the same key once told to (stdin)
        open(out + ".1", "wb").write(buf.raw[:n.value])
        print("ready", flush=True)
        sys.stdin.readline()
        n = c_size_t(len(buf))
        if d_derive(c, buf, byref(n)) != 1:
            fail("second derive")
elif mode == "write":
    b = bio_file(out.encode(), b"wb")
    if write_pem(b, key, None, None, 0, None, None) != 1: fail("write key")
    bio_free(b)
    sys.exit(0)
elif mode == "decap":
    ct = open(arg, "rb").read()
    if (decap_init(c, None) != 1 or kem_op(c, b"RSASVE") != 1
            or decap(c, buf, byref(n), ct, len(ct)) != 1):
        fail("decapsulate")
else:
    ct = open(arg, "rb").read()
    if (dec_init(c) != 1 or set_pad(c, 4) != 1 or set_md(c, b"SHA256", None) != 1
            or decrypt(c, buf, byref(n), ct, len(ct)) != 1):
        fail("decrypt")
open(out, "wb").write(buf.raw[:n.value])
CTX_free(c)
for k in held:
    pkey_free(k)
LIB_free(ctx)
"""


def app(env, tmp, mode, keyfile, arg):
    """(result bytes, Result) of APP: mode derive (arg: peer public PEM), decrypt or decap (arg:
    the ciphertext file); the openssl.cnf is env's."""
    script = tmp / "app.py"
    script.write_text(APP)
    out = tmp / "app.out"
    if out.exists():
        out.unlink()
    r = kxutil.run(["/usr/bin/python3", script, env["OPENSSL_CONF"], mode, keyfile, arg, out],
                   env=env)
    return (out.read_bytes() if r.rc == 0 else None), r


def app_ok(env, tmp, mode, keyfile, arg):
    got, r = app(env, tmp, mode, keyfile, arg)
    assert r.rc == 0 and "provider keyx" in r.out, f"application {mode} with {keyfile}:\n{r!r}"
    return got


# ---- keyx-persist -----------------------------------------------------------------------------


@pytest.mark.parametrize("group,handle", [("P-256", 0x81000020), ("P-384", 0x81000021),
                                          ("P-521", 0x81000026)], ids=["P-256", "P-384", "P-521"])
def test_persist_ec(tpm, tmp, group, handle):
    evict(tpm, handle)
    log = tmp / "audit.jsonl"
    env = keyx_env(tmp, tpm, **{"audit-log": log})
    ref = tmp / "ref.pem"
    genpkey_persist(env, ref, "EC", handle, group).ok("genpkey keyx-persist")
    assert f"0x{handle:x}" in persistent_handles(tpm), "the process exit evicted the key"
    info, tpm_pub = readpublic(tpm, tmp, handle)
    attrs = re.search(r"attributes:\s*\n\s*value: (\S+)", info).group(1).split("|")
    assert set(attrs) == {"fixedtpm", "fixedparent", "sensitivedataorigin", "userwithauth", "noda",
                          "decrypt", "sign"}, info
    assert re.search(r"scheme:\s*\n\s*value: null", info), info
    text = ref.read_text()
    assert "-----BEGIN KEYX KEY-----" in text and "PRIVATE" not in text, text

    uri = f"keyx:tpm:handle=0x{handle:08x}"
    for i in range(2):
        priv, pub, point = peer_point(tmp, group, f"peer{i}")
        want = ecdhzgen(tpm, tmp, f"0x{handle:x}", point, group)
        # the default provider, with the peer's private key and the TPM's public key, agrees too
        assert derive(base_env(), tmp, priv, tpm_pub) == want
        assert derive(env, tmp, uri, pub) == want, f"{group}: keyx by handle and tpm2_ecdhzgen differ"
        assert app_ok(env, tmp, "derive", ref, pub) == want, f"{group}: by reference file differs"
        assert derive(env, tmp, ref, pub) == want, f"{group}: -inkey reference file differs"
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    gens = [e for e in events if e["event"] == "keygen"]
    assert [(e["backend"], e["ephemeral"], e["ok"], e["group"]) for e in gens] == [
        ("tpm", False, True, group)], gens
    assert f"0x{handle:x}" in persistent_handles(tpm)
    assert not tpm.tools("tpm2_getcap", "handles-transient").out.strip()


def test_persist_rsa(tpm, tmp):
    handle = 0x81000022
    evict(tpm, handle)
    env = keyx_env(tmp, tpm)
    ref = tmp / "rsa-ref.pem"
    genpkey_persist(env, ref, "RSA", handle, "rsa_keygen_bits:2048").ok("genpkey RSA keyx-persist")
    info, tpm_pub = readpublic(tpm, tmp, handle)
    attrs = re.search(r"attributes:\s*\n\s*value: (\S+)", info).group(1).split("|")
    assert {"sign", "decrypt", "noda", "fixedtpm", "fixedparent"} <= set(attrs), info
    assert "rsa" in info and re.search(r"bits: 2048", info), info
    msg = os.urandom(32)
    ct = oaep_encrypt(tmp, tpm_pub, msg)
    assert oaep_decrypt(env, tmp, f"keyx:tpm:handle=0x{handle:08x}", ct) == msg
    assert app_ok(env, tmp, "decrypt", ref, ct) == msg
    assert oaep_decrypt(env, tmp, ref, ct) == msg
    assert f"0x{handle:x}" in persistent_handles(tpm)


def test_persist_handle_in_use_is_never_overwritten(tpm, tmp):
    handle = 0x81000023
    evict(tpm, handle)
    env = keyx_env(tmp, tpm)
    genpkey_persist(env, tmp / "first.pem", "EC", handle, "P-256").ok("first key")
    before, _ = readpublic(tpm, tmp, handle)
    r = genpkey_persist(env, tmp / "second.pem", "EC", handle, "P-256")
    assert r.rc != 0, r
    assert (f"persistent handle 0x{handle:08X} is already in use" in r.err
            and f"tpm2_evictcontrol -C o -c 0x{handle:08X}" in r.err), r
    after, _ = readpublic(tpm, tmp, handle)
    assert before == after, "the key at the handle changed"
    assert not (tmp / "second.pem").exists() or not (tmp / "second.pem").read_text()


def test_persist_refusals(tpm, tmp):
    env = keyx_env(tmp, tpm)
    r = genpkey_persist(env, None, "EC", 0x81800020, "P-256")
    assert r.rc != 0 and "keyx-persist:0x81800020 is not an owner persistent handle" in r.err, r
    r = openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt",
                "keyx-persist:0x01000000", env=env)
    assert r.rc != 0 and "expected a TPM persistent handle 0x81000000..0x81FFFFFF" in r.err, r
    r = genpkey_persist(env, None, "X25519", 0x81000024)
    assert r.rc != 0 and "the tpm backend cannot generate X25519" in r.err, r
    r = openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt",
                "keyx-persist:0x81000024", "-pkeyopt", "keyx-label:srv", env=env)
    assert r.rc != 0 and "keyx-persist and keyx-label cannot be combined" in r.err, r
    assert "0x81000024" not in persistent_handles(tpm)
    assert "0x81800020" not in persistent_handles(tpm)


def test_ephemeral_key_has_no_locator(tpm, tmp):
    """A key reference file needs a key that outlives the process."""
    env = keyx_env(tmp, tpm)
    r = openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt",
                "keyx-backend:tpm", "-out", tmp / "eph.pem", env=env)
    assert r.rc != 0, r
    assert ("ephemeral TPM key has no locator; generate it with keyx-persist to keep it"
            in r.err), r


def test_persistent_key_survives_and_reference_names_it(tpm, tmp):
    """The reference file of a keyx-persist key loads in a new process; evicted, it names the
    key that is gone."""
    handle = 0x81000025
    evict(tpm, handle)
    env = keyx_env(tmp, tpm)
    ref = tmp / "ref.pem"
    genpkey_persist(env, ref, "EC", handle, "P-256").ok("genpkey")
    _, pub, point = peer_point(tmp, "P-256", "peer")
    want = ecdhzgen(tpm, tmp, f"0x{handle:x}", point, "P-256")
    assert app_ok(env, tmp, "derive", ref, pub) == want
    evict(tpm, handle)
    got, r = app(env, tmp, "derive", ref, pub)
    assert got is None and f"no persistent key at handle 0x{handle:08X}" in r.err, r
    assert "esys" not in r.err.lower(), r  # keyx's message only, no ESYS error log


# ---- TSS2 PRIVATE KEY files -------------------------------------------------------------------


def tpm2_openssl_genpkey(tpm, out, alg, *opts):
    tpm.flush_transient()  # tpm2-openssl needs two free slots and reclaims none
    args = ["genpkey", "-provider", "tpm2", "-provider", "base", "-algorithm", alg]
    for o in opts:
        args += ["-pkeyopt", o]
    args += ["-out", out]
    r = openssl(*args, env=tpm2_openssl_env(tpm))
    assert r.rc == 0, f"tpm2-openssl genpkey failed (Debian package tpm2-openssl):\n{r!r}"
    assert "-----BEGIN TSS2 PRIVATE KEY-----" in Path(out).read_text()
    return out


def tpm2_openssl_pubkey(tpm, key, out):
    openssl("pkey", "-provider", "tpm2", "-provider", "default", "-in", key, "-pubout", "-out", out,
            env=tpm2_openssl_env(tpm)).ok("tpm2-openssl public key")
    return out


def pem_to_der(pem, der):
    import base64
    body = "".join(l for l in Path(pem).read_text().splitlines() if not l.startswith("-----"))
    Path(der).write_bytes(base64.b64decode(body))
    return der


def test_tss2_ec_key_from_tpm2_openssl(tpm, tmp):
    key = tpm2_openssl_genpkey(tpm, tmp / "k.pem", "EC", "group:P-256")
    kpub = tpm2_openssl_pubkey(tpm, key, tmp / "k.pub")
    log = tmp / "audit.jsonl"
    env = keyx_env(tmp, tpm, **{"audit-log": log})
    der = pem_to_der(key, tmp / "k.der")
    for i in range(2):
        priv, pub, _ = peer_point(tmp, "P-256", f"peer{i}")
        theirs = derive(tpm2_openssl_env(tpm), tmp, key, pub, "-provider", "tpm2", "-provider",
                        "default", "-propquery", "?provider=tpm2")
        independent = derive(base_env(), tmp, priv, kpub)
        assert theirs == independent, "tpm2-openssl and the default provider disagree"
        assert app_ok(env, tmp, "derive", key, pub) == independent, "keyx's secret differs"
        assert app_ok(env, tmp, "derive", der, pub) == independent, "DER form differs"
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    assert [(e["backend"], e["ephemeral"]) for e in events if e["event"] == "derive"] == [
        ("tpm", False)] * 4, events
    # Transient objects only: nothing made persistent, nothing left loaded.
    assert not tpm.tools("tpm2_getcap", "handles-transient").out.strip()


def test_tss2_key_with_openssl_inkey(tpm, tmp):
    """`openssl pkeyutl -inkey k.pem` reads files through OpenSSL's file: STORE (the default
    provider's), which takes keys by reference only from keymgmts of its own provider."""
    key = tpm2_openssl_genpkey(tpm, tmp / "k.pem", "EC", "group:P-256")
    kpub = tpm2_openssl_pubkey(tpm, key, tmp / "k.pub")
    priv, pub, _ = peer_point(tmp, "P-256", "peer")
    # keyx configured (backends = tpm) but loaded by the command line, as the issue shows it
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "cli.cnf", tpm, prefer=False, activate_keyx=False,
                                        default=False))
    assert derive(env, tmp, key, pub, "-provider", "keyx", "-provider", "default") == derive(
        base_env(), tmp, priv, kpub)
    env = keyx_env(tmp, tpm)
    mine = tmp / "mine.pub"
    openssl("pkey", "-in", key, "-pubout", "-out", mine, env=env).ok("keyx public key")
    assert mine.read_text() == kpub.read_text()
    der = pem_to_der(key, tmp / "k.der")
    assert derive(env, tmp, der, pub, "-keyform", "DER") == derive(base_env(), tmp, priv, kpub)


def test_tss2_rsa_key_from_tpm2_openssl(tpm, tmp):
    key = tpm2_openssl_genpkey(tpm, tmp / "r.pem", "RSA", "bits:2048")
    kpub = tpm2_openssl_pubkey(tpm, key, tmp / "r.pub")
    env = keyx_env(tmp, tpm)
    msg = os.urandom(24)
    ct = oaep_encrypt(tmp, kpub, msg)
    assert app_ok(env, tmp, "decrypt", key, ct) == msg
    assert oaep_decrypt(env, tmp, key, ct) == msg  # openssl pkeyutl -decrypt -inkey r.pem


def test_tss2_key_with_password_is_refused(tpm, tmp):
    key = tpm2_openssl_genpkey(tpm, tmp / "a.pem", "EC", "group:P-256", "user-auth:x")
    _, pub, _ = peer_point(tmp, "P-256", "peer")
    got, r = app(keyx_env(tmp, tpm), tmp, "derive", key, pub)
    assert got is None and "this TSS2 key has a password (its emptyAuth flag is not set)" in r.err, r


@pytest.mark.parametrize("form", ["PEM", "DER"])
def test_tss2_refusal_reaches_the_audit_log_through_openssl_inkey(tpm, tmp, form):
    """openssl -inkey FILE reads through OpenSSL 3.0's file: store, which drops a decoder's
    errors: keyx's PEM decoder (for PEM) or DER decoder (for DER) raises the reason again, so the
    tool prints it, once; it is in the audit log's load event too, and the key was tried once."""
    key = tpm2_openssl_genpkey(tpm, tmp / "a.pem", "EC", "group:P-256", "user-auth:x")
    if form == "DER":
        key = pem_to_der(key, tmp / "a.der")
    _, pub, _ = peer_point(tmp, "P-256", "peer")
    log = tmp / "audit.jsonl"
    r = openssl("pkeyutl", "-derive", "-inkey", key, "-keyform", form, "-peerkey", pub,
                env=keyx_env(tmp, tpm, **{"audit-log": log}))
    assert r.rc != 0, r
    assert r.err.count("this TSS2 key has a password (its emptyAuth flag is not set)") == 1, r
    assert "TSS2 key file: the key could not be loaded into the TPM" in r.err, r
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    loads = [e for e in events if e["event"] == "load"]
    assert len(loads) == 1 and loads[0]["backend"] == "tpm" and loads[0]["ok"] is False, (r.err, events)
    assert "this TSS2 key has a password (its emptyAuth flag is not set)" in loads[0]["error"], loads


def test_tss2_key_has_no_locator(tpm, tmp):
    key = tpm2_openssl_genpkey(tpm, tmp / "k.pem", "EC", "group:P-256")
    got, r = app(keyx_env(tmp, tpm), tmp, "write", key, "-")
    assert r.rc != 0 and "a key loaded from a TSS2 key file has no locator" in r.err, r


def test_tss2_key_of_another_tpm(tpm, swtpm_factory, tmp):
    key = tpm2_openssl_genpkey(tpm, tmp / "k.pem", "EC", "group:P-256")
    other = swtpm_factory()
    _, pub, _ = peer_point(tmp, "P-256", "peer")
    got, r = app(keyx_env(tmp, other), tmp, "derive", key, pub)
    assert got is None and "this TPM cannot load the TSS2 key under its parent 0x40000001" in r.err, r


# TSS2 files written here from tpm2-tools objects (tpm2_create's TPM2B_PUBLIC / TPM2B_PRIVATE):
# a persistent parent, a sign-only key, other object types.


def _der(tag, body):
    n = len(body)
    if n < 0x80:
        ln = bytes([n])
    else:
        b = n.to_bytes((n.bit_length() + 7) // 8, "big")
        ln = bytes([0x80 | len(b)]) + b
    return bytes([tag]) + ln + body


def tss2_der(pub, priv, parent, empty_auth=True, oid=b"\x67\x81\x05\x0a\x01\x03", policy=False,
             description=None, rsa_parent=None):
    p = parent.to_bytes(5, "big").lstrip(b"\0")
    if p[0] & 0x80:
        p = b"\0" + p
    body = _der(0x06, oid)
    if empty_auth is not None:
        body += _der(0xA0, _der(0x01, b"\xff" if empty_auth else b"\0"))
    if policy:
        body += _der(0xA1, _der(0x30, _der(0x30, _der(0xA0, _der(0x02, b"\x01")))))
    if description is not None:
        body += _der(0xA4, _der(0x0C, description.encode()))
    if rsa_parent is not None:
        body += _der(0xA5, _der(0x01, b"\xff" if rsa_parent else b"\0"))
    body += _der(0x02, p) + _der(0x04, pub) + _der(0x04, priv)
    return _der(0x30, body)


def tss2_pem(der):
    import base64
    b = base64.b64encode(der).decode()
    return ("-----BEGIN TSS2 PRIVATE KEY-----\n" + "\n".join(b[i:i + 64] for i in range(0, len(b), 64))
            + "\n-----END TSS2 PRIVATE KEY-----\n")


def make_tools_key(tpm, tmp, attrs, name, parent_handle=None):
    """An ECC P-256 key made by tpm2_create under the owner storage primary (tpm2-openssl's and
    keyx's template) or under the persistent key parent_handle; returns (pub, priv) bytes."""
    tpm.flush_transient()
    if parent_handle is None:
        tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb",
                  "-a", ECC_SRK, "-c", tmp / "srk.ctx")
        parent = tmp / "srk.ctx"
    else:
        parent = f"0x{parent_handle:x}"
    tpm.tools("tpm2_create", "-Q", "-C", parent, "-G", "ecc256:null", "-a", attrs,
              "-u", tmp / f"{name}.pub", "-r", tmp / f"{name}.priv")
    tpm.flush_transient()
    return (tmp / f"{name}.pub").read_bytes(), (tmp / f"{name}.priv").read_bytes()


def test_tss2_key_under_persistent_parent(tpm, tmp):
    srk = 0x81000030
    if f"0x{srk:x}" not in persistent_handles(tpm):
        tpm.flush_transient()
        tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-G", "rsa2048", "-c", tmp / "p.ctx")
        tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", tmp / "p.ctx", f"0x{srk:x}")
        tpm.flush_transient()
    pub, priv = make_tools_key(tpm, tmp, "decrypt|fixedtpm|fixedparent|sensitivedataorigin|"
                               "userwithauth|noda", "child", parent_handle=srk)
    key = tmp / "child.pem"
    # with the later format's optional fields (a description, rsaParent FALSE)
    key.write_text(tss2_pem(tss2_der(pub, priv, srk, description="srv key", rsa_parent=False)))
    tpm.tools("tpm2_load", "-Q", "-C", f"0x{srk:x}", "-u", tmp / "child.pub", "-r",
              tmp / "child.priv", "-c", tmp / "child.ctx")
    _, peer, point = peer_point(tmp, "P-256", "peer")
    want = ecdhzgen(tpm, tmp, tmp / "child.ctx", point, "P-256")
    tpm.flush_transient()
    env = keyx_env(tmp, tpm)
    assert app_ok(env, tmp, "derive", key, peer) == want
    assert not tpm.tools("tpm2_getcap", "handles-transient").out.strip()
    # the same key under an owner parent it does not belong to
    key.write_text(tss2_pem(tss2_der(pub, priv, 0x40000001)))
    got, r = app(env, tmp, "derive", key, peer)
    assert got is None and "cannot load the TSS2 key under its parent 0x40000001" in r.err, r
    key.write_text(tss2_pem(tss2_der(pub, priv, 0x81000077)))
    got, r = app(env, tmp, "derive", key, peer)
    assert (got is None and "the key file's parent, persistent key 0x81000077, is not in this TPM"
            in r.err and "esys" not in r.err.lower()), r  # keyx's message only, no ESYS log


def test_tss2_sign_only_key_refused_for_derive(tpm, tmp):
    pub, priv = make_tools_key(tpm, tmp, "sign|fixedtpm|fixedparent|sensitivedataorigin|"
                               "userwithauth|noda", "signer")
    key = tmp / "signer.pem"
    key.write_text(tss2_pem(tss2_der(pub, priv, 0x40000001)))
    _, peer, _ = peer_point(tmp, "P-256", "peer")
    got, r = app(keyx_env(tmp, tpm), tmp, "derive", key, peer)
    # it loads (a signing key: certificate keys), and refuses key agreement
    assert "provider keyx" in r.out, r
    assert got is None and "this TPM key cannot do key agreement (ECDH_ZGen)" in r.err, r


def test_tss2_malformed_and_foreign_files(tpm, tmp):
    pub, priv = make_tools_key(tpm, tmp, "decrypt|fixedtpm|fixedparent|sensitivedataorigin|"
                               "userwithauth|noda", "k")
    env = keyx_env(tmp, tpm)
    _, peer, _ = peer_point(tmp, "P-256", "peer")
    cases = [
        (tss2_der(pub, priv, 0x40000001, empty_auth=None), "this TSS2 key has a password"),
        (tss2_der(pub, priv, 0x40000001, policy=True), "this TSS2 key is bound to a policy"),
        (tss2_der(pub, priv, 0x40000001, oid=b"\x67\x81\x05\x0a\x01\x05"),
         "holds sealed data (OID 2.23.133.10.1.5), not a loadable key"),
        (tss2_der(pub[:-3], priv, 0x40000001), "pubkey is not a TPM2B_PUBLIC"),
        (tss2_der(pub, priv, 0x40000001, rsa_parent=True),
         "this TSS2 key was made under an RSA storage primary (rsaParent)"),
        (_der(0x30, _der(0x06, b"\x67\x81\x05\x0a\x01\x03") + _der(0x02, b"\x01")),
         "not a TSS2 PRIVATE KEY: the DER does not have the TPMKey structure"),
    ]
    for i, (der, msg) in enumerate(cases):
        f = tmp / f"bad{i}.pem"
        f.write_text(tss2_pem(der))
        got, r = app(env, tmp, "derive", f, peer)
        assert got is None and msg in r.err, f"case {i}:\n{r!r}"


def test_tpm_parent_config(tpm, tmp):
    """With tpm-parent (a persistent RSA storage key), keyx-persist keys are made under it, and
    TSS2 files naming the owner hierarchy still load under the owner's ECC primary (made for the
    load and flushed after it)."""
    srk = 0x81000031
    if f"0x{srk:x}" not in persistent_handles(tpm):
        tpm.flush_transient()
        tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-G", "rsa2048", "-c", tmp / "p.ctx")
        tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", tmp / "p.ctx", f"0x{srk:x}")
        tpm.flush_transient()
    env = keyx_env(tmp, tpm, **{"tpm-parent": f"0x{srk:x}"})
    handle = 0x81000027
    evict(tpm, handle)
    genpkey_persist(env, tmp / "ref.pem", "EC", handle, "P-256").ok("genpkey under tpm-parent")
    _, pub, point = peer_point(tmp, "P-256", "peer")
    want = ecdhzgen(tpm, tmp, f"0x{handle:x}", point, "P-256")
    assert derive(env, tmp, f"keyx:tpm:handle=0x{handle:08x}", pub) == want

    key = tpm2_openssl_genpkey(tpm, tmp / "k.pem", "EC", "group:P-256")
    kpub = tpm2_openssl_pubkey(tpm, key, tmp / "k.pub")
    priv, pub, _ = peer_point(tmp, "P-256", "peer2")
    assert app_ok(env, tmp, "derive", key, pub) == derive(base_env(), tmp, priv, kpub)
    assert not tpm.tools("tpm2_getcap", "handles-transient").out.strip()


def test_tss2_key_survives_a_tpm_restart(swtpm_factory, tmp):
    """A process holding a key from a TSS2 file keeps using it when the TPM restarts: keyx loads
    the file again (as a persistent key is found again at its handle)."""
    other = swtpm_factory()
    key = tpm2_openssl_genpkey(other, tmp / "k.pem", "EC", "group:P-256")
    kpub = tpm2_openssl_pubkey(other, key, tmp / "k.pub")
    priv, pub, _ = peer_point(tmp, "P-256", "peer")
    want = derive(base_env(), tmp, priv, kpub)
    env = keyx_env(tmp, other)
    script = tmp / "app.py"
    script.write_text(APP)
    out = tmp / "app.out"
    p = subprocess.Popen(["/usr/bin/python3", str(script), env["OPENSSL_CONF"], "derive2", str(key),
                          str(pub), str(out)], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        while line and line.strip() != "ready":
            line = p.stdout.readline()
        assert line.strip() == "ready", p.stderr.read()
        other.restart()
        o, e = p.communicate("go\n", timeout=kxutil.TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, f"after the restart:\n{o}\n{e}"
    assert Path(str(out) + ".1").read_bytes() == want
    assert out.read_bytes() == want, "the key from the file did not come back after the restart"
