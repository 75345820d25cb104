"""8 threads x 5,000 mixed operations per backend in one process.

tests/helpers/stress.c (keyx-test-stress) loads keyx from an openssl.cnf, a static EC key and a
static RSA key by URI (a PEM file for software, a SoftHSM token key by pkcs11: URI, TPM
persistent keys by keyx:tpm:handle=), makes one shared ephemeral P-256 key, then runs the
threads, all on those same keys at once: ephemeral keygen + derive, static derive, shared-key
derive, RSA-OAEP decrypt, ECDSA sign. Every secret is compared with the default provider's
from the peer's side, every plaintext with what was encrypted, every signature verified by the
default provider: a wrong result fails.

On the ThreadSanitizer build (CI stage 3: KEYX_SANITIZE=thread) the helper and keyx.so are
instrumented; TSAN_OPTIONS make any report fail the process (exitcode 66), suppressions in
tests/tsan.supp cover only frames outside keyx. On the ASan build the same tests run under
ASan/UBSan.

Counts: software and pkcs11 8 x 5,000 (KEYX_STRESS_OPS). swtpm serves one command at a time and
every TPM operation here is several commands (~500 operations/s): 8 x 5,000 takes ~80 s on the
plain build and ~3 min under TSan, so the TPM runs 8 x 1,000 in the plain and ASan stages (still
8 threads racing on one device, the shared keys and the session pool) and 8 x 5,000 in CI's TSan
stage, where races matter (KEYX_STRESS_TPM_OPS=5000 in .ci/run).
"""

import os
import re

import pytest

import kxutil
from fixture_softhsm import SoftHSM
from fixture_swtpm import Swtpm, tpm_cnf

THREADS = 8
OPS = int(os.environ.get("KEYX_STRESS_OPS", "5000"))
TPM_OPS = int(os.environ.get("KEYX_STRESS_TPM_OPS", "1000"))
EC_HANDLE, RSA_HANDLE = 0x81000E01, 0x81000E02
TOKEN_EC = "pkcs11:token=keyx-a;object=stress-ec;type=private"
TOKEN_RSA = "pkcs11:token=keyx-a;object=stress-rsa;type=private"
TSAN_SUPP = kxutil.REPO / "tests" / "tsan.supp"

# Groups each backend serves for ephemeral keys (the TPM: NIST curves only).
GROUPS = {
    "software": "P-256,X25519,ffdhe2048",
    "pkcs11": "P-256,ffdhe2048",
    "tpm": "P-256",
}


def stress_bin():
    return kxutil.build_dir() / "tests" / "keyx-test-stress"


def sanitizer_env(env):
    """TSan/ASan settings for the instrumented helper: any report fails the run."""
    env = dict(env)
    # halt_on_error: the first race stops the process with exitcode 66; second_deadlock_stack
    # for lock-order reports; the suppressions cover libraries that are not keyx (see the file).
    env["TSAN_OPTIONS"] = (f"halt_on_error=1:exitcode=66:second_deadlock_stack=1:"
                           f"suppressions={TSAN_SUPP}:history_size=4")
    if "ASAN_OPTIONS" in env:  # our helper frees everything: leak checking on, like derive.c's
        env["ASAN_OPTIONS"] = env["ASAN_OPTIONS"].replace("detect_leaks=0", "detect_leaks=1")
    return env


def run_stress(config, env, ec, rsa=None, groups="P-256", threads=THREADS, ops=OPS, fork=None,
               timeout=600):
    cmd = [stress_bin(), "--config", config, "--ec-key", ec, "--groups", groups,
           "--threads", threads, "--ops", ops]
    if rsa:
        cmd += ["--rsa-key", rsa]
    if fork:
        cmd += ["--fork", fork]
    r = kxutil.run(cmd, env=sanitizer_env(env), timeout=timeout)
    assert "ThreadSanitizer" not in r.err, f"ThreadSanitizer report:\n{r!r}"
    assert r.rc == 0, f"stress failed:\n{r!r}"
    return r


def counts(out, prefix=""):
    """{op: (ok, fail)} from the helper's '<prefix><op> ok N fail N' lines."""
    got = {}
    for m in re.finditer(rf"^{re.escape(prefix)}(\w+) ok (\d+) fail (\d+)$", out, re.M):
        got[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return got


def check_counts(r, total, prefix="", rsa=True):
    c = counts(r.out, prefix)
    assert c.get("total") == (total, 0), f"expected {total} operations, all ok:\n{r!r}"
    ops = ["keygen", "derive", "shared", "sign"] + (["decrypt"] if rsa else [])
    for op in ops:
        assert c[op][0] > 0 and c[op][1] == 0, f"{op} never ran or failed:\n{r!r}"


def audit_backends(log, pid):
    """{(event, backend): count} of the successful audit events of process pid."""
    seen = {}
    for ev in kxutil.read_audit(log):
        if ev["pid"] == pid and ev["ok"]:
            key = (ev["event"], ev.get("backend"))
            seen[key] = seen.get(key, 0) + 1
    return seen


# ---- keys ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sw_keys(tmp_path_factory, build):
    d = tmp_path_factory.mktemp("stress-sw")
    env = kxutil.base_env(LD_PRELOAD=None)
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                   "-out", d / "ec.pem", env=env).ok("EC key")
    kxutil.openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                   "-out", d / "rsa.pem", env=env).ok("RSA key")
    return d / "ec.pem", d / "rsa.pem"


