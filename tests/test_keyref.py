"""Key reference files: `openssl genpkey -out` of a hardware key writes where the key
lives and its public key (PEM "KEYX KEY"), never private material, and every OpenSSL private-key
reader turns the file back into the same hardware key by reference.

Each test runs on its own swtpm or SoftHSM token directory (persistent keys are made and deleted
here). Secrets are checked against the default provider deriving from the peer's side with the
public key the device's own tool reports (tpm2_readpublic, pkcs11-tool), and the file's content is
parsed here with a DER reader of the test's own.
"""

import base64
import itertools
import re

import pytest

import kxutil
from fixture_softhsm import SoftHSM
from fixture_swtpm import Swtpm, tpm_cnf

BACKENDS = ["tpm", "pkcs11"]
_handles = itertools.count(0x81000100)
_labels = itertools.count(1)


@pytest.fixture(scope="module")
def hsm(tmp_path_factory, build):
    return SoftHSM(tmp_path_factory.mktemp("hsm-keyref")).setup()


@pytest.fixture(scope="module")
def tpm(tmp_path_factory):
    t = Swtpm(tmp_path_factory.mktemp("tpm-keyref")).start()
    yield t
    t.kill()


class Device:
    """A backend in the test's own swtpm or token: the keyx configuration, how to make a
    persistent key, how the device's own tool reads its public key and deletes it."""

    def __init__(self, name, tmp, tpm=None, hsm=None):
        self.name, self.tmp, self.tpm, self.hsm = name, tmp, tpm, hsm
        self.log = tmp / "audit.jsonl"
        settings = {"audit-log": self.log}
        if name == "tpm":
            self.cnf = tpm_cnf(tmp / "openssl.cnf", tpm, keyx=settings)
            self.env = kxutil.base_env(OPENSSL_CONF=self.cnf)
        else:
            # SoftHSM decrypts OAEP with SHA-1 only: keyx decodes OAEP-SHA256 itself
            settings["pkcs11-raw-rsa"] = 1
            self.cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={**hsm.keyx_settings(), **settings})
            self.env = hsm.env(OPENSSL_CONF=self.cnf)

    def place(self):
        """genpkey options for a new persistent key, and its URI."""
        if self.name == "tpm":
            h = next(_handles)
            return ["-pkeyopt", f"keyx-persist:0x{h:08x}"], f"keyx:tpm:handle=0x{h:08x}", h
        n = next(_labels)
        label, kid = f"ref-{n}", f"{0xa000 + n:04x}"
        return (["-pkeyopt", f"keyx-label:{label}", "-pkeyopt", f"keyx-id:{kid}"],
                f"pkcs11:token=keyx-a;object={label};type=private", label)

    def genpkey(self, out, alg="EC", opts=("-pkeyopt", "group:P-256")):
        place, uri, name = self.place()
        r = kxutil.openssl("genpkey", "-algorithm", alg, *opts, "-pkeyopt", f"keyx-backend:{self.name}",
                           *place, "-out", out, env=self.env)
        r.ok(f"genpkey {alg} in {self.name}")
        return uri, name

    def device_public(self, name, out):
        """The key's public key as the device's own tool reads it (PEM SubjectPublicKeyInfo)."""
        if self.name == "tpm":
            self.tpm.tools("tpm2_readpublic", "-c", f"0x{name:x}", "-f", "pem", "-o", out)
        else:
            der = out.with_suffix(".der")
            self.hsm.tool("keyx-a", "--read-object", "--type", "pubkey", "--label", name,
                          "-o", der).ok("read public key")
            kxutil.openssl("pkey", "-pubin", "-inform", "DER", "-in", der, "-out", out).ok("pub to PEM")
        return out

    def delete(self, name):
        if self.name == "tpm":
            self.tpm.tools("tpm2_evictcontrol", "-C", "o", "-c", f"0x{name:x}")
        else:
            for t in ("privkey", "pubkey"):
                self.hsm.tool("keyx-a", "--delete-object", "--type", t, "--label", name).ok("delete")


@pytest.fixture(params=BACKENDS)
def dev(request, tmp):
    if request.param == "tpm":
        return Device("tpm", tmp, tpm=request.getfixturevalue("tpm"))
    return Device("pkcs11", tmp, hsm=request.getfixturevalue("hsm"))


