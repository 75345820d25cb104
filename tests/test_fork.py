"""fork() with keys loaded: a parent loads a static EC key and an RSA key (software
key file, token keys by pkcs11: URI, TPM persistent keys by keyx:tpm:handle=) and makes a shared
ephemeral key, does 100 operations, forks 4 children that each do 100 operations (ephemeral
keygen + derive, static derive, shared-key derive, OAEP decrypt, ECDSA sign, every result checked
by the default provider) with the keys it inherited, waits for them, and does 100 more
(keyx-test-stress --fork 4). On the token, OpenSC's pkcs11-spy logs the calls: every child calls
C_Initialize itself (it never uses its parent's PKCS#11 sessions), the parent once. The audit log
shows each child's operations in its own pid, on the backend under test. On a bare swtpm the
children flush the parent's transient objects: the parent makes its primary and session again and
its lost ephemeral key is refused with keyx's own reason (test_tpm_parent_after_children); SoftHSM
children starting at once all reach the token (test_pkcs11_children_at_once). Through tpm2-abrmd,
a child of a process that used it cannot reach it and is told so at once (test_tabrmd_after_fork).
"""

import re

import pytest

import kxutil
from fixture_abrmd import abrmd  # noqa: F401
from test_stress import backend_setup, check_counts, sanitizer_env, stress_bin
from test_stress import sw_keys, stress_token, stress_tpm  # noqa: F401

CHILDREN, OPS = 4, 100
# keyx's reason string for a key a forked process flushed from a TPM without resource manager
NOT_SHAREABLE = "TPM without a resource manager shared between forked processes: key lost"
GROUPS = {"software": "P-256,X25519,ffdhe2048", "pkcs11": "P-256", "tpm": "P-256"}


def fork_run(backend, request, tmp, serial, log, spy_log=None, extra=None):
    kw = {"software": {"sw_keys": "sw_keys"}, "pkcs11": {"token": "stress_token"},
          "tpm": {"tpm": "stress_tpm"}}[backend]
    kw = {k: request.getfixturevalue(v) for k, v in kw.items()}
    cnf, env, ec, rsa = backend_setup(backend, tmp, log=log, spy_log=spy_log, **kw)
    args = ["--serial", int(serial)]
    if backend != "software":
        args += ["--child-shared", "refused"]
    return kxutil.run([stress_bin(), "--config", cnf, "--ec-key", ec, "--rsa-key", rsa,
                       "--groups", GROUPS[backend], "--ops", OPS, "--fork", CHILDREN, *args,
                       *(extra or [])],
                      env=sanitizer_env(env), timeout=600)


def children_of(r):
    """{pid: 'childN'} of the children that reported counts."""
    return {int(m.group(2)): m.group(1)
            for m in re.finditer(r"^(child\d+) (\d+) total ok \d+ fail \d+$", r.out, re.M)}


# Children run at once where the device allows several processes; one after the other on the
# TPM (a bare swtpm has no resource manager: see test_tpm_parent_after_children below) and on
# SoftHSM, so that each child calls C_Initialize exactly once (at once, a child initializes
# again when another's login rewrote the token: test_pkcs11_children_at_once below).
@pytest.mark.parametrize("backend,serial", [("software", 0), ("pkcs11", 1), ("tpm", 1)])
def test_fork_children_use_the_parents_keys(backend, serial, request, tmp):
    log, spy_log = tmp / "audit.jsonl", tmp / "spy.log"
    r = fork_run(backend, request, tmp, serial, log, spy_log if backend == "pkcs11" else None)
    assert "ThreadSanitizer" not in r.err, f"ThreadSanitizer report:\n{r!r}"
    children = children_of(r)
    assert len(children) == CHILDREN, f"expected {CHILDREN} children:\n{r!r}"
    check_counts(r, OPS, prefix="parent-before ")
    for pid, name in children.items():
        check_counts(r, OPS, prefix=f"{name} {pid} ")
        if backend != "software":  # the parent's ephemeral hardware key is gone in a child
            assert f"{name} {pid} refused {OPS // 5}" in r.out, r
    if backend == "tpm":
        return  # the parent afterwards: test_tpm_parent_after_children
    check_counts(r, OPS, prefix="parent-after ")
    assert r.rc == 0, r

    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    for pid in [r.pid, *children]:
        mine = [e for e in events if e["pid"] == pid and e["ok"]]
        done = {e["event"] for e in mine if e["event"] in ("keygen", "derive", "decrypt", "sign")}
        assert done == {"keygen", "derive", "decrypt", "sign"}, f"pid {pid}: {sorted(done)}"
        assert {e.get("backend") for e in mine if e["event"] in done} == {backend}, f"pid {pid}"
    # the only failures: children's uses of the parent's ephemeral hardware key (refused)
    failed = [e for e in events if not e["ok"] and not (
        backend != "software" and e["pid"] in children and e["event"] == "derive" and e.get("ephemeral"))]
    assert not failed, failed[:3]

    if backend == "pkcs11":
        # spy numbers calls per process from 0: one C_Initialize in the parent, one per child
        inits = re.findall(r"^\d+: C_Initialize$", spy_log.read_text(), re.M)
        assert len(inits) == 1 + CHILDREN, f"{len(inits)} C_Initialize calls for 1 parent + {CHILDREN} children"


