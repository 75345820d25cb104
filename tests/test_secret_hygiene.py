"""Secret hygiene: with KEYX_DEBUG=1 and the audit log on, every operation runs on
every backend with secrets the test knows, and none of them appears in any output or log of
keyx (kxutil.assert_no_secrets: hex both cases, base64; private key components one by one):

- known private keys imported into each backend (EC P-256, DH ffdhe2048, X25519; RSA 2048 for
  OAEP): the scalar / private exponent, primes and CRT values;
- secrets derived with them, computed independently by the default provider;
- RSA OAEP plaintexts the default provider encrypted; RSASVE KEM round trips;
- ECDSA signing with a known key (software), a TLS 1.3 server with a known certificate key whose
  key shares are made in the backend;
- `genpkey` of a token key with the PIN given as file:, env: and literally; a wrong PIN.

The drivers print their results on stdout by design (`id ok <secret>`): there only the
expected result lines are allowed, everything else (stderr, the audit log, the debug trace) must
be clean. Then: software secrets are wiped before they are freed (test_freed_memory_*): an
application derives with a known software key through keyx, frees everything and its memory
is read through /proc/PID/mem; neither the secret nor the private scalar is found. The same
scan finds a copy the application deliberately leaves behind (the scanner works), and is run
on the default provider alone for comparison.
"""

import os
import re
import subprocess

import pytest

import kxutil
from fixture_softhsm import PIN, SoftHSM
from fixture_swtpm import tpm_cnf
from test_rsa_wycheproof import wrap_cmd

BACKENDS = ["software", "pkcs11", "tpm"]
WRONG_PIN = "kxwrong-8080"


def components(pem_path, env):
    """Hex strings of a private key's secret components, parsed from the default provider's
    `pkey -text` (priv, privateExponent, prime1/2, exponent1/2, coefficient)."""
    text = kxutil.openssl("pkey", "-in", pem_path, "-text", "-noout", env=env).ok("pkey -text").out
    out, cur = [], None
    for line in text.splitlines():
        m = re.match(r"^(priv|private-key|privateExponent|prime1|prime2|exponent1|exponent2|coefficient):", line)
        if m:
            cur = []
            out.append(cur)
            continue
        if cur is not None and re.match(r"^\s+[0-9a-f:]+$", line):
            cur.append(line.strip().replace(":", ""))
        else:
            cur = None
    vals = ["".join(c).lstrip("0") or "0" for c in out]
    vals = [v if len(v) % 2 == 0 else "0" + v for v in vals]
    assert vals, f"no private components in:\n{text}"
    return vals


class Rig:
    """One backend's configuration (KEYX_DEBUG on, audit log) and the texts collected."""

    def __init__(self, name, tmp, hsm=None, tpm=None):
        self.name, self.tmp, self.hsm, self.tpm = name, tmp, hsm, tpm
        self.log = tmp / "audit.jsonl"
        settings = {"audit-log": self.log, "debug": 1}
        if name == "software":
            self.cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={"backends": "software", **settings})
            self.env = kxutil.base_env(OPENSSL_CONF=self.cnf, KEYX_DEBUG=1)
        elif name == "pkcs11":
            settings.update(hsm.keyx_settings(**{"pkcs11-raw-rsa": 1}))
            self.cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx=settings)
            self.env = hsm.env(OPENSSL_CONF=self.cnf, KEYX_DEBUG=1)
        else:
            self.cnf = tpm_cnf(tmp / "openssl.cnf", tpm, keyx=settings)
            self.env = kxutil.base_env(OPENSSL_CONF=self.cnf, KEYX_DEBUG=1)
        self.texts = []  # (where, text) that must hold no secret
        self.secrets = []

    def keep(self, where, *texts):
        for t in texts:
            self.texts.append((where, t if isinstance(t, str) else t.decode("utf-8", "replace")))

    def driver_stdout(self, where, r, pattern):
        """A driver's stdout: only its result lines (which carry the secret by design)."""
        for line in r.out.splitlines():
            assert re.fullmatch(pattern, line), f"{where}: unexpected stdout line {line!r}"
        self.keep(where + " stderr", r.err)

    def import_backend(self):
        return None if self.name == "software" else self.name


