"""Malformed key files and URIs: a KEYX KEY reference (pkcs11 and tpm) and a TSS2
PRIVATE KEY file are truncated at many lengths, bit-flipped at many positions, given another
version, an unknown backend, junk inside and around the PEM. Each file is read as applications
read it, PEM_read_bio_PrivateKey_ex in a library context with keyx (Python + ctypes, one process
for all files), and a sample through the openssl tool. Each must either be refused within 5 s
with an error (no crash, no sanitizer report), or load the very same key: a mutated file that
loads must derive the genuine key's secret, never another key's. Malformed keyx: and pkcs11:
URIs are refused the same way. Nothing is added to the token or left in the TPM.

test_keyref.py and test_tpm_keyfiles.py cover each malformed case with its exact message.
"""

import base64
import random
import time
from pathlib import Path

import kxutil
from fixture_softhsm import SoftHSM
from fixture_swtpm import tpm_cnf
from test_tpm_keyfiles import make_tools_key, tss2_der, tss2_pem

READER = kxutil.LIBCRYPTO_CTYPES + r"""
import time
get_err = fn("ERR_get_error_all", ctypes.c_ulong, POINTER(c_char_p), POINTER(c_int), POINTER(c_char_p),
             POINTER(c_char_p), POINTER(c_int))
reason = fn("ERR_reason_error_string", c_char_p, ctypes.c_ulong)
def errs():
    out = []
    while True:
        f, l, fu, data, fl = c_char_p(), c_int(), c_char_p(), c_char_p(), c_int()
        e = get_err(byref(f), byref(l), byref(fu), byref(data), byref(fl))
        if not e:
            return (" | ".join(out) or "no error recorded").replace("\n", " ")
        out.append(f"{(reason(e) or b'?').decode()}:{(data.value or b'').decode('utf-8', 'replace')}")
ctx = LIB_new()
assert LIB_load(ctx, sys.argv[1].encode()) == 1
b = bio_file(sys.argv[2].encode(), b"r")
peer = read_pem(b, None, None, None, ctx, b"provider=default")
bio_free(b)
assert peer
def derive(key):
    c = CTX_pkey(ctx, key, None)
    n = c_size_t(0)
    ok = c and d_init(c) == 1 and d_peer(c, peer) == 1 and d_derive(c, None, byref(n)) == 1
    buf = ctypes.create_string_buffer(max(n.value, 1))
    ok = ok and d_derive(c, buf, byref(n)) == 1
    CTX_free(c)
    return buf.raw[: n.value].hex() if ok else None
for path in sys.argv[3:]:
    t = time.monotonic()
    b = bio_file(path.encode(), b"r")
    key = read_pem(b, None, None, None, ctx, None) if b else None
    if b:
        bio_free(b)
    if not key:
        res = "refused " + errs()
    else:
        s = derive(key)
        res = ("secret " + s) if s else ("usefail " + errs())
        pkey_free(key)
        errs()
    print(f"{path}\t{time.monotonic() - t:.3f}\t{res}", flush=True)
pkey_free(peer)
LIB_free(ctx)
"""


def pem_of(der, name):
    b = base64.b64encode(der).decode()
    return f"-----BEGIN {name}-----\n" + "\n".join(b[i:i + 64] for i in range(0, len(b), 64)) + \
        f"\n-----END {name}-----\n"


def der_of(text, name):
    body = text.split(f"-----BEGIN {name}-----")[1].split(f"-----END {name}-----")[0]
    return base64.b64decode("".join(body.split()))


