"""RSA key wrapping in the TPM: every decryption is one TPM2_RSA_Decrypt.

- Wycheproof rsa_oaep_* (every single-size file, and the misc file's 2048/3072/4096-bit groups:
  keyx serves those sizes only) with each private key moved into swtpm (TPM2_LoadExternal,
  `--backend tpm`: a key without a scheme of its own): valid vectors give exactly the message,
  invalid ones one and the same error, whatever the digests and the label. The pcap TCTI shows
  which TPM2_RSA_Decrypt ran: the TPM's own OAEP (inScheme OAEP with the hash) when the TPM can
  do the request (a hash it lists, MGF1 with that hash, no label or one ending in a zero byte,
  the TPM's convention), the null scheme (raw RSA, OAEP decoded in keyx) otherwise. Key sizes
  TPM2_TestParms refuses (swtpm 0.7: 4096; checked independently with tpm2_testparms) are
  refused at import, with one text;
- persistent RSA keys made with tpm2-tools (decrypt only, and sign|decrypt), by
  `keyx:tpm:handle=0x81...`: openssl pkeyutl -decrypt of what the default provider encrypted
  to tpm2_readpublic's key, with OAEP-SHA256, a zero-terminated label, a label without the
  zero, MGF1-SHA1 and SHA-224; a wrong label fails with the generic error on both paths; the
  public export equal to tpm2_readpublic's, PKCS#1 v1.5 refused;
- a TSS2 key with a scheme of its own (OAEP-SHA256, tpm2_create): its own parameters decrypt,
  other digests, MGF1 digests, labels without the zero and RSASVE are refused with their
  reasons, whatever the ciphertext; a sign-only RSA key refuses to decrypt;
- RSASVE KEM round trips (TPM keygen and the persistent key), a reused decrypt context;
- the pcap TCTI: with encrypted sessions (default) the plaintext never crosses the bus, nor
  the raw OAEP encoding of keyx's path (computed independently by the default provider), with
  `tpm-encrypt-sessions = 0` both do; exactly one RSA_Decrypt command per decryption.
"""

import os
import re
from collections import Counter

import pytest

import kxutil
from fixture_swtpm import tpm_cnf
from test_rsa_wycheproof import (FILES, MISC, UNIFORM, check_one_error, decrypt, leak_checked, load,
                                 load_sized, wrap_cmd)
from test_tpm_keyfiles import ECC_SRK, app, tss2_der, tss2_pem

OAEP256 = ["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256",
           "-pkeyopt", "rsa_mgf1_md:sha256"]
HANDLE = 0x81000030
URI = f"keyx:tpm:handle=0x{HANDLE:08x}"
RSA_DECRYPT_CC = b"\x00\x00\x01\x59"
MGF1_ERROR = "TPM2_RSA_Decrypt always uses the OAEP digest for MGF1"
LABEL_ERROR = "takes only labels that end with a zero byte"


def tpm_env(tpm, log=None, **extra):
    env = dict(KEYX_BACKENDS="tpm", KEYX_TPM_TCTI=tpm.tcti, **extra)
    if log is not None:
        env["KEYX_AUDIT_LOG"] = log
    return kxutil.base_env(**env)


def tpm_takes_rsa(tpm, bits):
    """Independent of keyx: tpm2-tools asks the TPM (TPM2_TestParms)."""
    return tpm.tools("tpm2_testparms", f"rsa{bits}", check=False).rc == 0


def tpm_hashes(tpm):
    """The hashes the TPM lists (tpm2_getcap algorithms), by their tpm2-tools names."""
    out = tpm.tools("tpm2_getcap", "algorithms").out
    return {h for h in ("sha1", "sha256", "sha384", "sha512") if re.search(rf"^{h}:", out, re.M)}


WYCHEPROOF_HASH = {"SHA-1": "sha1", "SHA-256": "sha256", "SHA-384": "sha384", "SHA-512": "sha512"}


