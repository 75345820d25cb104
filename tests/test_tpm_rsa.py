"""RSA key wrapping in the TPM (issue 5's TPM part): every decryption is one TPM2_RSA_Decrypt.

- Wycheproof rsa_oaep_* with each private key moved into swtpm (TPM2_LoadExternal, `--backend
  tpm`): valid vectors give exactly the message, invalid ones one and the same error. What a TPM
  cannot take by its parameters is refused before the ciphertext matters, with one clear error
  per parameter set: MGF1 digest != OAEP digest (TPM2_RSA_Decrypt uses the OAEP digest for
  both), labels not ending in a zero byte (the TPM takes only such labels, and hashes them with
  their zero: vectors whose label ends in 00 must decrypt), key sizes TPM2_TestParms refuses
  (swtpm 0.7: 4096; checked independently with tpm2_testparms);
- a persistent RSA key made with tpm2-tools, by `keyx:tpm:handle=0x81...`: openssl pkeyutl
  -decrypt with OAEP-SHA256 of what the default provider encrypted to tpm2_readpublic's key,
  a zero-terminated label, the public export equal to tpm2_readpublic's, PKCS#1 v1.5 refused;
- RSASVE KEM round trips (TPM keygen and the persistent key), a reused decrypt context;
- the pcap TCTI: with encrypted sessions (default) the plaintext never crosses the bus, with
  `tpm-encrypt-sessions = 0` it does; exactly one RSA_Decrypt command per decryption.
"""

import os
import re
from collections import Counter

import pytest

import kxutil
from fixture_swtpm import tpm_cnf
from test_rsa_wycheproof import (FILES, check_one_error, decrypt, leak_checked, load, wrap_cmd)

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


def expected_refusal(t, size_ok):
    """Why the TPM must refuse vector t by its parameters alone, or None."""
    if not size_ok:
        return "size"
    if t["md"] != t["mgf1"]:
        return "mgf1"
    if t["label"] and not t["label"].endswith("00"):
        return "label"
    return None


REFUSALS = {"size": "does not take {bits}-bit RSA keys", "mgf1": MGF1_ERROR, "label": LABEL_ERROR}


@pytest.mark.parametrize("name", FILES)
def test_wycheproof_oaep_tpm(swtpm, vectors_dir, tmp, name):
    log = tmp / "audit.jsonl"
    tests = load(vectors_dir, name)
    bits = int(name.split("_")[2])
    size_ok = tpm_takes_rsa(swtpm, bits)
    got, res = decrypt(tests, backend="tpm", env=tpm_env(swtpm, log))
    runnable, texts = [], Counter()
    for t in tests:
        o = got[str(t["tcId"])]
        why = expected_refusal(t, size_ok)
        if why is not None:
            assert not o.ok and REFUSALS[why].format(bits=bits) in o.error, f"tcId {t['tcId']}: {o.line[:300]}"
            texts[(why, o.stage, o.error)] += 1
        elif t["result"] == "valid":
            assert o.ok and o.secret == (t["msg"] or "-"), f"tcId {t['tcId']} {t['comment']!r}: {o.line[:300]}"
            runnable.append(t)
        else:
            assert not o.ok, f"invalid tcId {t['tcId']} {t['comment']!r} decrypted"
            runnable.append(t)
    # a refusal depends on the parameters only: one text per reason, never the ciphertext's
    for why in ("size", "mgf1"):
        assert len([k for k in texts if k[0] == why]) <= 1, texts
    invalid = [t for t in runnable if t["result"] == "invalid"]
    if invalid:
        check_one_error(invalid, got)  # no padding oracle
    if size_ok and tests[0]["md"] == tests[0]["mgf1"]:
        # the TPM's label convention, proven by real vectors: labels ending in 00 decrypt
        assert any(t["label"] for t in runnable if t["result"] == "valid"), "no labelled vector ran"
        assert sum(1 for t in runnable if t["result"] == "valid") >= 10
    events = [e for e in kxutil.read_audit(log) if e["pid"] == res.pid]
    kxutil.check_audit_schema(events)
    dec = [e for e in events if e["event"] == "decrypt"]
    assert {e["backend"] for e in dec} <= {"tpm"}, dec[:3]
    assert sum(1 for e in dec if e["ok"]) == sum(1 for o in got.values() if o.ok)
    kxutil.assert_no_secrets(log.read_text(), [t["msg"] for t in tests if len(t["msg"]) >= 16], "audit log")


def test_wycheproof_zero_terminated_labels_exist(vectors_dir):
    """The label rule above is exercised by real vectors on both sides."""
    tests = [t for n in FILES[:1] for t in load(vectors_dir, n)]
    labels = [t["label"] for t in tests if t["label"] and t["result"] == "valid"]
    assert any(lb.endswith("00") for lb in labels) and any(not lb.endswith("00") for lb in labels)