def mutations(der, name, seed):
    """{case: file text}: truncations, bit flips, a second version, PEM damage."""
    rng = random.Random(seed)
    out = {}
    for n in sorted({0, 1, 2, 5, 10, len(der) // 4, len(der) // 2, len(der) - 10, len(der) - 1}):
        out[f"truncated-{n}"] = pem_of(der[:n], name)
    for i, pos in enumerate(sorted(rng.sample(range(len(der)), min(40, len(der))))):
        bit = rng.randrange(8)
        out[f"bitflip-{pos}.{bit}"] = pem_of(der[:pos] + bytes([der[pos] ^ (1 << bit)]) + der[pos + 1:], name)
    if name == "KEYX KEY":
        # SEQUENCE { INTEGER 1, UTF8String backend, UTF8String locator, SubjectPublicKeyInfo }
        assert b"\x02\x01\x01" in der[:8], der[:8].hex()
        out["version-2"] = pem_of(der.replace(b"\x02\x01\x01", b"\x02\x01\x02", 1), name)
        out["version-0"] = pem_of(der.replace(b"\x02\x01\x01", b"\x02\x01\x00", 1), name)
        for be, other in ((b"pkcs11", b"pkcs12"), (b"tpm", b"tpx")):
            tag = b"\x0c" + bytes([len(be)]) + be
            if tag in der:
                out["unknown-backend"] = pem_of(der.replace(tag, b"\x0c" + bytes([len(other)]) + other, 1), name)
    out["extra-bytes"] = pem_of(der + b"\x00\x01", name)
    out["doubled"] = pem_of(der + der, name)
    good = pem_of(der, name)
    lines = good.splitlines()
    out["pem-junk-line"] = "\n".join(lines[:2] + ["!!!! not base64 !!!!"] + lines[2:]) + "\n"
    out["pem-bad-base64"] = "\n".join(lines[:1] + [lines[1][:-4] + "****"] + lines[2:]) + "\n"
    out["pem-no-end"] = "\n".join(lines[:-1]) + "\n"
    out["pem-empty"] = f"-----BEGIN {name}-----\n-----END {name}-----\n"
    out["pem-junk-around"] = "garbage before\n\x00\x01\x02\n" + good + "garbage after\n"
    out["pem-wrong-name"] = good.replace(name, "KEYX KEYS")
    return out


def run_reader(cnf, peer, files, env, tmp):
    script = tmp / "reader.py"
    script.write_text(READER)
    r = kxutil.run(["/usr/bin/python3", script, cnf, peer, *files], env=env, timeout=max(kxutil.TIMEOUT, 300))
    assert r.rc == 0, f"the reading application failed (crash?):\n{r!r}"
    got = {}
    for line in r.out.splitlines():
        path, took, res = line.split("\t")
        got[Path(path).stem] = (float(took), res)
    assert len(got) == len(files), r
    return got


def check(got, genuine):
    """Every case refused (with an error) or the genuine key; within 5 s each."""
    problems, loaded = [], []
    for case, (took, res) in got.items():
        if took >= 5:
            problems.append(f"  {case}: {took:.1f}s")
        if res.startswith("secret "):
            if res != "secret " + genuine:
                problems.append(f"  {case}: LOADED ANOTHER KEY")
            loaded.append(case)
        elif "no error recorded" in res:
            problems.append(f"  {case}: refused without an error: {res}")
        if case.split("-", 1)[-1] in ("version-2", "version-0", "unknown-backend") and not res.startswith("refused "):
            problems.append(f"  {case}: must be refused when read: {res}")
        if "unknown-backend" in case and "backend" not in res:
            problems.append(f"  {case}: the error does not name the backend: {res}")
    assert not problems, "malformed key files:\n" + "\n".join(problems)
    return loaded


def write_cases(tmp, cases, prefix):
    files = []
    for case, text in cases.items():
        f = tmp / f"{prefix}-{case}.pem"
        f.write_text(text)
        files.append(f)
    return files


def peer_key(tmp):
    env = kxutil.base_env()
    key = tmp / "peer.pem"
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", key, env=env).ok("peer")
    return key


def tool_sample(files, env):
    """A few of the files through the openssl tool: a clean failure or success, never a signal."""
    for f in files:
        start = time.monotonic()
        r = kxutil.openssl("pkey", "-in", f, "-pubout", env=env)
        assert r.rc is not None and 0 <= r.rc < 128, f"openssl pkey on {f.name}:\n{r!r}"
        assert time.monotonic() - start < 5, f"{f.name} took too long"


def test_mutated_pkcs11_reference(tmp_path_factory, tmp):
    hsm = SoftHSM(tmp_path_factory.mktemp("hsm-mut")).setup()
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx=hsm.keyx_settings())
    env = hsm.env(OPENSSL_CONF=cnf)
    ref = tmp / "ref.pem"
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt", "keyx-label:mut",
                   "-pkeyopt", "keyx-id:77", "-out", ref, env=env).ok("token key")
    before = hsm.token_objects("keyx-a")
    peer = peer_key(tmp)
    der = der_of(ref.read_text(), "KEYX KEY")
    cases = mutations(der, "KEYX KEY", 1)
    files = [ref] + write_cases(tmp, cases, "p11")
    got = run_reader(cnf, peer, files, env, tmp)
    took, res = got["ref"]
    assert res.startswith("secret "), f"the genuine reference does not derive: {res}"
    genuine = res.split(" ", 1)[1]
    loaded = check({k: v for k, v in got.items() if k != "ref"}, genuine)
    assert len(loaded) < len(cases) // 2, f"most mutations loaded: {loaded}"
    tool_sample(files[1:8], env)
    assert hsm.token_objects("keyx-a") == before