def expected_scheme(md, mgf1, label, hashes):
    """inScheme of the TPM2_RSA_Decrypt a key without a scheme of its own must get: the TPM's
    OAEP with the hash where TPM 2.0 Part 3 lets the TPM do the request (the hash is the TPM's,
    MGF1 uses it too, the label is empty or ends with a zero byte and fits a TPM2B_DATA: at most
    64 bytes, sizeof(TPMU_HA) in Part 2), else the null scheme."""
    h = WYCHEPROOF_HASH.get(md)
    if h in hashes and mgf1 == md and (not label or (label.endswith("00") and len(label) <= 128)):
        return h
    return "null"


def decrypt_schemes(data):
    """inScheme of every TPM2_RSA_Decrypt command in a pcap capture, in order: "null", or the
    OAEP hash ("sha256"). Parameter encryption hides the ciphertext's bytes, not its size, and
    the scheme is the second parameter (never encrypted)."""
    names = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
    out = []
    for m in re.finditer(rb"\x80\x02.{4}" + RSA_DECRYPT_CC, data, re.S):
        i = m.end() + 4  # keyHandle
        i += 4 + int.from_bytes(data[i:i + 4], "big")  # authorization area
        i += 2 + int.from_bytes(data[i:i + 2], "big")  # cipherText
        alg = int.from_bytes(data[i:i + 2], "big")
        if alg == 0x0010:
            out.append("null")
        elif alg == 0x0017:
            out.append(names.get(int.from_bytes(data[i + 2:i + 4], "big"), "oaep-?"))
        else:
            out.append(f"scheme {alg:#06x}")
    return out


@pytest.mark.parametrize("name", FILES + [MISC])
def test_wycheproof_oaep_tpm(swtpm, vectors_dir, tmp, name):
    log, pcap = tmp / "audit.jsonl", tmp / "tpm.pcap"
    tests = load_sized(vectors_dir, name)
    sizes = {b: tpm_takes_rsa(swtpm, b) for b in {t["bits"] for t in tests}}
    hashes = tpm_hashes(swtpm)
    env = tpm_env(swtpm, log, TCTI_PCAP_FILE=pcap)
    env["KEYX_TPM_TCTI"] = f"pcap:{swtpm.tcti}"
    got, res = decrypt(tests, backend="tpm", env=env)
    runnable, refused, schemes = [], Counter(), []
    for t in tests:
        o = got[str(t["tcId"])]
        if not sizes[t["bits"]]:
            want = f"does not take {t['bits']}-bit RSA keys"
            assert not o.ok and want in o.error, f"tcId {t['tcId']}: {o.line[:300]}"
            refused[(t["bits"], o.stage, o.error)] += 1
            continue
        if t["result"] == "valid":
            assert o.ok and o.secret == (t["msg"] or "-"), f"tcId {t['tcId']} {t['comment']!r}: {o.line[:300]}"
        else:
            assert not o.ok, f"invalid tcId {t['tcId']} {t['comment']!r} decrypted"
        runnable.append(t)
        if len(t["ct"]) // 2 <= t["bits"] // 8:  # a longer ciphertext is no number below n: never sent
            schemes.append(expected_scheme(t["md"], t["mgf1"], t["label"], hashes))
    # a size refusal depends on the size only: one text per size
    assert len(refused) <= len({k[0] for k in refused}), refused
    invalid = [t for t in runnable if t["result"] == "invalid"]
    if invalid:
        check_one_error(invalid, got)  # no padding oracle, whichever path decoded
    if runnable:
        assert sum(1 for t in runnable if t["result"] == "valid") >= 10
    # the path of each decryption, seen on the bus: the TPM's OAEP where it can, else raw
    assert decrypt_schemes(pcap.read_bytes()) == schemes
    events = [e for e in kxutil.read_audit(log) if e["pid"] == res.pid]
    kxutil.check_audit_schema(events)
    dec = [e for e in events if e["event"] == "decrypt"]
    assert {e["backend"] for e in dec} <= {"tpm"}, dec[:3]
    assert sum(1 for e in dec if e["ok"]) == sum(1 for o in got.values() if o.ok)
    kxutil.assert_no_secrets(log.read_text(), [t["msg"] for t in tests if len(t["msg"]) >= 16], "audit log")


