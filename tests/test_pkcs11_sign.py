"""Signatures with PKCS#11 token keys (PKCS#11 side): certificate keys on a token.

Keys are made by keyx itself (openssl genpkey -pkeyopt keyx-label:) on a SoftHSM2 token of this
module's own ("keyx-sig", in its own token directory: the session tokens keyx-a/keyx-b, whose
objects other tests count, are never touched). keyx hashes in software and the token signs
(CKM_ECDSA, CKM_RSA_PKCS over a DigestInfo, CKM_RSA_PKCS_PSS).

Everything keyx signs is verified by the default provider alone (an openssl.cnf without keyx),
with the token's public key as pkcs11-tool reads it from the token (never keyx's export).
pkcs11-tool's own signatures with the same keys go through the same verification, and RSA
PKCS#1 v1.5, which is deterministic, must be byte for byte pkcs11-tool's (CKM_SHA*_RSA_PKCS: the
token builds the DigestInfo itself).
"""

import re
import shutil

import pytest

import kxutil
from fixture_softhsm import MODULE, PIN, SoftHSM

TOKEN = "keyx-sig"
MSG = b"keyx signs this with a token key\n" * 3

# label, genpkey algorithm and option, key id, curve OID (EC_PARAMS) for EC
KEYS = {
    "ec256": ("EC", "group:P-256", "5101"),
    "ec384": ("EC", "group:P-384", "5102"),
    "ec521": ("EC", "group:P-521", "5103"),
    "rsa": ("RSA", "bits:2048", "5104"),
}
ORDER_BYTES = {"ec256": 32, "ec384": 48, "ec521": 66}


class SigToken(SoftHSM):
    """A SoftHSM2 token directory with one empty token, keyx-sig."""

    def setup(self):
        return self.init_tokens(TOKEN)


def der_len(n):
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def tlv(tag, body):
    return bytes([tag]) + der_len(len(body)) + body


def unwrap_octet_string(der):
    """The content of a DER OCTET STRING (CKA_EC_POINT as SoftHSM stores it)."""
    assert der[0] == 0x04, der.hex()
    n, i = der[1], 2
    if n & 0x80:
        k = n & 0x7F
        n, i = int.from_bytes(der[2:2 + k], "big"), 2 + k
    return der[i:i + n]


def ec_spki_pem(point_der, params_der):
    """SubjectPublicKeyInfo (RFC 5480) of an EC key from the token's CKA_EC_POINT and
    CKA_EC_PARAMS, written by this test (not by keyx)."""
    ec_public_key_oid = bytes.fromhex("06072a8648ce3d0201")
    alg = tlv(0x30, ec_public_key_oid + params_der)
    spki = tlv(0x30, alg + tlv(0x03, b"\x00" + unwrap_octet_string(point_der)))
    import base64
    body = base64.b64encode(spki).decode()
    return "-----BEGIN PUBLIC KEY-----\n" + "\n".join(body[i:i + 64] for i in range(0, len(body), 64)) + \
        "\n-----END PUBLIC KEY-----\n"


class Keys:
    def __init__(self, hsm, root, env, log):
        self.hsm, self.root, self.env, self.log = hsm, root, env, log

    def ref(self, name):
        return self.root / f"{name}.ref.pem"

    def uri(self, name):
        return f"pkcs11:token={TOKEN};object=sig-{name};type=private"

    def pub(self, name):
        return self.root / f"{name}.pub.pem"

    def key_id(self, name):
        return KEYS[name][2] if name in KEYS else self.extra_ids[name]