# ---- a DER reader of the test's own, for the reference file's content -------------------------


def der_items(data):
    """Top-level TLVs of data: [(tag, content bytes, whole encoding)]."""
    items, i = [], 0
    while i < len(data):
        tag, n = data[i], data[i + 1]
        j = i + 2
        if n & 0x80:
            k = n & 0x7F
            n = int.from_bytes(data[j:j + k], "big")
            j += k
        items.append((tag, data[j:j + n], data[i:j + n]))
        i = j + n
    return items


def pem_body(text, name):
    m = re.search(rf"-----BEGIN {name}-----\n(.*?)-----END {name}-----", text, re.S)
    assert m, f"no {name} PEM block in:\n{text}"
    return base64.b64decode("".join(m.group(1).split()))


def parse_reference(path):
    """(backend, locator, SubjectPublicKeyInfo DER) of a KEYX KEY file."""
    [(tag, body, _)] = der_items(pem_body(path.read_text(), "KEYX KEY"))
    assert tag == 0x30, "a SEQUENCE"
    fields = der_items(body)
    assert [t for t, _, _ in fields] == [0x02, 0x0C, 0x0C, 0x30], fields
    assert fields[0][1] == b"\x01", "version 1"
    return fields[1][1].decode(), fields[2][1].decode(), fields[3][2]


def make_reference_bytes(backend, locator, spki):
    def tlv(tag, content):
        n = len(content)
        size = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
        return bytes([tag]) + size + content

    body = tlv(0x02, b"\x01") + tlv(0x0C, backend.encode()) + tlv(0x0C, locator.encode()) + spki
    return tlv(0x30, body)


def write_pem(path, name, der):
    b64 = base64.b64encode(der).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    path.write_text(f"-----BEGIN {name}-----\n" + "\n".join(lines) + f"\n-----END {name}-----\n")
    return path


def peer_pair(tmp, group="P-256"):
    env = kxutil.base_env()
    key, pub = tmp / "peer.pem", tmp / "peer.pub"
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", f"group:{group}", "-out", key, env=env).ok("peer")
    kxutil.openssl("pkey", "-in", key, "-pubout", "-out", pub, env=env).ok("peer pub")
    return key, pub


PEM_READ = """
import ctypes, ssl, sys
lc = ctypes.CDLL("libcrypto.so.3")
for f, res, args in [("BIO_new_file", ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]),
                     ("PEM_read_bio_PrivateKey", ctypes.c_void_p, [ctypes.c_void_p] * 4),
                     ("ERR_get_error_all", ctypes.c_ulong, [ctypes.c_void_p] * 3 + [ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p])]:
    getattr(lc, f).restype, getattr(lc, f).argtypes = res, args
key = lc.PEM_read_bio_PrivateKey(lc.BIO_new_file(sys.argv[1].encode(), b"r"), None, None, None)
data = ctypes.c_char_p()
while lc.ERR_get_error_all(None, None, None, ctypes.byref(data), None):
    print("error:", (data.value or b"").decode())
print("key" if key else "no key")
"""


def refusal(dev, ref, message):
    """A reference that cannot be used: every reader fails with keyx's message.
    PEM_read_bio_PrivateKey (nginx, SSL_CTX_use_PrivateKey_file) and the openssl tool, whose
    file: store in OpenSSL 3.0 drops decoder errors (keyx's PEM decoder raises them again); the
    audit log carries it too."""
    r = kxutil.run(["/usr/bin/python3", "-c", PEM_READ, ref], env=dev.env).ok("PEM_read_bio_PrivateKey")
    assert r.out.splitlines()[-1] == "no key" and "error: " in r.out and message in r.out, r
    _, peer_pub = peer_pair(dev.tmp)
    r = kxutil.openssl("pkeyutl", "-derive", "-inkey", ref, "-peerkey", peer_pub, env=dev.env)
    # "Could not read private key" (3.0), "Could not find private key" (3.5)
    assert r.rc != 0 and re.search(r"Could not (read|find) private key", r.err), r
    assert message in r.err, r
    loads = [e for e in kxutil.read_audit(dev.log) if e["event"] == "load" and e["pid"] == r.pid]
    assert loads and not loads[-1]["ok"] and message in loads[-1]["error"], loads
    r = kxutil.openssl("pkeyutl", "-derive", "-inkey", ref, "-peerkey", peer_pub,
                       env=dict(dev.env, KEYX_DEBUG="1"))
    assert r.rc != 0 and message in r.err, r


