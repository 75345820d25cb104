"""Project Wycheproof RSA-OAEP decryption vectors through keyx.

valid   -> exactly the expected message
invalid -> refused, and with one and the same error text whatever the cause (bad padding, wrong
           label, ciphertext out of range...): keyx must not be a padding oracle

Software keys decrypt in keyx's own library context; pkcs11 keys are imported into a SoftHSM2
token as session objects: SHA-1 without a label runs natively (CKM_RSA_PKCS_OAEP), the rest
only with `pkcs11-raw-rsa = 1` (CKM_RSA_X_509 + OAEP decoding in keyx), and without it the
request is refused with an error naming the limitation and the setting. The same driver on the
default provider checks the harness.
"""

import json
from collections import Counter
from pathlib import Path

import pytest

import kxutil

FILES = [
    "rsa_oaep_2048_sha1_mgf1sha1_test.json",
    "rsa_oaep_2048_sha224_mgf1sha1_test.json",
    "rsa_oaep_2048_sha224_mgf1sha224_test.json",
    "rsa_oaep_2048_sha256_mgf1sha1_test.json",
    "rsa_oaep_2048_sha256_mgf1sha256_test.json",
    "rsa_oaep_2048_sha384_mgf1sha1_test.json",
    "rsa_oaep_2048_sha384_mgf1sha384_test.json",
    "rsa_oaep_2048_sha512_224_mgf1sha1_test.json",
    "rsa_oaep_2048_sha512_224_mgf1sha512_224_test.json",
    "rsa_oaep_2048_sha512_mgf1sha1_test.json",
    "rsa_oaep_2048_sha512_mgf1sha512_test.json",
    "rsa_oaep_3072_sha256_mgf1sha1_test.json",
    "rsa_oaep_3072_sha256_mgf1sha256_test.json",
    "rsa_oaep_3072_sha512_256_mgf1sha1_test.json",
    "rsa_oaep_3072_sha512_256_mgf1sha512_256_test.json",
    "rsa_oaep_3072_sha512_mgf1sha1_test.json",
    "rsa_oaep_3072_sha512_mgf1sha512_test.json",
    "rsa_oaep_4096_sha256_mgf1sha1_test.json",
    "rsa_oaep_4096_sha256_mgf1sha256_test.json",
    "rsa_oaep_4096_sha512_mgf1sha1_test.json",
    "rsa_oaep_4096_sha512_mgf1sha512_test.json",
]
# Keys of many sizes (1024 to 8192 bits) and every digest pair of SHA-1..SHA-512; the hardware
# backends run its groups of the sizes keyx makes and imports there (RSA_BITS).
MISC = "rsa_oaep_misc_test.json"
RSA_BITS = (2048, 3072, 4096)

# The one error every failed OAEP decryption raises (wrap/, keymgmt/key.c keyx_key_decrypt).
UNIFORM = "RSA decryption failed"


def wrap_bin():
    p = kxutil.build_dir() / "tests" / "keyx-test-wrap"
    assert p.exists(), f"test helper {p} not built"
    return p


def leak_checked(env):
    """keyx-test-wrap frees everything: under ASan its leaks (and keyx's) are reported."""
    if env is not None and "ASAN_OPTIONS" in env:
        env = dict(env, ASAN_OPTIONS=env["ASAN_OPTIONS"].replace("detect_leaks=0", "detect_leaks=1"))
    return env


def wrap_cmd(provider="keyx", backend=None, config=None):
    cmd = [wrap_bin(), "--module", kxutil.build_dir(), "--provider", provider]
    if config:
        cmd += ["--config", config]
    if backend:
        cmd += ["--backend", backend]
    return cmd


def load(vectors_dir, name):
    """Flat list of the file's vectors, each with its group's key, digests and its label."""
    path = Path(vectors_dir) / name
    assert path.is_file(), f"missing Wycheproof file {path}"
    data = json.loads(path.read_text())
    tests = []
    for g in data["testGroups"]:
        assert g["mgf"] == "MGF1", g["mgf"]
        for t in g["tests"]:
            tests.append(dict(t, key=g["privateKeyPkcs8"], md=g["sha"], mgf1=g["mgfSha"], bits=g["keySize"]))
    assert len(tests) == data["numberOfTests"], f"{name}: {len(tests)} tests"
    assert len({t["tcId"] for t in tests}) == len(tests), f"{name}: duplicate tcIds"
    return tests