def derive_known(rig, tmp):
    vectors, algs = [], [("EC", "P-256"), ("DH", "ffdhe2048"), ("X25519", "X25519")]
    if rig.name == "tpm":
        algs = [("EC", "P-256"), ("EC", "P-384")]
    elif rig.name == "pkcs11":
        algs = [("EC", "P-256"), ("DH", "ffdhe2048")]
    for i, (alg, group) in enumerate(algs):
        k = kxutil.pair(alg, group)
        rig.secrets += [k["A"]["priv"], k["B"]["priv"], k["S"]]
        vectors.append((f"v{i}", alg, group, k["A"]["priv"], "spki", k["B"]["spki"], k["S"]))
    # pair()'s DH secret is the padded one: derive padded too, or a secret with a leading zero
    # byte (1 in 256) would differ by that byte alone.
    got, r = kxutil.derive([v[:6] for v in vectors], env=rig.env, backend=rig.import_backend(), config=rig.cnf,
                           dh_pad=1)
    for v in vectors:
        assert got[v[0]].ok and got[v[0]].secret == v[6], f"{rig.name}: {got[v[0]]} (default provider: {v[6]})"
    rig.driver_stdout("derive driver", r, r"v\d ok [0-9a-f]+")


def rsa_known(rig, tmp):
    env = kxutil.base_env()
    key = tmp / "rsa.pem"
    kxutil.openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key, env=env).ok()
    rig.secrets += components(key, env)
    der = kxutil.openssl("pkey", "-in", key, "-outform", "DER", env=env, text=False).ok().out
    msg = os.urandom(32)
    rig.secrets.append(msg.hex())
    (tmp / "msg").write_bytes(msg)
    kxutil.openssl("pkeyutl", "-encrypt", "-inkey", key, "-in", tmp / "msg", "-out", tmp / "ct",
                   "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256",
                   "-pkeyopt", "rsa_mgf1_md:sha256", env=env).ok("encrypt")
    ct = (tmp / "ct").read_bytes().hex()
    cmd = wrap_cmd("keyx", rig.import_backend(), rig.cnf)
    r = kxutil.run(cmd + ["oaep"], input=f"1 {der.hex()} SHA-256 SHA-256 - {ct}\n", env=rig.env)
    assert r.rc == 0 and r.out.strip() == f"1 ok {msg.hex()}", f"{rig.name} OAEP:\n{r!r}"
    rig.driver_stdout("oaep driver", r, r"1 ok [0-9a-f]+")
    r = kxutil.run(cmd + ["kem", "gen:2048"], env=rig.env)
    assert r.rc == 0 and r.out.startswith("kem ok"), f"{rig.name} KEM:\n{r!r}"
    rig.driver_stdout("kem driver", r, r"kem ok \d+")


def sign_known(rig, tmp):
    env = kxutil.base_env()
    key = tmp / "sig.pem"
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", key, env=env).ok()
    rig.secrets += components(key, env)
    data = tmp / "data"
    data.write_bytes(os.urandom(100))
    r = kxutil.openssl("dgst", "-sha256", "-sign", key, "-out", tmp / "sig", data, env=rig.env)
    r.ok("sign")
    rig.keep("dgst -sign", r.out, r.err)
    kxutil.openssl("pkey", "-in", key, "-pubout", "-out", tmp / "sig.pub", env=env).ok()
    kxutil.openssl("dgst", "-sha256", "-verify", tmp / "sig.pub", "-signature", tmp / "sig", data,
                   env=env).ok("default provider verifies keyx's signature")


def tls_known(rig, tmp, certs, s_server, s_client):
    crt, key = certs["ec"]
    rig.secrets += components(key, kxutil.base_env())
    srv = s_server(["-naccept", "2", "-cert", crt, "-key", key, "-groups", "P-256"], rig.env)
    for _ in range(2):
        r = s_client(srv.port, ["-tls1_3", "-groups", "P-256"], kxutil.base_env())
        assert r.rc == 0 and kxutil.protocol(r.out) == "TLSv1.3", r
    rig.keep("s_server", srv.wait())
    events = [e for e in kxutil.read_audit(rig.log) if e["pid"] == srv.pid]
    assert [e for e in events if e["event"] == "derive" and e["ok"] and e["backend"] == rig.name], events