@pytest.fixture(scope="module")
def persistent_rsa(swtpm, tmp_path_factory):
    """An RSA-2048 decrypt key without a scheme under the owner SRK, evicted to HANDLE (made
    with tpm2-tools), and its public key as tpm2_readpublic writes it (PEM)."""
    d = tmp_path_factory.mktemp("tpm-rsa")
    tpm = swtpm
    if f"0x{HANDLE:x}" not in tpm.tools("tpm2_getcap", "handles-persistent").out.lower():
        tpm.flush_transient()
        tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256", "-c", d / "prim.ctx")
        tpm.flush_transient()
        tpm.tools("tpm2_create", "-Q", "-C", d / "prim.ctx", "-G", "rsa2048:null:null", "-a",
                  "decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
                  "-u", d / "key.pub", "-r", d / "key.priv")
        tpm.flush_transient()
        tpm.tools("tpm2_load", "-Q", "-C", d / "prim.ctx", "-u", d / "key.pub", "-r", d / "key.priv",
                  "-c", d / "key.ctx")
        tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", d / "key.ctx", f"0x{HANDLE:x}")
        tpm.flush_transient()
    pub = d / "tpm-rsa.pem"
    tpm.tools("tpm2_readpublic", "-c", f"0x{HANDLE:x}", "-f", "pem", "-o", pub)
    return pub


def message(tmp, n=32):
    m = tmp / "message.bin"
    m.write_bytes(os.urandom(n))
    return m


def test_pkeyutl_oaep_sha256_persistent_key(swtpm, tmp, persistent_rsa):
    log = tmp / "audit.jsonl"
    env = kxutil.base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"audit-log": log}))
    msg = message(tmp)
    # default provider alone, public key from tpm2-tools
    for name, extra in (("plain", []), ("label", ["-pkeyopt", "rsa_oaep_label:6b6579782d7772617000"])):
        ct, out = tmp / f"ct-{name}.bin", tmp / f"out-{name}.bin"
        kxutil.openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", persistent_rsa, *OAEP256, *extra,
                       "-in", msg, "-out", ct, env=kxutil.base_env()).ok("encrypt (default provider)")
        r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", URI, *OAEP256, *extra, "-in", ct, "-out", out,
                           env=env).ok(f"decrypt {name} in the TPM")
        assert out.read_bytes() == msg.read_bytes(), name
        dec = [e for e in kxutil.read_audit(log) if e["event"] == "decrypt" and e["pid"] == r.pid]
        assert [(e["ok"], e["backend"]) for e in dec] == [(True, "tpm")], dec
    # the label is part of the ciphertext: another (zero-terminated) one does not decrypt
    r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", URI, *OAEP256, "-pkeyopt", "rsa_oaep_label:6f7468657200",
                       "-in", tmp / "ct-label.bin", "-out", tmp / "x.bin", env=env)
    assert r.rc != 0 and "RSA decryption failed" in r.err, r
    # a label without its terminating zero cannot reach the TPM
    r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", URI, *OAEP256, "-pkeyopt", "rsa_oaep_label:6b6579",
                       "-in", tmp / "ct-label.bin", "-out", tmp / "x.bin", env=env)
    assert r.rc != 0 and LABEL_ERROR in r.err, r
    # MGF1 other than the OAEP digest: refused by parameters
    r = kxutil.openssl("pkeyutl", "-decrypt", "-inkey", URI, "-pkeyopt", "rsa_padding_mode:oaep",
                       "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha1",
                       "-in", tmp / "ct-plain.bin", "-out", tmp / "x.bin", env=env)
    assert r.rc != 0 and MGF1_ERROR in r.err, r
    # public export equals the TPM's; the private key does not leave (a reference does)
    mine = tmp / "pub.pem"
    kxutil.openssl("pkey", "-in", URI, "-pubout", "-out", mine, env=env).ok("public export")
    assert mine.read_text() == persistent_rsa.read_text()
    kxutil.openssl("pkey", "-in", URI, "-out", tmp / "ref.pem", env=env).ok("key reference")
    ref = (tmp / "ref.pem").read_text()
    assert ref.startswith("-----BEGIN KEYX KEY-----") and "PRIVATE" not in ref, ref
    # freeing never evicts
    assert f"0x{HANDLE:x}" in swtpm.tools("tpm2_getcap", "handles-persistent").out.lower()
    kxutil.assert_no_secrets(log.read_text(), [msg.read_bytes().hex()], "audit log")


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


@pytest.mark.parametrize("encrypt,parent", [("1", None), ("0", None), ("1", "rsa")])
def test_plaintext_on_the_bus(swtpm, vectors_dir, tmp, encrypt, parent):
    pcap = tmp / "tpm.pcap"
    tests = [t for t in load(vectors_dir, "rsa_oaep_2048_sha256_mgf1sha256_test.json")
             if t["result"] == "valid" and not t["label"] and len(t["msg"]) >= 32][:3]
    assert len(tests) == 3
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
    seen = [bytes.fromhex(t["msg"]) in data for t in tests]
    if encrypt == "1":
        assert not any(seen), "an RSA plaintext crossed the TPM bus in clear"
    else:
        assert all(seen), "capture without encryption should show the plaintexts"


def test_restricted_rsa_key_is_refused(swtpm, tmp):
    """A restricted RSA storage key cannot decrypt for applications: refused when loaded, with the
    tpm2_create recipe of a key that works."""
    handle = rsa_parent(swtpm, tmp)
    env = kxutil.base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm))
    r = kxutil.openssl("pkey", "-in", f"keyx:tpm:handle={handle}", "-pubout", env=env)
    assert r.rc != 0 and "not an unrestricted decrypt key" in r.err and "rsa2048:null:null" in r.err, r