def derive(env, inkey, peer_pub, out, *extra):
    kxutil.openssl("pkeyutl", "-derive", *extra, "-inkey", inkey, "-peerkey", peer_pub, "-out", out,
                   env=env).ok(f"derive with {inkey}")
    return out.read_bytes()


# ---- tests ------------------------------------------------------------------------------------


def test_reference_file_derives_what_the_uri_and_the_peer_derive(dev, tmp):
    ref = tmp / "srv.pem"
    uri, name = dev.genpkey(ref)
    text = ref.read_text()
    assert text.startswith("-----BEGIN KEYX KEY-----\n") and "PRIVATE" not in text, text

    backend, locator, spki = parse_reference(ref)
    device_pub = dev.device_public(name, tmp / "device.pub")
    device_spki = pem_body(device_pub.read_text(), "PUBLIC KEY")
    assert backend == dev.name and spki == device_spki, "the file records the device's public key"
    # the locator names the key again: as a keyx URI it loads the same key
    loc_uri = locator if dev.name == "pkcs11" else f"keyx:tpm:{locator}"

    peer_key, peer_pub = peer_pair(tmp)
    by_file = derive(dev.env, ref, peer_pub, tmp / "file.bin")
    by_uri = derive(dev.env, uri, peer_pub, tmp / "uri.bin")
    by_locator = derive(dev.env, loc_uri, peer_pub, tmp / "loc.bin")
    theirs = derive(kxutil.base_env(), peer_key, device_pub, tmp / "peer.bin")
    assert len(theirs) == 32 and by_file == by_uri == by_locator == theirs

    events = kxutil.read_audit(dev.log)
    gens = [e for e in events if e["event"] == "keygen"]
    assert [(e["backend"], e["ephemeral"], e["ok"]) for e in gens] == [(dev.name, False, True)], gens
    derives = [e for e in events if e["event"] == "derive"]
    assert len(derives) == 3 and all(e["backend"] == dev.name and e["ok"] for e in derives), derives


def test_reference_file_in_der_and_back(dev, tmp):
    ref = tmp / "srv.pem"
    dev.genpkey(ref)
    der = tmp / "srv.der"
    kxutil.openssl("pkey", "-in", ref, "-outform", "DER", "-out", der, env=dev.env).ok("to DER")
    assert der.read_bytes() == pem_body(ref.read_text(), "KEYX KEY")
    again = tmp / "again.pem"
    kxutil.openssl("pkey", "-inform", "DER", "-in", der, "-out", again, env=dev.env).ok("back to PEM")
    assert again.read_text() == ref.read_text()
    _, peer_pub = peer_pair(tmp)
    assert derive(dev.env, der, peer_pub, tmp / "a.bin", "-keyform", "DER") == \
        derive(dev.env, ref, peer_pub, tmp / "b.bin")


def test_public_key_and_text_of_a_reference(dev, tmp):
    ref = tmp / "srv.pem"
    _, name = dev.genpkey(ref)
    device_pub = dev.device_public(name, tmp / "device.pub").read_text()
    r = kxutil.openssl("pkey", "-in", ref, "-pubout", env=dev.env).ok("pubout")
    assert r.out == device_pub
    backend, locator, _ = parse_reference(ref)
    r = kxutil.openssl("pkey", "-in", ref, "-text", "-noout", env=dev.env).ok("text")
    assert "Public-Key: (256 bit)" in r.out and "NIST CURVE: P-256" in r.out, r.out
    assert f"private key: in the {backend} backend, {locator}" in r.out and "priv:" not in r.out, r.out
    r = kxutil.openssl("pkey", "-in", ref, "-text_pub", "-noout", env=dev.env).ok("text_pub")
    assert "pub:" in r.out and "private key" not in r.out, r.out