def load_sized(vectors_dir, name):
    """load(), without the misc file's keys of sizes keyx does not hold in hardware."""
    tests = [t for t in load(vectors_dir, name) if t["bits"] in RSA_BITS]
    assert tests, name
    return tests


def decrypt(tests, provider="keyx", backend=None, env=None):
    """Runs the vectors through keyx-test-wrap oaep; {tcId: Outcome} and the Result."""
    text = "".join(f"{t['tcId']} {t['key']} {t['md']} {t['mgf1']} {t['label'] or '-'} {t['ct'] or '-'}\n"
                   for t in tests)
    r = kxutil.run(wrap_cmd(provider, backend) + ["oaep"], input=text, env=leak_checked(env or kxutil.base_env()),
                   timeout=max(kxutil.TIMEOUT, 300))
    assert r.rc == 0, f"driver failed:\n{r!r}"
    got = {}
    for line in r.out.splitlines():
        o = kxutil.Outcome(line.split(" ", 1)[0], line)
        assert o.id not in got, f"vector {o.id} answered twice"
        got[o.id] = o
    missing = [t["tcId"] for t in tests if str(t["tcId"]) not in got]
    assert not missing, f"driver did not answer {missing[:5]}...:\n{r!r}"
    return got, r


def judge(t, out):
    if out.ok:
        if t["result"] == "invalid":
            return "invalid vector decrypted"
        if out.secret != (t["msg"] or "-"):
            return f"wrong message {out.secret[:40]} (expected {t['msg'][:40]})"
        return None
    if not out.error or out.error == "(no error recorded)":
        return f"refused at {out.stage} without an error"
    if t["result"] != "invalid":
        return f"{t['result']} vector refused at {out.stage}: {out.error}"
    return None


def report(name, problems, tests):
    lines = [f"{name}: {len(problems)} of {len(tests)} vectors wrong"]
    for t, why in problems[:25]:
        lines.append(f"  tcId {t['tcId']} [{t['result']}] {t['comment']!r} flags={t['flags']}: {why}")
    return "\n".join(lines)


def check_file(name, tests, got):
    problems = [(t, why) for t in tests if (why := judge(t, got[str(t["tcId"])]))]
    assert not problems, report(name, problems, tests)
    verdicts = Counter((t["result"], got[str(t["tcId"])].ok) for t in tests)
    assert verdicts[("valid", True)] == sum(1 for t in tests if t["result"] == "valid"), verdicts
    assert verdicts[("invalid", True)] == 0, verdicts


def check_one_error(tests, got):
    """Every refused vector failed at the same stage with the very same error text."""
    texts = Counter((got[str(t["tcId"])].stage, got[str(t["tcId"])].error) for t in tests
                    if not got[str(t["tcId"])].ok)
    assert texts, "no vector was refused"
    assert len(texts) == 1, "failures are distinguishable (padding oracle):\n" + "\n".join(
        f"  {n} x {s}: {e}" for (s, e), n in texts.items())
    (stage, error), = texts
    assert stage == "decrypt" and UNIFORM in error and "keyx" in error, error


def check_audit(log, res, got, backend):
    events = [e for e in kxutil.read_audit(log) if e["pid"] == res.pid]
    kxutil.check_audit_schema(events)
    dec = [e for e in events if e["event"] == "decrypt"]
    assert sum(1 for e in dec if e["ok"]) == sum(1 for o in got.values() if o.ok)
    assert {e["backend"] for e in dec} == {backend}, f"decrypts outside {backend}: {dec[:3]}"
    return events