def token_public_keys(hsm, root, names):
    """PEM public keys of the token's objects sig-NAME, from pkcs11-tool only."""
    listing = hsm.tool(TOKEN, "--list-objects").ok("list objects").out
    for block in re.split(r"\n(?=\S)", listing):
        m = re.search(r"^\s+label:\s+sig-(\S+)$", block, re.M)
        if not m or m.group(1) not in names or not block.startswith("Public Key Object"):
            continue
        name = m.group(1)
        if "; EC" in block.split("\n")[0]:
            point = re.search(r"^\s+EC_POINT:\s+([0-9a-f]+)$", block, re.M).group(1)
            params = re.search(r"^\s+EC_PARAMS:\s+([0-9a-f]+)\b", block, re.M).group(1)  # OpenSC 0.26 adds " (OID ...)"
            (root / f"{name}.pub.pem").write_text(ec_spki_pem(bytes.fromhex(point), bytes.fromhex(params)))
        else:
            key_id = re.search(r"^\s+ID:\s+([0-9a-f]+)$", block, re.M).group(1)
            der = root / f"{name}.pub.der"
            hsm.tool(TOKEN, "--read-object", "--type", "pubkey", "--id", key_id, "-o", der).ok("read pubkey")
            kxutil.openssl("pkey", "-pubin", "-inform", "DER", "-in", der, "-out", root / f"{name}.pub.pem",
                           env=kxutil.base_env()).ok("pubkey to PEM")
    for name in names:
        assert (root / f"{name}.pub.pem").exists(), f"no public key object sig-{name}:\n{listing}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory, build):
    for tool in ("softhsm2-util", "pkcs11-tool"):
        assert shutil.which(tool), f"{tool} not found: install softhsm2 and opensc (scripts/test.sh does)"
    assert MODULE.exists(), f"SoftHSM2 module {MODULE} not found: install softhsm2"
    root = tmp_path_factory.mktemp("softhsm-sig")
    hsm = SigToken(root).setup()
    log = root / "audit.jsonl"
    # with the Groups line for the token (docs/tls-servers.md): its TLS servers' key shares are
    # made there, also for a default OpenSSL 3.5 client
    cnf = kxutil.write_cnf(root / "openssl.cnf", keyx=hsm.keyx_settings(tokens=(TOKEN,), **{"audit-log": log}),
                           groups="auto")
    env = hsm.env(OPENSSL_CONF=cnf)
    for name, (alg, opt, key_id) in KEYS.items():
        kxutil.openssl("genpkey", "-algorithm", alg, "-pkeyopt", opt, "-pkeyopt", f"keyx-label:sig-{name}",
                       "-pkeyopt", f"keyx-id:{key_id}", "-out", root / f"{name}.ref.pem", env=env).ok("genpkey")
    # a signing-only EC key made by an operator with pkcs11-tool (no CKA_DERIVE)
    hsm.tool(TOKEN, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "sig-signonly", "--id", "5105",
             "--usage-sign").ok("sign-only key")
    token_public_keys(hsm, root, list(KEYS) + ["signonly"])
    k = Keys(hsm, root, env, log)
    k.extra_ids = {"signonly": "5105"}
    return k


def plain():
    """The default provider alone: the independent verifier."""
    return kxutil.base_env()


def verify_dgst(keys, name, md, sig, msg, *sigopts):
    opts = [x for o in sigopts for x in ("-sigopt", o)]
    r = kxutil.openssl("dgst", f"-{md}", "-verify", keys.pub(name), *opts, "-signature", sig, msg, env=plain())
    assert r.rc == 0 and "Verified OK" in r.out, f"the default provider does not verify the signature:\n{r!r}"


def sign_events(log, pid):
    return [e for e in kxutil.read_audit(log) if e["event"] == "sign" and e["pid"] == pid]


def check_error(r, *needles):
    text = r.out + r.err
    assert r.rc not in (0, -11, -6) and r.rc > 0, f"expected a clean failure:\n{r!r}"
    for n in needles:
        assert n.lower() in text.lower(), f"error does not say {n!r}:\n{r!r}"
    assert PIN not in text, f"the PIN appears in the output:\n{r!r}"


def ecdsa_rs(der):
    """(r, s) of a DER ECDSA-Sig-Value."""
    assert der[0] == 0x30
    i = 2 if der[1] < 0x80 else 3
    out = []
    for _ in range(2):
        assert der[i] == 0x02
        n = der[i + 1]
        out.append(int.from_bytes(der[i + 2:i + 2 + n], "big"))
        i += 2 + n
    assert i == len(der), der.hex()
    return out