def test_rsa_reference_unwraps(dev, tmp):
    ref = tmp / "rsa.pem"
    _, name = dev.genpkey(ref, alg="RSA", opts=("-pkeyopt", "rsa_keygen_bits:2048"))
    pub = dev.device_public(name, tmp / "device.pub")
    msg = tmp / "msg.bin"
    msg.write_bytes(bytes(range(32)))
    ct = tmp / "ct.bin"
    oaep = ["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256"]
    kxutil.openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", pub, *oaep, "-in", msg, "-out", ct,
                   env=kxutil.base_env()).ok("encrypt (default provider)")
    out = tmp / "out.bin"
    kxutil.openssl("pkeyutl", "-decrypt", "-inkey", ref, *oaep, "-in", ct, "-out", out, env=dev.env).ok("decrypt")
    assert out.read_bytes() == msg.read_bytes()


def test_python_ssl_and_pem_read_take_the_reference(dev, tmp, certs):
    """SSL_CTX_use_PrivateKey_file (Python's load_cert_chain) and PEM_read_bio_PrivateKey read
    the file with no change to their code, and the key they get is keyx's."""
    ref = tmp / "srv.pem"
    _, name = dev.genpkey(ref)
    pub = dev.device_public(name, tmp / "device.pub")
    cert = tmp / "srv.crt"
    kxutil.openssl("x509", "-new", "-subj", "/CN=keyref", "-force_pubkey", pub, "-CA", certs["ec"][0],
                   "-CAkey", certs["ec"][1], "-days", "2", "-out", cert, env=kxutil.base_env()).ok("cert")
    script = f"""
import ctypes, ssl
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain({str(cert)!r}, {str(ref)!r})
lc = ctypes.CDLL("libcrypto.so.3")
for f, res, args in [("BIO_new_file", ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]),
                     ("PEM_read_bio_PrivateKey", ctypes.c_void_p, [ctypes.c_void_p] * 4),
                     ("EVP_PKEY_get0_provider", ctypes.c_void_p, [ctypes.c_void_p]),
                     ("OSSL_PROVIDER_get0_name", ctypes.c_char_p, [ctypes.c_void_p])]:
    getattr(lc, f).restype, getattr(lc, f).argtypes = res, args
bio = lc.BIO_new_file({str(ref).encode()!r}, b"r")
key = lc.PEM_read_bio_PrivateKey(bio, None, None, None)
print("loaded", lc.OSSL_PROVIDER_get0_name(lc.EVP_PKEY_get0_provider(key)).decode() if key else None)
"""
    r = kxutil.run(["/usr/bin/python3", "-c", script], env=dev.env).ok("python")
    assert r.out.strip() == "loaded keyx", r
    loads = [e for e in kxutil.read_audit(dev.log) if e["event"] == "load" and e["pid"] == r.pid]
    assert len(loads) >= 2 and all(e["backend"] == dev.name and e["ok"] for e in loads), loads


def refusal_at_use(dev, ref, message):
    """A TPM reference is loaded without the TPM (nginx's master loads it before forking, issue
    7): the key is found and checked at its first use, which fails with the message."""
    r = kxutil.run(["/usr/bin/python3", "-c", PEM_READ, ref], env=dev.env).ok("PEM_read_bio_PrivateKey")
    assert r.out.splitlines()[-1] == "key", r
    _, peer_pub = peer_pair(dev.tmp)
    r = kxutil.openssl("pkeyutl", "-derive", "-inkey", ref, "-peerkey", peer_pub, env=dev.env)
    assert r.rc != 0 and message in r.err, r
    events = [e for e in kxutil.read_audit(dev.log) if e["pid"] == r.pid]
    assert [(e["event"], e["ok"]) for e in events][:2] == [("load", True), ("derive", False)], events
    data = dev.tmp / "data.txt"
    data.write_text("signed at first use\n")
    r = kxutil.openssl("dgst", "-sha256", "-sign", ref, "-out", dev.tmp / "sig", data, env=dev.env)
    assert r.rc != 0 and message in r.err, r


def test_reference_to_a_deleted_key_names_it(dev, tmp):
    ref = tmp / "srv.pem"
    _, name = dev.genpkey(ref)
    backend, locator, _ = parse_reference(ref)
    dev.delete(name)
    (refusal_at_use if dev.name == "tpm" else refusal)(dev, ref, f'key reference file: the {backend} key "{locator}" could not be loaded')