def test_wycheproof_labels_and_digests_cover_both_paths(swtpm, vectors_dir):
    """The vectors above send both kinds of TPM2_RSA_Decrypt: labels ending in 00 and not,
    MGF1 digests equal to the OAEP digest and not, a digest no TPM has (SHA-224)."""
    hashes = tpm_hashes(swtpm)
    assert {"sha1", "sha256"} <= hashes, hashes
    tests = [t for n in FILES for t in load(vectors_dir, n) if t["result"] == "valid"]
    labels = [t["label"] for t in tests if t["label"]]
    assert any(lb.endswith("00") for lb in labels) and any(not lb.endswith("00") for lb in labels)
    paths = Counter(expected_scheme(t["md"], t["mgf1"], t["label"], hashes) for t in tests)
    assert paths["null"] >= 50 and sum(v for k, v in paths.items() if k != "null") >= 50, paths
    assert any(t["md"] == "SHA-224" for t in tests)


KEY_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda"


def persist_rsa_key(tpm, d, handle, attrs):
    """An RSA-2048 key without a scheme under the owner SRK, evicted to handle (tpm2-tools),
    and its public key as tpm2_readpublic writes it (PEM)."""
    if f"0x{handle:x}" not in tpm.tools("tpm2_getcap", "handles-persistent").out.lower():
        tpm.flush_transient()
        tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256", "-c", d / "prim.ctx")
        tpm.flush_transient()
        tpm.tools("tpm2_create", "-Q", "-C", d / "prim.ctx", "-G", "rsa2048:null:null", "-a", attrs,
                  "-u", d / "key.pub", "-r", d / "key.priv")
        tpm.flush_transient()
        tpm.tools("tpm2_load", "-Q", "-C", d / "prim.ctx", "-u", d / "key.pub", "-r", d / "key.priv",
                  "-c", d / "key.ctx")
        tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", d / "key.ctx", f"0x{handle:x}")
        tpm.flush_transient()
    pub = d / "tpm-rsa.pem"
    tpm.tools("tpm2_readpublic", "-c", f"0x{handle:x}", "-f", "pem", "-o", pub)
    return pub


@pytest.fixture(scope="module")
def persistent_rsa(swtpm, tmp_path_factory):
    """A decrypt-only RSA-2048 key without a scheme at HANDLE."""
    return persist_rsa_key(swtpm, tmp_path_factory.mktemp("tpm-rsa"), HANDLE, "decrypt|" + KEY_ATTRS)


SIGN_DECRYPT_HANDLE = 0x81000032


@pytest.fixture(scope="module")
def persistent_rsa_sign_decrypt(swtpm, tmp_path_factory):
    """A sign|decrypt RSA-2048 key without a scheme (as keyx-persist makes them)."""
    return persist_rsa_key(swtpm, tmp_path_factory.mktemp("tpm-rsa-sd"), SIGN_DECRYPT_HANDLE,
                           "decrypt|sign|" + KEY_ATTRS)


def message(tmp, n=32):
    m = tmp / "message.bin"
    m.write_bytes(os.urandom(n))
    return m


def oaep_opts(md, mgf1, label=None):
    o = ["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", f"rsa_oaep_md:{md}", "-pkeyopt", f"rsa_mgf1_md:{mgf1}"]
    return o + (["-pkeyopt", f"rsa_oaep_label:{label}"] if label else [])