# ---- openssl dgst -sign ------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["ref", "uri"])
@pytest.mark.parametrize("name,md", [("ec256", "sha256"), ("ec256", "sha512"), ("ec384", "sha384"),
                                     ("ec521", "sha512"), ("ec521", "sha256")])
def test_ecdsa_dgst_sign_verifies_in_the_default_provider(keys, tmp, name, md, by):
    msg, sig = tmp / "msg", tmp / "sig"
    msg.write_bytes(MSG)
    key = keys.ref(name) if by == "ref" else keys.uri(name)
    r = kxutil.openssl("dgst", f"-{md}", "-sign", key, "-out", sig, msg, env=keys.env).ok("dgst -sign")
    verify_dgst(keys, name, md, sig, msg)
    # ECDSA is randomized: a second signature differs and verifies too
    sig2 = tmp / "sig2"
    kxutil.openssl("dgst", f"-{md}", "-sign", key, "-out", sig2, msg, env=keys.env).ok("dgst -sign")
    assert sig2.read_bytes() != sig.read_bytes()
    verify_dgst(keys, name, md, sig2, msg)
    # a signature of another message does not verify (the verifier can fail)
    other = tmp / "other"
    other.write_bytes(MSG + b"!")
    r2 = kxutil.openssl("dgst", f"-{md}", "-verify", keys.pub(name), "-signature", sig, other, env=plain())
    assert r2.rc != 0 and "Verification failure" in r2.out + r2.err, r2
    events = sign_events(keys.log, r.pid)
    assert events and all(e["ok"] and e["backend"] == "pkcs11" and e["alg"] == "EC" for e in events), events


def test_ecdsa_short_r_and_s_survive(keys, tmp):
    """P-521 r and s are often shorter than 66 bytes: over 40 signatures some are, and all
    verify. (SoftHSM hands r and s at the full order size, so keyx's padding of shorter halves
    from other tokens is not reached here; what is checked is that no value is cut or shifted
    on the way to the DER signature.)"""
    msg = tmp / "msg"
    msg.write_bytes(MSG)
    short = 0
    for i in range(40):
        sig = tmp / f"sig{i}"
        kxutil.openssl("dgst", "-sha512", "-sign", keys.ref("ec521"), "-out", sig, msg, env=keys.env).ok("sign")
        r, s = ecdsa_rs(sig.read_bytes())
        short += (r.bit_length() + 7) // 8 < 66 or (s.bit_length() + 7) // 8 < 66
        verify_dgst(keys, "ec521", "sha512", sig, msg)
    assert short > 0, "no P-521 signature had a short r or s in 40: the padding went untested"


@pytest.mark.parametrize("by", ["ref", "uri"])
@pytest.mark.parametrize("md", ["sha256", "sha384", "sha512", "sha1", "sha224"])
def test_rsa_pkcs1_dgst_sign_equals_pkcs11_tool(keys, tmp, md, by):
    msg, sig, theirs = tmp / "msg", tmp / "sig", tmp / "theirs"
    msg.write_bytes(MSG)
    key = keys.ref("rsa") if by == "ref" else keys.uri("rsa")
    r = kxutil.openssl("dgst", f"-{md}", "-sign", key, "-out", sig, msg, env=keys.env).ok("dgst -sign")
    assert len(sig.read_bytes()) == 256
    verify_dgst(keys, "rsa", md, sig, msg)
    mech = {"sha1": "SHA1"}.get(md, md.upper()) + "-RSA-PKCS"
    keys.hsm.tool(TOKEN, "--sign", "--mechanism", mech, "--id", keys.key_id("rsa"), "-i", msg, "-o", theirs).ok(
        "pkcs11-tool --sign")
    verify_dgst(keys, "rsa", md, theirs, msg)
    assert sig.read_bytes() == theirs.read_bytes(), "keyx's PKCS#1 v1.5 signature differs from the token's own"
    events = sign_events(keys.log, r.pid)
    assert events and all(e["ok"] and e["backend"] == "pkcs11" and e["alg"] == "RSA" for e in events), events