def test_tpm_parent_after_children(request, tmp):
    """On a bare swtpm (no resource manager) the children, one after the other, flush the
    parent's transient objects when the TPM's slots run out, and their own at exit, at handles
    the parent holds. The parent checks each handle before it uses one again: its storage primary
    and its session are made again, so key generation and its persistent keys (derive, sign,
    decrypt) work, every result checked by the default provider; its shared ephemeral key (used
    right before the fork, so loaded in the TPM then: a key saved out of the TPM stays the
    parent's) cannot be made again: every use fails with keyx's own reason, naming the fix."""
    log = tmp / "audit.jsonl"
    r = fork_run("tpm", request, tmp, 1, log, extra=["--after-shared", NOT_SHAREABLE])
    assert len(children_of(r)) == CHILDREN, r
    check_counts(r, OPS, prefix="parent-after ")
    assert f"parent-after refused {OPS // 5}" in r.out, r
    text = re.search(r"^parent-after refused-text (.*)$", r.out, re.M).group(1)
    assert "no resource manager" in text and "tpm2-abrmd" in text and "/dev/tpmrm0" in text, text
    assert r.rc == 0, r
    # the parent's only failures: the uses of its lost ephemeral key
    failed = [e for e in kxutil.read_audit(log) if e["pid"] == r.pid and not e["ok"]]
    assert len(failed) == OPS // 5, failed[:3]
    for e in failed:
        assert (e["event"], e.get("backend"), e.get("ephemeral")) == ("derive", "tpm", True), e


def test_pkcs11_children_at_once(request, tmp):
    """4 children re-initialize SoftHSM at once, each logging in: a C_Login rewrites the token's
    file, and another child reading it in that instant (its C_Initialize, C_GetTokenInfo or
    C_Login) sees no token; keyx asks again after short pauses, so every child's operations and
    the parent's afterwards succeed."""
    r = fork_run("pkcs11", request, tmp, 0, tmp / "audit.jsonl")
    children = children_of(r)
    assert len(children) == CHILDREN, r
    for pid, name in children.items():
        check_counts(r, OPS, prefix=f"{name} {pid} ")
        assert f"{name} {pid} refused {OPS // 5}" in r.out, r
    check_counts(r, OPS, prefix="parent-after ")
    assert r.rc == 0, r


# A parent makes a key in the TPM (or not), forks, and the child makes one; each line: who, 1/0,
# seconds, the keyx error text (ERR_get_error_all's data) if any.
ABRMD_FORK_APP = r'''
import ctypes, os, sys, time
c = ctypes.CDLL("libcrypto.so.3")
c.EVP_PKEY_Q_keygen.restype = ctypes.c_void_p
c.EVP_PKEY_free.argtypes = [ctypes.c_void_p]
c.ERR_get_error_all.argtypes = [ctypes.c_void_p] * 5
c.ERR_get_error_all.restype = ctypes.c_ulong
c.ERR_reason_error_string.argtypes = [ctypes.c_ulong]
c.ERR_reason_error_string.restype = ctypes.c_char_p

def keygen(who):
    t = time.monotonic()
    k = c.EVP_PKEY_Q_keygen(None, None, b"EC", b"P-256")
    took = time.monotonic() - t
    texts = []
    while True:
        data = ctypes.c_char_p()
        e = c.ERR_get_error_all(None, None, None, ctypes.byref(data), None)
        if not e:
            break
        texts.append(f"{(c.ERR_reason_error_string(e) or b'').decode()}: {(data.value or b'').decode()}")
    print(who, int(bool(k)), f"{took:.2f}", " | ".join(texts), flush=True)
    c.EVP_PKEY_free(k)

if sys.argv[1] == "parent-first":
    keygen("parent")
pid = os.fork()
if pid == 0:
    keygen("child")
    os._exit(0)
os.waitpid(pid, 0)
keygen("parent-after")
'''


@pytest.mark.parametrize("parent_first", [True, False])
def test_tabrmd_after_fork(abrmd, tmp, parent_first):
    """tpm2-abrmd's TCTI speaks D-Bus through GLib's connection, one per process: a child forked
    from a process that opened it cannot open it again (it would wait out tpm-timeout, 20 s
    here). The child's key generation fails at once with its own reason and the way out; the
    parent goes on. A parent that forks before its first TPM use: the child connects itself."""
    log = tmp / "audit.jsonl"
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={"backends": "tpm", "tpm-tcti": abrmd.tcti,
                                                      "tpm-timeout": "20000", "audit-log": log})
    app = tmp / "app.py"
    app.write_text(ABRMD_FORK_APP)
    r = kxutil.run(["/usr/bin/python3", app, "parent-first" if parent_first else "child-first"],
                   env=abrmd.env(OPENSSL_CONF=cnf), timeout=120)
    assert r.rc == 0, r
    lines = {m.group(1): m.groups()[1:] for m in re.finditer(r"^(\S+) (\d) ([\d.]+) ?(.*)$", r.out, re.M)}
    assert lines["parent-after"][0] == "1", r
    ok, took, text = lines["child"]
    if not parent_first:
        assert ok == "1" and not text, r
        assert "parent" not in lines
        return
    assert lines["parent"][0] == "1", r
    assert ok == "0" and float(took) < 2, r
    assert text.startswith("tpm2-abrmd unreachable after fork() from a process that used it: "), r
    for needle in (f"TCTI '{abrmd.tcti}'", "does not survive fork()", "device:/dev/tpmrm0"):
        assert needle in text, r
    child = [e for e in kxutil.read_audit(log) if e["event"] == "keygen" and not e["ok"]]
    assert len(child) == 1 and child[0]["pid"] != r.pid and "does not survive fork()" in child[0]["error"], child