def pin_paths(rig, tmp):
    """genpkey of token keys with the PIN as file:, env: and literal; a wrong PIN."""
    rig.secrets += [PIN.encode().hex(), WRONG_PIN.encode().hex()]
    base = {**rig.hsm.keyx_settings(), "audit-log": rig.log, "debug": 1}
    variants = {
        "file": {},
        "env": {"pkcs11-pin": "env:KEYX_HYGIENE_PIN"},
        "literal": {"pkcs11-pin": PIN},
    }
    for n, (name, more) in enumerate(variants.items()):
        cnf = kxutil.write_cnf(tmp / f"pin-{name}.cnf", keyx={**base, **more})
        env = rig.hsm.env(OPENSSL_CONF=cnf, KEYX_DEBUG=1, KEYX_HYGIENE_PIN=PIN)
        r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt",
                           f"keyx-label:hyg-{name}", "-out", tmp / f"hyg-{name}.pem", env=env)
        r.ok(f"genpkey with the PIN by {name}")
        rig.keep(f"genpkey PIN {name}", r.out, r.err, (tmp / f"hyg-{name}.pem").read_text())
        if name == "literal":
            assert "literal PIN" in r.err, r
    bad = tmp / "bad-pin"
    bad.write_text(WRONG_PIN)
    cnf = kxutil.write_cnf(tmp / "pin-wrong.cnf", keyx={**base, "pkcs11-pin": f"file:{bad}"})
    r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256",
                       env=rig.hsm.env(OPENSSL_CONF=cnf, KEYX_DEBUG=1))
    assert r.rc != 0 and "PIN incorrect" in r.err, r
    rig.keep("wrong PIN", r.out, r.err)
    # the token now shows a failed login, which keyx heeds in every process: the right PIN
    # once resets it for the tests that share this token
    rig.hsm.tool("keyx-a", "--list-objects").ok("a login with the right PIN")
    # a PIN inside a URI (RFC 7512 pin-value) is never echoed by keyx either
    r = kxutil.run(["/usr/bin/python3", "-c", kxutil.LIBCRYPTO_CTYPES + PIN_URI, cnf,
                    f"pkcs11:token=nothing;object=x;type=private?pin-value={PIN}"], env=rig.hsm.env(KEYX_DEBUG=1))
    assert r.rc == 0 and "refused" in r.out, r
    rig.keep("URI with pin-value", r.out, r.err)


PIN_URI = r"""
open_ = fn("OSSL_STORE_open_ex", c_void_p, c_char_p, c_void_p, c_char_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p)
load = fn("OSSL_STORE_load", c_void_p, c_void_p)
ctx = LIB_new()
assert LIB_load(ctx, sys.argv[1].encode()) == 1
st = open_(sys.argv[2].encode(), ctx, None, None, None, None, None, None)
info = load(st) if st else None
print("loaded" if info else "refused", flush=True)
print_errors()
"""


@pytest.fixture(params=BACKENDS)
def rig(request, tmp, tmp_path_factory):
    if request.param == "pkcs11":
        return Rig("pkcs11", tmp, hsm=SoftHSM(tmp_path_factory.mktemp("hyg-hsm")).setup())
    if request.param == "tpm":
        return Rig("tpm", tmp, tpm=request.getfixturevalue("swtpm_factory")())
    return Rig("software", tmp)


def test_no_secret_in_any_output_or_log(rig, tmp, certs, s_server, s_client):
    derive_known(rig, tmp)
    rsa_known(rig, tmp)
    if rig.name == "software":
        sign_known(rig, tmp)
    tls_known(rig, tmp, certs, s_server, s_client)
    if rig.name == "pkcs11":
        pin_paths(rig, tmp)
    log = rig.log.read_text()
    events = kxutil.read_audit(rig.log)
    kxutil.check_audit_schema(events)
    kinds = {e["event"] for e in events}
    want = {"load", "derive", "decrypt", "decapsulate", "keygen"}  # encapsulation: the default provider
    assert want <= kinds, f"operations missing from the audit log: {want - kinds}"
    debug = "\n".join(t for _, t in rig.texts)
    assert "keyx: " in debug, "KEYX_DEBUG produced no trace: the test would see nothing"
    assert len(rig.secrets) >= 10
    kxutil.assert_no_secrets(log, rig.secrets, f"{rig.name} audit log")
    for where, text in rig.texts:
        kxutil.assert_no_secrets(text, rig.secrets, f"{rig.name} {where}")
        if rig.name == "pkcs11":
            assert PIN not in text and WRONG_PIN not in text, f"{where}: a PIN"