@pytest.mark.parametrize("saltlen", ["digest", "max"])
@pytest.mark.parametrize("md", ["sha256", "sha384", "sha512"])
def test_rsa_pss_dgst_sign_verifies_in_the_default_provider(keys, tmp, md, saltlen):
    msg, sig = tmp / "msg", tmp / "sig"
    msg.write_bytes(MSG)
    opts = ["rsa_padding_mode:pss", f"rsa_pss_saltlen:{saltlen}"]
    kxutil.openssl("dgst", f"-{md}", "-sign", keys.uri("rsa"), *[x for o in opts for x in ("-sigopt", o)],
                   "-out", sig, msg, env=keys.env).ok("dgst -sign PSS")
    # the verifier checks the salt length it was told: digest size, or the most the key allows
    verify_dgst(keys, "rsa", md, sig, msg, *opts)
    if saltlen == "max":
        r = kxutil.openssl("dgst", f"-{md}", "-verify", keys.pub("rsa"), "-sigopt", "rsa_padding_mode:pss",
                           "-sigopt", "rsa_pss_saltlen:digest", "-signature", sig, msg, env=plain())
        assert r.rc != 0, f"a max-salt signature verified as a digest-salt one:\n{r!r}"
    # PKCS#1 v1.5 verification of a PSS signature fails
    r = kxutil.openssl("dgst", f"-{md}", "-verify", keys.pub("rsa"), "-signature", sig, msg, env=plain())
    assert r.rc != 0


@pytest.mark.parametrize("md", ["sha256", "sha384"])
def test_pkcs11_tool_pss_and_ecdsa_signatures_verify_the_same_way(keys, tmp, md):
    """pkcs11-tool's signatures with the same keys pass the verification keyx's pass (so that
    verification is about the token's key), for PSS and for ECDSA (on a digest)."""
    msg, theirs, dg = tmp / "msg", tmp / "theirs", tmp / "dg"
    msg.write_bytes(MSG)
    keys.hsm.tool(TOKEN, "--sign", "--mechanism", f"{md.upper()}-RSA-PKCS-PSS", "--id", keys.key_id("rsa"),
                  "-i", msg, "-o", theirs).ok("pkcs11-tool PSS")
    verify_dgst(keys, "rsa", md, theirs, msg, "rsa_padding_mode:pss", "rsa_pss_saltlen:digest")
    kxutil.openssl("dgst", f"-{md}", "-binary", "-out", dg, msg, env=plain()).ok("digest")
    name = "ec384" if md == "sha384" else "ec256"
    keys.hsm.tool(TOKEN, "--sign", "--mechanism", "ECDSA", "--signature-format", "openssl", "--id",
                  keys.key_id(name), "-i", dg, "-o", theirs).ok("pkcs11-tool ECDSA")
    verify_dgst(keys, name, md, theirs, msg)


# ---- pkeyutl -sign on a digest -------------------------------------------------------------------


@pytest.mark.parametrize("name,opts", [
    ("ec256", []),
    ("ec521", []),
    ("rsa", []),
    ("rsa", ["rsa_padding_mode:pss", "rsa_pss_saltlen:digest"]),
    ("rsa", ["rsa_padding_mode:pss", "rsa_pss_saltlen:max"]),
])
def test_pkeyutl_sign_of_a_precomputed_digest(keys, tmp, name, opts):
    msg, dg, sig = tmp / "msg", tmp / "dg", tmp / "sig"
    msg.write_bytes(MSG)
    kxutil.openssl("dgst", "-sha256", "-binary", "-out", dg, msg, env=plain()).ok("digest")
    pk = [x for o in ["digest:sha256", *opts] for x in ("-pkeyopt", o)]
    r = kxutil.openssl("pkeyutl", "-sign", "-inkey", keys.ref(name), "-in", dg, "-out", sig, *pk, env=keys.env)
    r.ok("pkeyutl -sign")
    if name.startswith("ec"):
        rr, ss = ecdsa_rs(sig.read_bytes())
        assert rr > 0 and ss > 0
    v = kxutil.openssl("pkeyutl", "-verify", "-pubin", "-inkey", keys.pub(name), "-in", dg, "-sigfile", sig, *pk,
                       env=plain())
    assert v.rc == 0 and "Signature Verified Successfully" in v.out, v
    # and as the signature of the message itself
    verify_dgst(keys, name, "sha256", sig, msg, *opts)
    assert sign_events(keys.log, r.pid), kxutil.read_audit(keys.log)[-5:]


