"""PKCS#11 faults an operator or the host causes: a module path that is not a PKCS#11
module, a wrong PIN under a long-running server. Each case: a clear keyx error (the reason text
says what to fix) within 5 s, no crash (no signal, no sanitizer report), nothing added to or lost
from the token, and no lockout loop.
"""

import re
import subprocess
import time
from pathlib import Path

import pytest

import kxutil
from conftest import pick_port
from fixture_softhsm import PIN, SPY, SoftHSM

WRONG_PIN = "kxwrong-2718"


def bad_modules(tmp):
    text = tmp / "not-a-module.txt"
    text.write_text("this is a text file, not a shared object\n")
    empty = tmp / "empty.so"
    empty.write_bytes(b"")
    junk = tmp / "junk.so"
    junk.write_bytes(b"\x7fELF" + bytes(range(256)) * 4)  # ELF magic, then garbage
    subdir = tmp / "a-directory.so"
    subdir.mkdir()
    return {
        "missing": (tmp / "nothing-here.so", "check pkcs11-module"),
        "random-so": (Path("/lib/x86_64-linux-gnu/libz.so.1"), "check pkcs11-module"),  # no C_GetFunctionList
        "text-file": (text, "check pkcs11-module"),
        "empty-file": (empty, "check pkcs11-module"),
        "elf-junk": (junk, "check pkcs11-module"),
        "directory": (subdir, "check pkcs11-module"),
    }


def assert_clean_failure(r, *needles):
    text = r.out + r.err
    assert r.rc is not None and 0 < r.rc < 128, f"expected a clean failure, not a signal:\n{r!r}"
    for n in needles:
        assert n in text, f"error does not say {n!r}:\n{r!r}"
    assert PIN not in text and WRONG_PIN not in text, f"a PIN in the output:\n{r!r}"


@pytest.mark.parametrize("kind", ["missing", "random-so", "text-file", "empty-file", "elf-junk", "directory"])
def test_module_that_is_no_pkcs11_module(softhsm, cnf, tmp, kind):
    path, hint = bad_modules(tmp)[kind]
    before = softhsm.token_objects("keyx-a")
    log = tmp / "audit.jsonl"
    env = softhsm.env(OPENSSL_CONF=cnf(keyx={"audit-log": log,
                                             **softhsm.keyx_settings(**{"pkcs11-module": path})}))
    start = time.monotonic()
    r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", env=env)
    took = time.monotonic() - start
    assert_clean_failure(r, f"cannot load PKCS#11 module '{path}'", hint, "PKCS#11 module cannot be loaded")
    assert took < 5, f"the failure took {took:.1f}s"
    assert "PRIVATE KEY" not in r.out, "a key was made somewhere else"
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    assert not [e for e in events if e["ok"] and e["event"] == "keygen"], events
    assert softhsm.token_objects("keyx-a") == before


@pytest.mark.parametrize("kind", ["random-so", "text-file"])
def test_bad_module_with_software_listed_is_still_an_error(softhsm, cnf, tmp, kind):
    """backends = pkcs11, software: a pkcs11-module that cannot be loaded is a configuration
    error, not a device failure, so keyx does not quietly make the keys in software (failover
    is for devices that fail or vanish, test_failover_tls.py); the error names the module."""
    path, _ = bad_modules(tmp)[kind]
    log = tmp / "audit.jsonl"
    conf = cnf(keyx={"audit-log": log, **softhsm.keyx_settings(backends="pkcs11, software",
                                                               **{"pkcs11-module": path})})
    env = softhsm.env(OPENSSL_CONF=conf)
    start = time.monotonic()
    r = kxutil.run([kxutil.derive_bin(), "--config", conf, "uses", "EC", "P-256", "3"], env=env)
    took = time.monotonic() - start
    assert_clean_failure(r, f"cannot load PKCS#11 module '{path}'", "check pkcs11-module")
    assert took < 5, f"took {took:.1f}s"
    events = [e for e in kxutil.read_audit(log) if e["pid"] == r.pid]
    kxutil.check_audit_schema(events)
    assert not [e for e in events if e["event"] in ("keygen", "derive") and e["ok"]], events


def test_wrong_pin_under_a_long_running_server(tmp_path_factory, certs, cnf, tmp):
    """s_server with a wrong PIN file serves 12 connections: every handshake fails within 5 s
    with an error that says to fix pkcs11-pin, the server stays up, and keyx sends exactly one
    C_Login in the whole process (pkcs11-spy); afterwards the right PIN still logs in (not
    locked), and nothing was added to the token."""
    hsm = SoftHSM(tmp_path_factory.mktemp("wrongpin")).setup()
    bad = tmp / "bad-pin"
    bad.write_text(WRONG_PIN)
    spy_log = tmp / "spy.log"
    log = tmp / "audit.jsonl"
    before = hsm.token_objects("keyx-a")
    conf = cnf(keyx={"audit-log": log, "debug": 1,
                     **hsm.keyx_settings(**{"pkcs11-pin": f"file:{bad}", "pkcs11-module": SPY})})
    env = hsm.spy_env(spy_log, OPENSSL_CONF=conf)
    crt, key = certs["rsa"]
    port = pick_port()
    n = 12
    srv = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", str(n),
                            "-cert", crt, "-key", key, "-groups", "P-256", "-quiet"],
                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=env, text=True, start_new_session=True)
    try:
        done = 0
        deadline = time.monotonic() + 10
        while done < n:
            start = time.monotonic()
            r = kxutil.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-groups",
                            "P-256", "-brief"], env=kxutil.base_env(), input="")
            took = time.monotonic() - start
            if "Connection refused" in r.err or "connect:errno" in r.err:
                assert time.monotonic() < deadline and srv.poll() is None, "s_server does not listen"
                time.sleep(0.1)
                continue
            done += 1
            assert r.rc != 0, f"handshake {done} succeeded with a wrong PIN:\n{r!r}"
            assert took < 5, f"failed handshake {done} took {took:.1f}s"
        srv.wait(kxutil.TIMEOUT)
    finally:
        kxutil.kill_group(srv)
    err = srv.stderr.read()
    for m in kxutil.SANITIZER_MARKERS:
        assert m not in err, err
    assert srv.returncode == 0, f"s_server exited {srv.returncode}:\n{err[-3000:]}"
    assert "PIN incorrect" in err and "pkcs11-pin" in err and "not retried" in err, err[-3000:]
    assert WRONG_PIN not in err and PIN not in err, "a PIN in the server's output"
    logins = re.findall(r"^\d+: C_Login$", spy_log.read_text(), re.M)
    assert len(logins) == 1, f"{len(logins)} C_Login calls for {n} handshakes in one process"
    events = [e for e in kxutil.read_audit(log) if e["pid"] == srv.pid]
    kxutil.check_audit_schema(events)
    assert not [e for e in events if e["ok"] and e["event"] in ("keygen", "derive")], "a key share was made"
    assert WRONG_PIN not in log.read_text() and PIN not in log.read_text()
    hsm.tool("keyx-a", "--list-objects").ok("the right PIN still logs in: the token is not locked")
    assert hsm.token_objects("keyx-a") == before
    # the fault ends (the PIN file fixed): a new process logs in and serves from the token
    bad.write_text(PIN)
    r = kxutil.run([kxutil.derive_bin(), "--config", conf, "uses", "EC", "P-256", "2"],
                   env=hsm.spy_env(tmp / "spy2.log", OPENSSL_CONF=conf))
    r.ok("keygen and derive after the PIN was fixed")