# (name, OAEP digest, MGF1 digest, label, the inScheme keyx must send)
PKEYUTL_CASES = [
    ("plain", "sha256", "sha256", None, "sha256"),
    ("zero-label", "sha256", "sha256", "6b6579782d7772617000", "sha256"),
    ("label", "sha256", "sha256", "6b6579782d77726170", "null"),
    ("mgf1-sha1", "sha256", "sha1", None, "null"),
    ("sha224-label", "sha224", "sha224", "6c6162656c", "null"),
]


@pytest.mark.parametrize("which", ["decrypt", "sign|decrypt"])
def test_pkeyutl_oaep_persistent_key(swtpm, tmp, request, which):
    """openssl pkeyutl -decrypt with any OAEP parameters on a key without a scheme, each
    ciphertext made by the default provider with tpm2_readpublic's public key; the pcap shows
    which TPM2_RSA_Decrypt each ran."""
    if which == "decrypt":
        pub, uri = request.getfixturevalue("persistent_rsa"), URI
    else:
        pub = request.getfixturevalue("persistent_rsa_sign_decrypt")
        uri = f"keyx:tpm:handle=0x{SIGN_DECRYPT_HANDLE:08x}"
    log = tmp / "audit.jsonl"
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"audit-log": log, "tpm-tcti": f"pcap:{swtpm.tcti}"})
    msg = message(tmp)
    for name, md, mgf1, label, scheme in PKEYUTL_CASES:
        ct, out, pcap = tmp / f"ct-{name}.bin", tmp / f"out-{name}.bin", tmp / f"{name}.pcap"
        env = kxutil.base_env(OPENSSL_CONF=cnf, TCTI_PCAP_FILE=pcap)
        kxutil.openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", pub, *oaep_opts(md, mgf1, label),
                       "-in", msg, "-out", ct, env=kxutil.base_env()).ok("encrypt (default provider)")
        r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", uri, *oaep_opts(md, mgf1, label), "-in", ct,
                           "-out", out, env=env).ok(f"decrypt {name} in the TPM")
        assert out.read_bytes() == msg.read_bytes(), name
        assert decrypt_schemes(pcap.read_bytes()) == [scheme], name
        dec = [e for e in kxutil.read_audit(log) if e["event"] == "decrypt" and e["pid"] == r.pid]
        assert [(e["ok"], e["backend"]) for e in dec] == [(True, "tpm")], dec
    # the label is part of the ciphertext: another one does not decrypt, with the same error
    # on the TPM's OAEP (zero-terminated label) and on keyx's decoding (any label)
    env = kxutil.base_env(OPENSSL_CONF=cnf, TCTI_PCAP_FILE=tmp / "rest.pcap")  # not into the cwd
    errors = []
    for name, other in (("zero-label", "6f7468657200"), ("label", "6f74686572"), ("plain", "6f74686572")):
        r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", uri, *oaep_opts("sha256", "sha256", other),
                           "-in", tmp / f"ct-{name}.bin", "-out", tmp / "x.bin", env=env)
        assert r.rc != 0 and UNIFORM in r.err, r
        errors.append([ln.split(":", 1)[1] for ln in r.err.splitlines() if ":error:" in ln])
    assert errors[0] == errors[1] == errors[2], errors
    # public export equals the TPM's; the private key does not leave (a reference does)
    mine = tmp / "pub.pem"
    kxutil.openssl("pkey", "-in", uri, "-pubout", "-out", mine, env=env).ok("public export")
    assert mine.read_text() == pub.read_text()
    kxutil.openssl("pkey", "-in", uri, "-out", tmp / "ref.pem", env=env).ok("key reference")
    ref = (tmp / "ref.pem").read_text()
    assert ref.startswith("-----BEGIN KEYX KEY-----") and "PRIVATE" not in ref, ref
    # freeing never evicts
    assert uri.split("=")[1] in swtpm.tools("tpm2_getcap", "handles-persistent").out.lower()
    kxutil.assert_no_secrets(log.read_text(), [msg.read_bytes().hex()], "audit log")