def test_a_sign_only_token_key_signs_and_refuses_to_derive(keys, tmp):
    """pkcs11-tool --usage-sign makes a key without CKA_DERIVE: it loads and signs; a derive is
    refused by keyx, saying why."""
    msg, sig = tmp / "msg", tmp / "sig"
    msg.write_bytes(MSG)
    kxutil.openssl("dgst", "-sha256", "-sign", keys.uri("signonly"), "-out", sig, msg, env=keys.env).ok("sign")
    verify_dgst(keys, "signonly", "sha256", sig, msg)
    peer = tmp / "peer.pem"
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", peer, env=plain()).ok("peer")
    kxutil.openssl("pkey", "-in", peer, "-pubout", "-out", tmp / "peer.pub", env=plain()).ok("peer pub")
    r = kxutil.openssl("pkeyutl", "-derive", "-inkey", keys.uri("signonly"), "-peerkey", tmp / "peer.pub",
                       "-out", tmp / "secret", env=keys.env)
    check_error(r, "does not allow derivation (CKA_DERIVE is false)")


# ---- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("md,opts,needles", [
    ("md5", ["rsa_padding_mode:pss", "rsa_pss_saltlen:digest"], ["digest md5", "SHA-1, SHA-224, SHA-256"]),
    ("md5", [], ["digest md5", "SHA-256, SHA-384 and SHA-512 digests only"]),
    ("sha3-256", [], ["digest sha3-256", "use one of those"]),
    ("sha256", ["rsa_padding_mode:pss", "rsa_mgf1_md:sha512"],
     ["refuses RSA-PSS with SHA-256 and MGF1-SHA-512", "use the same digest for MGF1"]),
])
def test_digests_the_token_cannot_use_are_refused(keys, tmp, md, opts, needles):
    msg = tmp / "msg"
    msg.write_bytes(MSG)
    r = kxutil.openssl("dgst", f"-{md}", "-sign", keys.uri("rsa"), *[x for o in opts for x in ("-sigopt", o)],
                       "-out", tmp / "sig", msg, env=keys.env)
    check_error(r, *needles)
    assert not (tmp / "sig").exists() or (tmp / "sig").stat().st_size == 0


# An application that signs with an ephemeral key keyx generated on the token (a session object
# for key exchange, CKA_SIGN false): DigestSignInit must refuse it, before any data.
EPHEMERAL_APP = r"""
import ctypes, sys
from ctypes import c_void_p, c_char_p, c_int, byref
L = ctypes.CDLL("libcrypto.so.3")
def fn(name, res, *args):
    f = getattr(L, name); f.restype = res; f.argtypes = list(args); return f
ctx_name = fn("EVP_PKEY_CTX_new_from_name", c_void_p, c_void_p, c_char_p, c_char_p)
keygen_init = fn("EVP_PKEY_keygen_init", c_int, c_void_p)
set_group = fn("EVP_PKEY_CTX_set_group_name", c_int, c_void_p, c_char_p)
generate = fn("EVP_PKEY_generate", c_int, c_void_p, ctypes.POINTER(c_void_p))
md_new = fn("EVP_MD_CTX_new", c_void_p)
sign_init = fn("EVP_DigestSignInit_ex", c_int, c_void_p, c_void_p, c_char_p, c_void_p, c_char_p, c_void_p, c_void_p)
err = fn("ERR_get_error_all", ctypes.c_ulong, c_void_p, c_void_p, c_void_p, ctypes.POINTER(c_char_p), c_void_p)
err_string = fn("ERR_error_string", c_char_p, ctypes.c_ulong, c_char_p)
ctx = ctx_name(None, b"EC", None)
key = c_void_p()
ok = ctx and keygen_init(ctx) == 1 and set_group(ctx, b"P-256") == 1 and generate(ctx, byref(key)) == 1
print("generated" if ok else "keygen failed")
if ok:
    print("sign init", sign_init(md_new(), None, b"SHA256", None, None, key, None))
data = c_char_p()
while True:
    e = err(None, None, None, byref(data), None)
    if not e:
        break
    print("error:", err_string(e, None).decode(), (data.value or b"").decode())
"""