def test_assert_no_secrets_catches_a_leak():
    """The check itself: a secret written in any of its forms is found."""
    import base64
    s = os.urandom(32)
    for text in (s.hex(), s.hex().upper(), base64.b64encode(s).decode()):
        with pytest.raises(AssertionError):
            kxutil.assert_no_secrets(f"x {text} y", [s.hex()], "sample")


# ---- freed memory ---------------------------------------------------------------------------

MEMAPP = kxutil.LIBCRYPTO_CTYPES + r"""
import os
d_derive = fn("EVP_PKEY_derive", c_int, c_void_p, c_void_p, POINTER(c_size_t))
prov = fn("EVP_PKEY_CTX_get0_provider", c_void_p, c_void_p)
pname = fn("OSSL_PROVIDER_get0_name", c_char_p, c_void_p)
cleanse = fn("OPENSSL_cleanse", None, c_void_p, c_size_t)
libc = ctypes.CDLL(None)
libc.malloc.restype = c_void_p
libc.malloc.argtypes = [c_size_t]
libc.free.argtypes = [c_void_p]
libc.memcpy.argtypes = [c_void_p, c_void_p, c_size_t]
cnf, keyfile, peerfile, mode = sys.argv[1:5]
ctx = LIB_new()
assert LIB_load(ctx, cnf.encode()) == 1
def read(path, propq):
    b = bio_file(path.encode(), b"r")
    k = read_pem(b, None, None, None, ctx, propq)
    bio_free(b)
    return k
# The PEM keys are decoded by the default provider, as the openssl tool does; the derive runs
# in keyx (the key is exported into keyx's software backend) or, for comparison, in default.
propq = b"provider=default" if mode in ("default", "kdf-default") else b"provider=keyx"
kdf_type = fn("EVP_PKEY_CTX_set_ecdh_kdf_type", c_int, c_void_p, c_int)
kdf_md = fn("EVP_PKEY_CTX_set_ecdh_kdf_md", c_int, c_void_p, c_void_p)
kdf_outlen = fn("EVP_PKEY_CTX_set_ecdh_kdf_outlen", c_int, c_void_p, c_int)
md_fetch = fn("EVP_MD_fetch", c_void_p, c_void_p, c_char_p, c_char_p)
md_free = fn("EVP_MD_free", None, c_void_p)
i2d = fn("i2d_PUBKEY", c_int, c_void_p, POINTER(POINTER(ctypes.c_ubyte)))
tohex = fn("OPENSSL_buf2hexstr", c_void_p, c_void_p, ctypes.c_long)
keygen = fn("EVP_PKEY_Q_keygen", c_void_p, c_void_p, c_char_p, c_char_p, c_char_p)
for _ in range(3):
    if mode == "device":
        # a key made in the configured hardware backend: its public key is printed, the test
        # computes the secret from the peer's side
        key = keygen(ctx, b"provider=keyx", b"EC", b"P-256")
        assert key
        der = POINTER(ctypes.c_ubyte)()
        n = i2d(key, byref(der))
        h = tohex(der, n)
        print("pub", ctypes.string_at(h).decode().replace(":", ""), flush=True)
        ossl_free(h, None, 0)
        ossl_free(der, None, 0)
    else:
        key = read(keyfile, b"provider=default")
    peer = read(peerfile, b"provider=default")
    assert key and peer
    c = CTX_pkey(ctx, key, propq)
    assert d_init(c) == 1
    owner = pname(prov(c)).decode()
    if mode.startswith("kdf"):
        # CMS's ECDH: the application gets X9.63 KDF output, never Z (EVP_PKEY_ECDH_KDF_X9_63)
        md = md_fetch(ctx, b"SHA256", None)
        assert md and kdf_type(c, 2) == 1 and kdf_md(c, md) == 1 and kdf_outlen(c, 32) == 1
        md_free(md)
    n = c_size_t(0)
    assert d_peer(c, peer) == 1 and d_derive(c, None, byref(n)) == 1
    buf = libc.malloc(n.value)
    assert d_derive(c, buf, byref(n)) == 1
    if mode == "leak":
        extra = libc.malloc(n.value)
        libc.memcpy(extra, buf, n.value)
        libc.free(extra)  # freed without cleansing: the scan must find it
    cleanse(buf, n.value)
    libc.free(buf)
    CTX_free(c)
    pkey_free(key)
    pkey_free(peer)
LIB_free(ctx)
print("done", owner, flush=True)
sys.stdin.readline()
"""