def test_reference_to_a_replaced_key_is_refused(dev, tmp):
    ref = tmp / "old.pem"
    _, name = dev.genpkey(ref)
    backend, locator, spki = parse_reference(ref)
    # another key at the same place: the file's recorded public key no longer matches
    other = tmp / "other.pem"
    place, _, other_name = dev.place()
    dev.delete(name)
    opts = ["-pkeyopt", f"keyx-persist:0x{name:08x}"] if dev.name == "tpm" else \
        ["-pkeyopt", f"keyx-label:{name}", "-pkeyopt", f"keyx-id:{locator.split('id=')[1].split(';')[0].replace('%', '')}"]
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt",
                   f"keyx-backend:{dev.name}", *opts, "-out", other, env=dev.env).ok("second key")
    assert parse_reference(other)[2] != spki
    (refusal_at_use if dev.name == "tpm" else refusal)(dev, ref, f'the {backend} key "{locator}" is not the key this file was written for')


def test_malformed_references_are_refused_clearly(hsm, tmp):
    dev = Device("pkcs11", tmp, hsm=hsm)
    spki = pem_body(kxutil.openssl("pkey", "-in", peer_pair(tmp)[0], "-pubout", env=kxutil.base_env()).out,
                    "PUBLIC KEY")
    missing = "pkcs11:token=keyx-a;object=nothing-here;type=private"
    cases = {
        "backend": (make_reference_bytes("floppy", "x", spki), 'names backend "floppy": expected tpm or pkcs11'),
        "software": (make_reference_bytes("software", "x", spki), 'names backend "software"'),
        "locator": (make_reference_bytes("pkcs11", missing, spki), f'the pkcs11 key "{missing}" could not be loaded'),
    }
    for case, (der, message) in cases.items():
        refusal(dev, write_pem(tmp / f"{case}.pem", "KEYX KEY", der), message)
    # not a reference at all under the KEYX KEY name: refused by name, even by the openssl tool
    junk = write_pem(tmp / "junk.pem", "KEYX KEY", b"\x30\x03\x02\x01\x07")
    r = kxutil.openssl("pkey", "-in", junk, "-noout", env=dev.env)
    assert r.rc != 0 and "malformed KEYX KEY file" in r.err, r


def test_ephemeral_hardware_key_cannot_be_written(dev, tmp):
    out = tmp / "k.pem"
    r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt",
                       f"keyx-backend:{dev.name}", "-out", out, env=dev.env)
    assert r.rc != 0 and f"its private part stays in the {dev.name} backend" in r.err, r
    assert "PRIVATE KEY" not in (out.read_text() if out.exists() else "")


def test_reference_holds_no_private_bytes(hsm, tmp):
    """A private key the test knows, written to the token with pkcs11-tool, then referred to:
    neither the PEM nor its DER holds the scalar in any form."""
    env = hsm.env(OPENSSL_CONF=kxutil.write_cnf(tmp / "openssl.cnf", keyx=hsm.keyx_settings()))
    key = tmp / "known.pem"
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", key,
                   env=kxutil.base_env()).ok("known key")
    text = kxutil.openssl("pkey", "-in", key, "-text", "-noout", env=kxutil.base_env()).ok("text").out
    priv_hex = "".join(re.search(r"priv:\n(.*?)\npub:", text, re.S).group(1).split()).replace(":", "")
    scalar = bytes.fromhex(priv_hex)[-32:]
    der = tmp / "known.der"
    kxutil.openssl("pkey", "-in", key, "-outform", "DER", "-out", der, env=kxutil.base_env()).ok("der")
    hsm.tool("keyx-a", "--write-object", der, "--type", "privkey", "--label", "known", "--id", "7777",
             "--usage-derive").ok("write private key")
    pub = tmp / "known.pub.der"
    kxutil.openssl("pkey", "-in", key, "-pubout", "-outform", "DER", "-out", pub, env=kxutil.base_env()).ok("pub")
    hsm.tool("keyx-a", "--write-object", pub, "--type", "pubkey", "--label", "known", "--id", "7777").ok("write pub")
    ref = tmp / "ref.pem"
    kxutil.openssl("pkey", "-in", "pkcs11:token=keyx-a;object=known;type=private", "-out", ref, env=env).ok("ref")
    pem = ref.read_text()
    body = pem_body(pem, "KEYX KEY")
    for form in kxutil.secret_forms(scalar.hex()):
        assert (form.encode() if isinstance(form, str) else form) not in body
    kxutil.assert_no_secrets(pem, [scalar.hex()], "reference file")
    assert scalar not in body and scalar.hex() not in pem.lower()
    # and it is the known key: the default provider derives the same with the peer
    peer_key, peer_pub = peer_pair(tmp)
    known_pub = tmp / "known.pub.pem"
    kxutil.openssl("pkey", "-in", key, "-pubout", "-out", known_pub, env=kxutil.base_env()).ok("pub pem")
    assert derive(env, ref, peer_pub, tmp / "a.bin") == derive(kxutil.base_env(), peer_key, known_pub, tmp / "b.bin")