def test_an_ephemeral_key_is_not_a_signing_key(keys, tmp):
    r = kxutil.run(["/usr/bin/python3", "-c", EPHEMERAL_APP], env=keys.env)
    assert r.rc == 0 and "generated" in r.out, r
    assert "sign init 1" not in r.out, f"an ephemeral ECDH key was accepted for signing:\n{r!r}"
    assert "this pkcs11 key is not a signing key (CKA_SIGN)" in r.out, r
    gen = [e for e in kxutil.read_audit(keys.log) if e["pid"] == r.pid and e["event"] == "keygen"]
    assert gen and gen[0]["backend"] == "pkcs11" and gen[0]["ephemeral"] is True, gen


# ---- TLS with the certificate key on the token ----------------------------------------------------


@pytest.fixture(scope="module")
def ca(keys):
    """A CA made by the default provider alone, and certificates it issued to the token keys'
    public keys (x509 -new -force_pubkey: the CA signs, the token key is only named)."""
    d = keys.root / "ca"
    d.mkdir()
    env = plain()
    kxutil.openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                   "-keyout", d / "ca.key", "-out", d / "ca.crt", "-subj", "/CN=keyx test CA", "-days", "2",
                   *kxutil.CA_EXTENSIONS,
                   env=env).ok("CA")
    certs = {}
    for name in ("ec256", "ec384", "rsa"):
        crt = d / f"{name}.crt"
        kxutil.openssl("x509", "-new", "-force_pubkey", keys.pub(name), "-subj", "/CN=localhost", "-CA", d / "ca.crt",
                       "-CAkey", d / "ca.key", "-days", "2", "-out", crt, env=env).ok("issue")
        certs[name] = crt
    return d / "ca.crt", certs


@pytest.mark.parametrize("name,version,sigalgs,sigtype", [
    ("ec256", "-tls1_3", None, "ECDSA"),
    ("ec256", "-tls1_2", None, "ECDSA"),
    ("ec384", "-tls1_3", None, "ECDSA"),
    ("rsa", "-tls1_3", None, "RSA-PSS"),
    ("rsa", "-tls1_2", None, "RSA-PSS"),
    ("rsa", "-tls1_2", "RSA+SHA256", "RSA"),
])
def test_tls_server_signs_with_the_token_key(keys, ca, s_server, s_client, name, version, sigalgs, sigtype):
    cafile, certs = ca
    srv = s_server(["-cert", certs[name], "-key", keys.ref(name)], keys.env)
    args = [version, "-CAfile", cafile, "-verify_return_error", "-verify_hostname", "localhost"]
    if sigalgs:
        args += ["-sigalgs", sigalgs]
    cli = s_client(srv.port, args, plain())
    out = srv.wait()
    text = cli.out + cli.err
    assert cli.rc == 0, f"handshake failed:\n{cli!r}\n--- server ---\n{out}"
    assert "Verify return code: 0 (ok)" in cli.out, cli
    assert kxutil.protocol(cli.out) == ("TLSv1.3" if version == "-tls1_3" else "TLSv1.2"), cli
    assert kxutil.peer_signature(cli.out) == sigtype, text
    # the server's certificate signature was made on the token
    events = sign_events(keys.log, srv.pid)
    assert events and all(e["ok"] and e["backend"] == "pkcs11" and e["ephemeral"] is False for e in events), \
        kxutil.read_audit(keys.log)[-10:]
    kinds = {e["event"] for e in kxutil.read_audit(keys.log) if e["pid"] == srv.pid}
    assert {"keygen", "derive", "sign"} <= kinds, kinds
    kxutil.check_audit_schema(kxutil.read_audit(keys.log))