def tools_rsa_tss2(tpm, d, name, alg, attrs):
    """A TSS2 key file around an RSA key tpm2_create made under the owner storage primary
    keyx uses (ECC P-256 SRK template), and its public key from tpm2_readpublic (PEM)."""
    tpm.flush_transient()
    tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb", "-a", ECC_SRK,
              "-c", d / "srk.ctx")
    tpm.tools("tpm2_create", "-Q", "-C", d / "srk.ctx", "-G", alg, "-a", attrs,
              "-u", d / f"{name}.pub", "-r", d / f"{name}.priv")
    tpm.flush_transient()
    tpm.tools("tpm2_load", "-Q", "-C", d / "srk.ctx", "-u", d / f"{name}.pub", "-r", d / f"{name}.priv",
              "-c", d / f"{name}.ctx")
    tpm.tools("tpm2_readpublic", "-Q", "-c", d / f"{name}.ctx", "-f", "pem", "-o", d / f"{name}-pub.pem")
    tpm.flush_transient()
    key = d / f"{name}.pem"
    key.write_text(tss2_pem(tss2_der((d / f"{name}.pub").read_bytes(), (d / f"{name}.priv").read_bytes(),
                                     0x40000001)))
    return key, d / f"{name}-pub.pem"


def test_fixed_oaep_scheme_key_keeps_its_refusals(swtpm, tmp):
    """A key bound to OAEP-SHA256 by its own scheme cannot decrypt raw (the TPM applies the
    key's scheme): its own parameters decrypt, everything else is refused by its parameters,
    with the reason, the same for every ciphertext. A key without the decrypt attribute is
    refused before the TPM is asked."""
    key, pub = tools_rsa_tss2(swtpm, tmp, "fixed", "rsa2048:oaep-sha256:null", "decrypt|" + KEY_ATTRS)
    env = kxutil.base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm))
    msg = message(tmp)
    cts = {}
    for name, md, mgf1, label in (("own", "sha256", "sha256", None), ("zero-label", "sha256", "sha256", "6b657900"),
                                  ("label", "sha256", "sha256", "6b6579"), ("mgf1", "sha256", "sha1", None),
                                  ("sha1", "sha1", "sha1", None)):
        cts[name] = tmp / f"ct-{name}.bin"
        kxutil.openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", pub, *oaep_opts(md, mgf1, label),
                       "-in", msg, "-out", cts[name], env=kxutil.base_env()).ok("encrypt (default provider)")
    for name, label in (("own", None), ("zero-label", "6b657900")):
        out = tmp / f"out-{name}.bin"
        kxutil.openssl("pkeyutl", "-decrypt", "-inkey", key, *oaep_opts("sha256", "sha256", label),
                       "-in", cts[name], "-out", out, env=env).ok(f"decrypt {name} with the fixed-scheme key")
        assert out.read_bytes() == msg.read_bytes()
    refusals = [(("sha256", "sha256", "6b6579"), "label", LABEL_ERROR),
                (("sha256", "sha1", None), "mgf1", MGF1_ERROR),
                (("sha1", "sha1", None), "sha1", "bound to RSA-OAEP with SHA256 (its own scheme)")]
    for opts, name, text in refusals:
        texts = set()
        for ct in (cts[name], cts["own"]):  # its own ciphertext and another: the same refusal
            r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", key, *oaep_opts(*opts), "-in", ct,
                               "-out", tmp / "x.bin", env=env)
            assert r.rc != 0 and text in r.err and UNIFORM not in r.err, r
            texts.add(tuple(ln.split(":", 1)[1] for ln in r.err.splitlines() if ":error:" in ln))
        assert len(texts) == 1, texts
    # RSASVE needs raw RSA, which this key does not have
    got, r = app(env, tmp, "decap", key, cts["own"])
    assert got is None and "provider keyx" in r.out and "no raw RSA decryption (RSASVE)" in r.err, r
    # without the decrypt attribute (a signing key) nothing is sent to the TPM
    signer, spub = tools_rsa_tss2(swtpm, tmp, "signer", "rsa2048:null:null", "sign|" + KEY_ATTRS)
    ct = tmp / "ct-signer.bin"
    kxutil.openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", spub, *oaep_opts("sha256", "sha256", "6b6579"),
                   "-in", msg, "-out", ct, env=kxutil.base_env()).ok("encrypt (default provider)")
    r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", signer, *oaep_opts("sha256", "sha256", "6b6579"),
                       "-in", ct, "-out", tmp / "x.bin", env=env)
    assert r.rc != 0 and "this TPM key cannot decrypt (RSA_Decrypt)" in r.err, r