def test_software_keys_stay_pkcs8_with_encryption_honoured(tmp, cnf):
    env = kxutil.base_env(OPENSSL_CONF=cnf(keyx={"backends": "software"}))
    plain, enc = tmp / "plain.pem", tmp / "enc.pem"
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt", "keyx-backend:software",
                   "-out", plain, env=env).ok("genpkey")
    assert plain.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-aes-256-cbc", "-pass", "pass:kx-7781",
                   "-out", enc, env=env).ok("genpkey encrypted")
    assert enc.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    neutral = kxutil.base_env()
    r = kxutil.openssl("pkey", "-in", enc, "-passin", "pass:wrong", "-noout", env=neutral)
    assert r.rc != 0
    kxutil.openssl("pkey", "-in", enc, "-passin", "pass:kx-7781", "-noout", env=neutral).ok("decrypts")


def test_uri_naming_several_keys_is_refused_a_token_uri_lists(hsm, tmp):
    """A URI with object=/id= that matches two keys is an error (the listing's first key could be
    the wrong one); a URI naming only the token lists its keys."""
    dev = Device("pkcs11", tmp, hsm=hsm)
    for kid in ("b1", "b2"):
        hsm.tool("keyx-a", "--keypairgen", "--key-type", "EC:prime256v1", "--label", "twin", "--id", kid,
                 "--usage-derive").ok("twin key")
    _, peer_pub = peer_pair(tmp)
    r = kxutil.openssl("pkeyutl", "-derive", "-inkey", "pkcs11:token=keyx-a;object=twin;type=private",
                       "-peerkey", peer_pub, env=dev.env)
    assert r.rc != 0 and "several private keys match" in r.err, r
    r = kxutil.openssl("storeutl", "-keys", "-text", "-noout", "pkcs11:token=keyx-a", env=dev.env).ok("storeutl")
    assert r.out.count("object=twin") == 2, r.out


def test_tpm_reference_reads_without_the_tpm(tpm, tmp, free_port):
    """A forking server's master reads its TPM certificate key before the fork and must not open
    the TPM (tpm2-abrmd's TCTI cannot be opened again in the workers): the reference
    reads with the TPM unreachable, and its first use meets the TPM's absence, naming the TCTI."""
    dev = Device("tpm", tmp, tpm=tpm)
    ref = tmp / "srv.pem"
    dev.genpkey(ref)
    dead = f"swtpm:host=127.0.0.1,port={free_port}"
    env = dict(dev.env, KEYX_TPM_TCTI=dead)
    r = kxutil.run(["/usr/bin/python3", "-c", PEM_READ, ref], env=env).ok("PEM_read_bio_PrivateKey")
    assert r.out.splitlines() == ["key"], r
    _, peer_pub = peer_pair(tmp)
    r = kxutil.openssl("pkeyutl", "-derive", "-inkey", ref, "-peerkey", peer_pub, env=env)
    assert r.rc != 0 and f"TCTI '{dead}'" in r.err, r
    kxutil.openssl("pkeyutl", "-derive", "-inkey", ref, "-peerkey", peer_pub, "-out", tmp / "z",
                   env=dev.env).ok("derive with the TPM back")