# A server application that loads its certificate key once and forks workers (as nginx does):
# each process signs handshakes with the key its parent loaded. Python's ssl module (the system
# OpenSSL, keyx from OPENSSL_CONF), client and server in memory; the client verifies the chain.
FORK_APP = kxutil.MEMORY_HANDSHAKE + r"""
import os, ssl, sys

crt, key, cafile = sys.argv[1:4]
srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
srv.load_cert_chain(crt, key)
srv.set_ecdh_curve("prime256v1")
cli = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
cli.load_verify_locations(cafile)
cli.set_ecdh_curve("prime256v1")

def handshake():
    return memory_handshake(srv, cli)

if len(sys.argv) > 4:  # N handshakes in this process, no fork
    print(" ".join(handshake() for _ in range(int(sys.argv[4]))), flush=True)
    sys.exit(0)
print("parent", os.getpid(), handshake(), flush=True)
pid = os.fork()
if pid == 0:
    try:
        print("child", os.getpid(), handshake(), handshake(), flush=True)
        os._exit(0)
    except BaseException as e:
        print("child failed:", e, flush=True)
        os._exit(1)
_, status = os.waitpid(pid, 0)
print("parent again", handshake(), flush=True)
sys.exit(1 if status else 0)
"""


@pytest.mark.parametrize("name", ["ec256", "rsa"])
def test_a_forked_worker_signs_with_the_key_its_parent_loaded(keys, ca, tmp, name):
    cafile, certs = ca
    (tmp / "fork.py").write_text(FORK_APP)
    r = kxutil.run(["/usr/bin/python3", tmp / "fork.py", certs[name], keys.ref(name), cafile], env=keys.env)
    assert r.rc == 0 and "parent again TLSv1.3" in r.out, r
    pids = {w[0]: int(w[1]) for w in map(str.split, r.out.splitlines()) if len(w) >= 3 and w[1].isdigit()}
    assert set(pids) == {"parent", "child"}, r
    assert r.out.count("TLSv1.3") == 4, r
    events = kxutil.read_audit(keys.log)
    for who, pid, n in (("parent", pids["parent"], 2), ("child", pids["child"], 2)):
        signs = [e for e in events if e["pid"] == pid and e["event"] == "sign"]
        assert len(signs) == n and all(e["ok"] and e["backend"] == "pkcs11" for e in signs), f"{who}: {signs}"
    # the key was loaded once, in the parent: the child found it again on the token by its URI
    loads = [e for e in events if e["event"] == "load" and e["pid"] in pids.values()]
    assert {e["pid"] for e in loads} == {pids["parent"]}, loads