def test_pkcs1_v15_decryption_is_refused_tpm(swtpm, tmp, persistent_rsa):
    env = kxutil.base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm))
    msg, ct = message(tmp), tmp / "ct.bin"
    kxutil.openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", persistent_rsa, "-in", msg, "-out", ct,
                   env=kxutil.base_env()).ok("PKCS#1 v1.5 encrypt (default provider)")
    r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", URI, "-in", ct, "-out", tmp / "out.bin", env=env)
    assert r.rc != 0 and "PKCS#1 v1.5 decryption is refused" in r.err, r
    assert not (tmp / "out.bin").exists() or (tmp / "out.bin").read_bytes() != msg.read_bytes()


@pytest.mark.parametrize("key", ["gen:2048", "gen:3072", URI])
def test_kem_round_trip_tpm(swtpm, tmp, persistent_rsa, key):
    if key == "gen:3072" and not tpm_takes_rsa(swtpm, 3072):
        key = "gen:2048"
    log = tmp / "audit.jsonl"
    r = kxutil.run(wrap_cmd() + ["kem", key], env=leak_checked(tpm_env(swtpm, log)), timeout=120)
    nbytes = 384 if key == "gen:3072" else 256
    assert r.rc == 0 and r.out.strip() == f"kem ok {nbytes}", r
    evs = [e for e in kxutil.read_audit(log) if e["pid"] == r.pid]
    kxutil.check_audit_schema(evs)
    dec = [e for e in evs if e["event"] == "decapsulate"] or [e for e in evs if e["event"] == "decrypt"]
    assert dec and all(e["ok"] and e["backend"] == "tpm" for e in dec), evs
    if key.startswith("gen:"):
        gens = [e for e in evs if e["event"] == "keygen"]
        assert gens and all(e["backend"] == "tpm" for e in gens), evs


def test_reused_context_and_no_private_export(swtpm, tmp, persistent_rsa):
    env = leak_checked(tpm_env(swtpm))
    r = kxutil.run(wrap_cmd() + ["reuse", URI, "SHA256"], env=env)
    assert r.rc == 0 and r.out.strip() == "reuse ok", r
    r = kxutil.run(wrap_cmd() + ["export", "gen:2048"], env=env, timeout=120)
    assert r.rc == 0 and r.out.startswith("export refused"), r


def test_transient_keys_are_flushed(swtpm, tmp):
    """A generated RSA key is a transient object that is flushed when freed."""
    before = swtpm.tools("tpm2_getcap", "handles-transient").out
    r = kxutil.run(wrap_cmd() + ["kem", "gen:2048"], env=leak_checked(tpm_env(swtpm)), timeout=120)
    assert r.rc == 0, r
    assert swtpm.tools("tpm2_getcap", "handles-transient").out == before


RSA_PARENT = 0x81000012


def rsa_parent(tpm, d):
    """An RSA storage primary evicted to RSA_PARENT (as test_tpm_session.py makes it): keyx cannot
    salt its own session with it, ESYS's session protects the commands instead."""
    if f"0x{RSA_PARENT:x}" not in tpm.tools("tpm2_getcap", "handles-persistent").out.lower():
        tpm.flush_transient()
        tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-G", "rsa2048", "-c", d / "srk.ctx")
        tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", d / "srk.ctx", f"0x{RSA_PARENT:x}")
        tpm.flush_transient()
    return f"0x{RSA_PARENT:x}"