@pytest.fixture(scope="module")
def stress_token(tmp_path_factory, build):
    """A private SoftHSM with a P-256 key (derive, sign) and an RSA-2048 key (decrypt)."""
    hsm = SoftHSM(tmp_path_factory.mktemp("stress-softhsm")).setup()
    hsm.tool("keyx-a", "--keypairgen", "--key-type", "EC:prime256v1", "--label", "stress-ec",
             "--id", "e1", "--usage-derive", "--usage-sign").ok("EC token key")
    hsm.tool("keyx-a", "--keypairgen", "--key-type", "rsa:2048", "--label", "stress-rsa",
             "--id", "e2", "--usage-decrypt").ok("RSA token key")
    return hsm


def make_tpm_key(tpm, d, alg, attrs, handle):
    tpm.flush_transient()
    tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256", "-c", d / "prim.ctx")
    tpm.flush_transient()
    tpm.tools("tpm2_create", "-Q", "-C", d / "prim.ctx", "-G", alg, "-a", attrs,
              "-u", d / "key.pub", "-r", d / "key.priv")
    tpm.flush_transient()
    tpm.tools("tpm2_load", "-Q", "-C", d / "prim.ctx", "-u", d / "key.pub", "-r", d / "key.priv",
              "-c", d / "key.ctx")
    tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", d / "key.ctx", f"0x{handle:x}")
    tpm.flush_transient()


@pytest.fixture(scope="module")
def stress_tpm(tmp_path_factory, build):
    """A private swtpm with a persistent P-256 key (sign and ECDH) and an RSA-2048 decrypt key,
    made with tpm2-tools; killed at the end of the module."""
    tpm = Swtpm(tmp_path_factory.mktemp("stress-swtpm")).start()
    try:
        d = tmp_path_factory.mktemp("stress-tpm-keys")
        base = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda"
        make_tpm_key(tpm, d, "ecc256:null", f"sign|decrypt|{base}", EC_HANDLE)
        make_tpm_key(tpm, d, "rsa2048:null:null", f"decrypt|{base}", RSA_HANDLE)
        yield tpm
    finally:
        tpm.kill()


def backend_setup(backend, tmp, sw_keys=None, token=None, tpm=None, log=None, spy_log=None):
    """(openssl.cnf, env, ec uri, rsa uri) for keyx on backend."""
    more = {"audit-log": log} if log else {}
    if backend == "software":
        cnf = kxutil.write_cnf(tmp / "sw.cnf", keyx={"backends": "software", **more})
        return cnf, kxutil.base_env(), *map(str, sw_keys)
    if backend == "pkcs11":
        settings = token.keyx_settings(**{"pkcs11-raw-rsa": 1}, **more)
        if spy_log:
            from fixture_softhsm import SPY
            settings["pkcs11-module"] = SPY
            env = token.spy_env(spy_log)
        else:
            env = token.env()
        cnf = kxutil.write_cnf(tmp / "p11.cnf", keyx=settings)
        return cnf, env, TOKEN_EC, TOKEN_RSA
    cnf = tpm_cnf(tmp / "tpm.cnf", tpm, keyx=more)
    return (cnf, kxutil.base_env(), f"keyx:tpm:handle=0x{EC_HANDLE:08x}",
            f"keyx:tpm:handle=0x{RSA_HANDLE:08x}")


# ---- tests --------------------------------------------------------------------------------


def test_stress_software(sw_keys, tmp):
    log = tmp / "audit.jsonl"
    cnf, env, ec, rsa = backend_setup("software", tmp, sw_keys=sw_keys, log=log)
    r = run_stress(cnf, env, ec, rsa, groups=GROUPS["software"])
    check_counts(r, THREADS * OPS)
    seen = audit_backends(log, r.pid)
    # every private operation ran in keyx's software backend
    for ev in ("keygen", "derive", "decrypt", "sign"):
        assert seen.get((ev, "software"), 0) > 0, seen


def test_stress_pkcs11(stress_token, tmp):
    log = tmp / "audit.jsonl"
    cnf, env, ec, rsa = backend_setup("pkcs11", tmp, token=stress_token, log=log)
    r = run_stress(cnf, env, ec, rsa, groups=GROUPS["pkcs11"], timeout=900)
    check_counts(r, THREADS * OPS)
    seen = audit_backends(log, r.pid)
    for ev in ("keygen", "derive", "decrypt", "sign"):
        assert seen.get((ev, "pkcs11"), 0) > 0, seen
    # nothing the run made was left on the token (ephemeral keys are session objects)
    labels = " ".join(stress_token.token_objects("keyx-a"))
    assert labels.count("Private Key Object") == 3, labels  # srv-ecdh, stress-ec, stress-rsa


def test_stress_tpm(stress_tpm, tmp):
    log = tmp / "audit.jsonl"
    cnf, env, ec, rsa = backend_setup("tpm", tmp, tpm=stress_tpm, log=log)
    r = run_stress(cnf, env, ec, rsa, groups=GROUPS["tpm"], ops=TPM_OPS, timeout=900)
    check_counts(r, THREADS * TPM_OPS)
    seen = audit_backends(log, r.pid)
    for ev in ("keygen", "derive", "decrypt", "sign"):
        assert seen.get((ev, "tpm"), 0) > 0, seen
    # no transient object left behind in the TPM
    assert "0x80" not in stress_tpm.tools("tpm2_getcap", "handles-transient").out