def scan(pid, needles):
    """{name: [region descriptions]} where each needle (bytes) is found in pid's writable
    memory (heap, anonymous mappings, stacks, libraries' data)."""
    found = {k: [] for k in needles}
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if "r" not in parts[1] or "w" not in parts[1] or hi - lo > 1 << 30:
                continue
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except OSError:
                continue
            for k, v in needles.items():
                if v in data:
                    found[k].append(parts[-1] if len(parts) > 5 else "[anon]")
    return {k: v for k, v in found.items() if v}


def run_memapp(tmp, cnf, key, peer, mode, **extra_env):
    script = tmp / "memapp.py"
    script.write_text(MEMAPP)
    env = kxutil.base_env(OPENSSL_CONF=cnf, **extra_env)
    p = subprocess.Popen(["/usr/bin/python3", str(script), str(cnf), str(key), str(peer), mode],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         text=True, start_new_session=True)
    try:
        pubs = []
        while (line := p.stdout.readline().split()) and line[0] == "pub":
            pubs.append(line[1])
        assert line and line[0] == "done", p.stderr.read() if p.poll() is not None else "no answer"
        if mode == "device":
            return p, line[1], pubs
        return p, line[1]
    except BaseException:
        kxutil.kill_group(p)
        raise


@pytest.fixture
def mem_keys(tmp):
    """A known P-256 key pair (PEM), their secret (default provider), the private scalar."""
    env = kxutil.base_env()
    key, peer = tmp / "a.pem", tmp / "b.pem"
    for k in (key, peer):
        kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", k, env=env).ok()
    kxutil.openssl("pkey", "-in", peer, "-pubout", "-out", tmp / "b.pub", env=env).ok()
    kxutil.openssl("pkeyutl", "-derive", "-inkey", key, "-peerkey", tmp / "b.pub", "-out", tmp / "s",
                   env=env).ok()
    secret = (tmp / "s").read_bytes()
    scalar = bytes.fromhex(components(key, env)[0])
    (tmp / "s").unlink()
    # glibc's free() writes its list pointers over the first 16 bytes of a small chunk: the last
    # 16 bytes of a freed copy survive, so they are what the scan looks for
    return key, peer, {"secret": secret[16:], "scalar": scalar.rjust(32, b"\0")[16:]}


# Not compared with the default provider's run: the private scalar. libcrypto's PEM decoding of
# the key file frees three buffers holding it without cleansing (d2i_ECPrivateKey's EC_PRIVATEKEY
# and two decoder buffers: traced with a free() interposer on OpenSSL 3.5, the same three frees in
# both runs, no keyx frame), so whether 16 bytes of it survive until the scan depends on how the
# heap was reused afterwards, not on keyx (on 3.5 it came and went with an unrelated decoder
# registration). Z, which only the derive ever holds, is asserted in every run.
PEM_LEFTOVERS = {"scalar"}


def freed_memory(cnf, tmp, mem_keys, mode):
    key, peer, needles = mem_keys
    p, owner = run_memapp(tmp, cnf(keyx={"backends": "software"}), key, peer, mode)
    try:
        return scan(p.pid, needles), owner
    finally:
        p.stdin.close()
        p.wait(kxutil.TIMEOUT)


def test_freed_memory_holds_no_software_secret(build, cnf, tmp, mem_keys):
    """Three derives through keyx's software backend, everything freed: the derived secret is
    nowhere in the process. The private scalar is not asserted here: the default provider alone
    (PEM decoding, its own EC key) leaves it in the heap too (test_freed_memory_reference)."""
    found, owner = freed_memory(cnf, tmp, mem_keys, "keyx")
    assert owner == "keyx", f"the derive did not run in keyx ({owner}): nothing tested"
    ref, _ = freed_memory(cnf, tmp, mem_keys, "default")
    # OpenSSL 3.5 leaves part of the secret in the application thread's stack, with or without
    # keyx (test_freed_memory_reference); wiping 64 KiB of stack below keyx's derive did not
    # remove it, so it is not in keyx's frames. Anywhere else, and on 3.0 anywhere, it fails.
    openssl_stack = kxutil.openssl_version() >= (3, 5) and ref.get("secret") == ["[stack]"]
    assert "secret" not in found or (openssl_stack and found["secret"] == ["[stack]"]), (
        f"after everything was freed the process still holds the secret: {found}")
    assert set(found) - PEM_LEFTOVERS <= set(ref), f"keyx leaves more than the default provider alone: {found} vs {ref}"