def test_mutated_tpm_reference_and_tss2_file(swtpm_factory, tmp):
    tpm = swtpm_factory()
    cnf = tpm_cnf(tmp / "openssl.cnf", tpm)
    env = kxutil.base_env(OPENSSL_CONF=cnf)
    ref = tmp / "ref.pem"
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt", "keyx-backend:tpm",
                   "-pkeyopt", "keyx-persist:0x81000080", "-out", ref, env=env).ok("persistent key")
    pub, priv = make_tools_key(tpm, tmp, "decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
                               "k")
    tss2 = tmp / "tss2.pem"
    tss2_der_bytes = tss2_der(pub, priv, 0x40000001)
    tss2.write_text(tss2_pem(tss2_der_bytes))
    persistent = tpm.tools("tpm2_getcap", "handles-persistent").out
    peer = peer_key(tmp)
    ref_cases = mutations(der_of(ref.read_text(), "KEYX KEY"), "KEYX KEY", 2)
    tss2_cases = mutations(tss2_der_bytes, "TSS2 PRIVATE KEY", 3)
    files = [ref, tss2] + write_cases(tmp, ref_cases, "tpmref") + write_cases(tmp, tss2_cases, "tss2")
    got = run_reader(cnf, peer, files, env, tmp)
    for name in ("ref", "tss2"):
        assert got[name][1].startswith("secret "), f"the genuine {name} does not derive: {got[name]}"
    check({k: v for k, v in got.items() if k.startswith("tpmref-")}, got["ref"][1].split(" ", 1)[1])
    check({k: v for k, v in got.items() if k.startswith("tss2-")}, got["tss2"][1].split(" ", 1)[1])
    tool_sample(files[2:8] + files[-8:], env)
    assert not tpm.tools("tpm2_getcap", "handles-transient").out.strip(), "objects left in the TPM"
    assert tpm.tools("tpm2_getcap", "handles-persistent").out == persistent, "persistent handles changed"


BAD_URIS = [
    "keyx:", "keyx:tpm", "keyx:tpm:", "keyx:tpm:handle=", "keyx:tpm:handle=0x", "keyx:tpm:handle=0x8100",
    "keyx:tpm:handle=0x81000001x", "keyx:tpm:handle=0x81000001;handle=0x81000002", "keyx:floppy:x=1",
    "keyx:software:x", "keyx:pkcs11:token=%", "pkcs11:token=keyx-a;object=%4",
    "pkcs11:token=keyx-a;object=%zz;type=private", "pkcs11:token=keyx-a;type=private;type=public",
    "pkcs11:token=keyx-a;id=%01%;type=private", "pkcs11:token=" + "a" * 5000,
    "pkcs11:token=keyx-a;object=\x01\x02;type=private", "pkcs11:token=nothing?pin-value=1234",
]


def test_malformed_uris_refused_quickly(softhsm, swtpm, tmp):
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={**softhsm.keyx_settings(backends="pkcs11, tpm"),
                                                      "tpm-tcti": swtpm.tcti})
    env = softhsm.env(OPENSSL_CONF=cnf)
    before = softhsm.token_objects("keyx-a")
    # the session's swtpm is shared: what earlier tests left there is not this test's
    transients = swtpm.tools("tpm2_getcap", "handles-transient").out
    for uri in BAD_URIS:
        start = time.monotonic()
        r = kxutil.openssl("pkey", "-in", uri, "-pubout", env=env)
        took = time.monotonic() - start
        assert 0 < r.rc < 128, f"{uri[:60]!r}: not a clean failure:\n{r!r}"
        assert took < 5, f"{uri[:60]!r}: {took:.1f}s"
        assert "BEGIN PUBLIC KEY" not in r.out, f"{uri[:60]!r} loaded a key"
    assert softhsm.token_objects("keyx-a") == before
    assert swtpm.tools("tpm2_getcap", "handles-transient").out == transients, "a refused URI left a TPM object"