def raw_encoding(tmp, t):
    """c^d mod n of vector t, computed by the default provider alone from the vector's private
    key (no padding): what TPM2_RSA_Decrypt with the null scheme returns."""
    key, ct, em = tmp / f"k{t['tcId']}.der", tmp / f"c{t['tcId']}.bin", tmp / f"em{t['tcId']}.bin"
    key.write_bytes(bytes.fromhex(t["key"]))
    ct.write_bytes(bytes.fromhex(t["ct"]))
    kxutil.openssl("pkeyutl", "-decrypt", "-inkey", key, "-keyform", "DER", "-pkeyopt", "rsa_padding_mode:none",
                   "-in", ct, "-out", em, env=kxutil.base_env()).ok("raw RSA (default provider)")
    return em.read_bytes()


@pytest.mark.parametrize("encrypt,parent", [("1", None), ("0", None), ("1", "rsa")])
def test_plaintext_on_the_bus(swtpm, vectors_dir, tmp, encrypt, parent):
    """Both paths: the TPM's OAEP returns the message, the null scheme the OAEP encoding (which
    gives the message to anyone, without a key); neither crosses the bus in clear with sessions."""
    pcap = tmp / "tpm.pcap"
    tpm_path = [t for t in load(vectors_dir, "rsa_oaep_2048_sha256_mgf1sha256_test.json")
                if t["result"] == "valid" and not t["label"] and len(t["msg"]) >= 32][:3]
    raw_path = [dict(t, tcId=1000 + t["tcId"]) for t in load(vectors_dir, "rsa_oaep_2048_sha256_mgf1sha1_test.json")
                if t["result"] == "valid" and len(t["msg"]) >= 32][:3]  # tcIds of their own
    tests = tpm_path + raw_path
    assert len(tests) == 6
    env = tpm_env(swtpm, TCTI_PCAP_FILE=pcap, KEYX_TPM_ENCRYPT_SESSIONS=encrypt)
    if parent:
        env["KEYX_TPM_PARENT"] = rsa_parent(swtpm, tmp)
    env["KEYX_TPM_TCTI"] = f"pcap:{swtpm.tcti}"
    got, _ = decrypt(tests, backend="tpm", env=env)
    for t in tests:
        assert got[str(t["tcId"])].ok and got[str(t["tcId"])].secret == t["msg"]
    data = pcap.read_bytes()
    assert len(data) > 500, "the pcap TCTI recorded nothing"
    calls = re.findall(rb"\x80[\x01\x02].{4}" + RSA_DECRYPT_CC, data, re.S)
    assert len(calls) == len(tests), f"{len(calls)} RSA_Decrypt commands for {len(tests)} decryptions"
    assert decrypt_schemes(data) == ["sha256"] * 3 + ["null"] * 3
    secrets = [bytes.fromhex(t["msg"]) for t in tpm_path] + [raw_encoding(tmp, t) for t in raw_path]
    assert all(len(x) == 256 for x in secrets[3:])
    seen = [x in data for x in secrets]
    if encrypt == "1":
        assert not any(seen), f"an RSA plaintext crossed the TPM bus in clear: {seen}"
    else:
        assert all(seen), f"capture without encryption should show the plaintexts: {seen}"


def test_restricted_rsa_key_is_refused(swtpm, tmp):
    """A restricted RSA storage key cannot decrypt for applications: refused when loaded, with the
    tpm2_create recipe of a key that works."""
    handle = rsa_parent(swtpm, tmp)
    env = kxutil.base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm))
    r = kxutil.openssl("pkey", "-in", f"keyx:tpm:handle={handle}", "-pubout", env=env)
    assert r.rc != 0 and "not an unrestricted decrypt key" in r.err and "rsa2048:null:null" in r.err, r