@pytest.mark.parametrize("name,trial", [("ec256", 0), ("rsa", 1)])
def test_sign_check_costs_no_cryptoki_call_per_handshake(keys, ca, tmp, name, trial):
    """OpenSC's pkcs11-spy records keyx's calls into the token: 1 and then 6 handshakes in one
    process (one key loaded once). Mechanism information is read once per token whatever the
    count; each handshake costs exactly one C_SignInit and one C_Sign; the RSA-PSS parameter set
    TLS uses is tried once per process (one more C_SignInit/C_Sign), then remembered."""
    from fixture_softhsm import SPY

    cafile, certs = ca
    (tmp / "app.py").write_text(FORK_APP)
    settings = {**keys.hsm.keyx_settings(tokens=(TOKEN,)), "pkcs11-module": SPY}
    counts = {}
    for n in (1, 6):
        spy = tmp / f"spy{n}.log"
        cnf = kxutil.write_cnf(tmp / f"spy{n}.cnf", keyx=settings)
        env = keys.hsm.spy_env(spy, OPENSSL_CONF=cnf)
        r = kxutil.run(["/usr/bin/python3", tmp / "app.py", certs[name], keys.ref(name), cafile, n], env=env)
        assert r.rc == 0 and r.out.split() == ["TLSv1.3"] * n, r
        calls = re.findall(r"^\d+: (C_\w+)$", spy.read_text(), re.M)
        counts[n] = {c: calls.count(c) for c in ("C_GetMechanismInfo", "C_SignInit", "C_Sign")}
    for n in (1, 6):
        assert counts[n]["C_SignInit"] == counts[n]["C_Sign"] == n + trial, counts
    assert counts[1]["C_GetMechanismInfo"] == counts[6]["C_GetMechanismInfo"] > 0, counts


def test_certificate_key_token_removed_fails_cleanly(tmp_path_factory, ca, tmp):
    """The token holding the certificate key is removed while s_server runs (SoftHSM's
    --delete-token): handshakes fail with an error naming the token, the server keeps running
    (no crash), the audit log has the failed signature, and nothing signs in software. Its own
    token directory: keyx-sig stays for the other tests."""
    import subprocess
    import time

    from conftest import pick_port

    hsm = SigToken(tmp_path_factory.mktemp("softhsm-sig-gone")).setup()
    log = tmp / "audit.jsonl"
    env = hsm.env(OPENSSL_CONF=kxutil.write_cnf(
        tmp / "openssl.cnf", keyx=hsm.keyx_settings(tokens=(TOKEN,), backends="pkcs11, software",
                                                    **{"audit-log": log})))
    ref = tmp / "gone.ref.pem"
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt", "keyx-label:sig-gone",
                   "-out", ref, env=env).ok("genpkey")
    token_public_keys(hsm, tmp, ["gone"])
    cafile = ca[0]
    crt = tmp / "gone.crt"
    kxutil.openssl("x509", "-new", "-force_pubkey", tmp / "gone.pub.pem", "-subj", "/CN=localhost", "-CA", cafile,
                   "-CAkey", cafile.parent / "ca.key", "-days", "2", "-out", crt, env=plain()).ok("issue")

    def handshake(port):
        return kxutil.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-CAfile", cafile,
                           "-verify_return_error", "-brief"], env=plain(), input="")

    port = pick_port()
    srv = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "3",
                            "-cert", crt, "-key", ref, "-quiet"],
                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=env, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while (r := handshake(port)).rc != 0 and time.monotonic() < deadline and srv.poll() is None:
            time.sleep(0.1)  # until the server listens
        assert r.rc == 0, r
        kxutil.run(["softhsm2-util", "--delete-token", "--token", TOKEN], env=hsm.tool_env()).ok("remove token")
        time.sleep(1.2)  # keyx checks a token's presence at most once a second
        for _ in range(2):
            r = handshake(port)
            assert r.rc != 0, f"a handshake succeeded with the certificate key's token gone:\n{r!r}"
        srv.wait(kxutil.TIMEOUT)
    finally:
        kxutil.kill_group(srv)
    err = srv.stderr.read()
    assert srv.returncode is not None and srv.returncode >= 0, f"s_server died (rc {srv.returncode}):\n{err}"
    assert "pkcs11" in err and TOKEN in err, f"no clear error once the token is gone:\n{err}"
    assert PIN not in err
    events = [e for e in kxutil.read_audit(log) if e["pid"] == srv.pid]
    kxutil.check_audit_schema(events)
    signs = [e for e in events if e["event"] == "sign"]
    assert [e["ok"] for e in signs][:1] == [True] and not any(e["ok"] for e in signs[1:]), signs
    assert len(signs) >= 2 and {e["backend"] for e in signs} == {"pkcs11"}, signs