def test_kdf_leaves_no_z(build, cnf, tmp, mem_keys):
    """With the X9.63 KDF (as CMS asks for it) the application receives only KDF output, and
    after three derives and freeing everything Z is nowhere in the process (on 3.5: nowhere but
    where the default provider alone leaves it, the stack). A copy of Z freed without cleansing
    is found (tried by hand: an OPENSSL_memdup+free in keyx's KDF derive); keyx's own stack
    buffer for Z is overwritten by later calls before the scan, so its OPENSSL_cleanse is not
    what this test shows."""
    found, owner = freed_memory(cnf, tmp, mem_keys, "kdf")
    assert owner == "keyx", f"the derive did not run in keyx ({owner}): nothing tested"
    ref, ref_owner = freed_memory(cnf, tmp, mem_keys, "kdf-default")
    assert ref_owner == "default"
    openssl_stack = kxutil.openssl_version() >= (3, 5) and ref.get("secret") == ["[stack]"]
    assert "secret" not in found or (openssl_stack and found["secret"] == ["[stack]"]), (
        f"after a KDF derive the process still holds Z: {found}")
    assert set(found) - PEM_LEFTOVERS <= set(ref), f"keyx leaves more than the default provider alone: {found} vs {ref}"


def test_freed_memory_scan_finds_a_copy(build, cnf, tmp, mem_keys):
    """The scanner works: a copy of the secret the application frees without cleansing is found."""
    found, owner = freed_memory(cnf, tmp, mem_keys, "leak")
    assert owner == "keyx" and "secret" in found, f"the scan does not find a copy left on purpose: {found}"


def test_freed_memory_reference(build, cnf, tmp, mem_keys):
    """For the record: what the default provider alone leaves (libcrypto, not keyx)."""
    found, owner = freed_memory(cnf, tmp, mem_keys, "default")
    assert owner == "default"
    # OpenSSL 3.5 leaves part of the secret in the application thread's stack (3.0 does not)
    stack_ok = kxutil.openssl_version() >= (3, 5)
    assert "secret" not in found or (stack_ok and found["secret"] == ["[stack]"]), (
        f"the default provider leaves the secret: {found}")
    print(f"default provider alone leaves: {sorted(found.items()) or 'nothing'}")


@pytest.mark.parametrize("device", ["tpm", "tpm-no-sessions", "pkcs11"])
def test_freed_memory_holds_no_device_secret(build, tmp, tmp_path_factory, mem_keys, swtpm, device):
    """Keys made in the TPM (the secret comes back through keyx's session decryption, or in the
    clear without sessions) and on the token (C_GetAttributeValue of the derived object): after
    three derives and freeing everything, no part of the secrets is in the application. The
    secrets are computed here from the peer's side with the public keys the application printed."""
    _, peer, _ = mem_keys
    if device == "pkcs11":
        hsm = SoftHSM(tmp_path_factory.mktemp("mem-hsm")).setup()
        conf = kxutil.write_cnf(tmp / "dev.cnf", keyx={**hsm.keyx_settings(), "audit-log": tmp / "audit.jsonl"})
        env_extra = {"SOFTHSM2_CONF": hsm.conf}
    else:
        more = {"tpm-encrypt-sessions": 0} if device == "tpm-no-sessions" else {}
        conf = tpm_cnf(tmp / "dev.cnf", swtpm, keyx={"audit-log": tmp / "audit.jsonl", **more})
        env_extra = {}
    p, owner, pubs = run_memapp(tmp, conf, peer, peer, "device", **env_extra)
    try:
        peer_priv = components(peer, kxutil.base_env())[0].rjust(64, "0")
        want, _ = kxutil.derive([(i, "EC", "P-256", peer_priv, "spki", pub) for i, pub in enumerate(pubs)],
                                provider="default")
        secrets = {f"secret{i}": bytes.fromhex(o.secret)[16:] for i, o in want.items()}
        assert len(secrets) == 3 and all(o.ok for o in want.values()), want
        found = scan(p.pid, secrets)
    finally:
        p.stdin.close()
        p.wait(kxutil.TIMEOUT)
    derives = [e for e in kxutil.read_audit(tmp / "audit.jsonl") if e["event"] == "derive" and e["ok"]]
    backend = "pkcs11" if device == "pkcs11" else "tpm"
    assert len(derives) == 3 and {e["backend"] for e in derives} == {backend}, derives
    assert not found, f"after everything was freed the application still holds: {found}"