@pytest.mark.parametrize("name", FILES)
def test_wycheproof_oaep_software(build, vectors_dir, tmp, name):
    log = tmp / "audit.jsonl"
    tests = load(vectors_dir, name)
    got, res = decrypt(tests, env=kxutil.base_env(KEYX_AUDIT_LOG=log))
    check_file(name, tests, got)
    check_one_error([t for t in tests if t["result"] == "invalid"], got)
    check_audit(log, res, got, "software")
    kxutil.assert_no_secrets(log.read_text(), [t["msg"] for t in tests if len(t["msg"]) >= 16], "audit log")


@pytest.mark.parametrize("name", FILES)
def test_wycheproof_oaep_harness_with_default_provider(build, vectors_dir, name):
    tests = load(vectors_dir, name)
    got, _ = decrypt(tests, provider="default")
    check_file(name, tests, got)


def pkcs11_env(softhsm, log, raw):
    s = softhsm.keyx_settings()
    env = dict(KEYX_AUDIT_LOG=log, KEYX_BACKENDS=s["backends"], KEYX_PKCS11_MODULE=s["pkcs11-module"],
               KEYX_PKCS11_TOKEN=s["pkcs11-token"], KEYX_PKCS11_PIN=s["pkcs11-pin"])
    if raw:
        env["KEYX_PKCS11_RAW_RSA"] = "1"
    return softhsm.env(**env)


@pytest.mark.parametrize("name", FILES + [MISC])
def test_wycheproof_oaep_pkcs11_raw(softhsm, vectors_dir, tmp, name):
    """pkcs11-raw-rsa = 1: every vector on the token (native OAEP where SoftHSM takes the
    parameters, CKM_RSA_X_509 and keyx's constant-time decoding where it does not)."""
    log = tmp / "audit.jsonl"
    tests = load_sized(vectors_dir, name)
    got, res = decrypt(tests, backend="pkcs11", env=pkcs11_env(softhsm, log, raw=True))
    check_file(name, tests, got)
    if name != MISC:  # the misc file's vectors are all valid
        check_one_error([t for t in tests if t["result"] == "invalid"], got)
    events = check_audit(log, res, got, "pkcs11")
    imports = [e for e in events if e["event"] == "load" and e["ok"]]
    assert imports and {e["backend"] for e in imports} == {"pkcs11"}
    assert len(softhsm.token_objects("keyx-a")) == 2, "session objects only"


def test_wycheproof_oaep_pkcs11_sha1_native(softhsm, vectors_dir, tmp):
    """Without pkcs11-raw-rsa: SHA-1 without a label decrypts natively on SoftHSM; a label is a
    parameter SoftHSM refuses: the limitation error, the same for valid and invalid vectors."""
    log = tmp / "audit.jsonl"
    tests = load(vectors_dir, "rsa_oaep_2048_sha1_mgf1sha1_test.json")
    plain = [t for t in tests if not t["label"]]
    labelled = [t for t in tests if t["label"]]
    assert plain and labelled
    got, res = decrypt(tests, backend="pkcs11", env=pkcs11_env(softhsm, log, raw=False))
    check_file("sha1 without label", plain, got)
    check_one_error([t for t in plain if t["result"] == "invalid"], got)
    for t in labelled:
        o = got[str(t["tcId"])]
        assert not o.ok and "pkcs11-raw-rsa" in o.error, f"labelled tcId {t['tcId']}: {o.line[:300]}"
    check_audit(log, res, {k: v for k, v in got.items()}, "pkcs11")


def test_wycheproof_oaep_pkcs11_sha256_needs_raw_rsa(softhsm, vectors_dir, tmp):
    log = tmp / "audit.jsonl"
    tests = load(vectors_dir, "rsa_oaep_2048_sha256_mgf1sha256_test.json")
    got, _ = decrypt(tests, backend="pkcs11", env=pkcs11_env(softhsm, log, raw=False))
    assert not any(o.ok for o in got.values())
    # the answer depends on the parameters only (digest, label), never on the ciphertext
    for labelled in (False, True):
        texts = {got[str(t["tcId"])].error for t in tests if bool(t["label"]) == labelled}
        assert len(texts) == 1, texts
        (text,) = texts
        assert "pkcs11-raw-rsa" in text and "SHA256" in text, text
        assert ("and a label" in text) == labelled, text
