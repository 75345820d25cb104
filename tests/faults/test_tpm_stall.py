"""A TPM that accepts commands but never answers: swtpm stopped with SIGSTOP.

The TCP connection to a stopped swtpm still opens and the command is still sent: without a bound
ESYS waits for the answer forever (a hung nginx worker). keyx bounds every answer by tpm-timeout
(5000 ms by default; RSA key creation ten times as long): the operation fails with an error
naming the TCTI, or fails over to the next backend; after SIGCONT the same process goes on, and
whatever the stalled command left in the TPM is flushed.

The application is a long-lived Python process calling libcrypto through ctypes (keyx preferred,
the default provider beside it), driven one command per stdin line: every secret keyx derives is
cross-checked by the default provider from the public half of keyx's key.
"""

import json
import os
import queue
import signal
import subprocess
import threading
import time

import pytest

import kxutil
from fixture_abrmd import abrmd  # noqa: F401  (fixture)
from fixture_swtpm import tpm_cnf
from kxutil import base_env
from test_tpm_persistent import make_persistent

BOUND = 5.0  # the default tpm-timeout, in seconds
MARGIN = 1.5  # process start-up, Python, a loaded CI box
HANDLE = 0x81000002

APP = kxutil.LIBCRYPTO_CTYPES + r'''
import json, threading, time
get_err = fn("ERR_get_error_all", ctypes.c_ulong, POINTER(c_char_p), POINTER(c_int), POINTER(c_char_p), POINTER(c_char_p), POINTER(c_int))
st_open = fn("OSSL_STORE_open_ex", c_void_p, c_char_p, c_void_p, c_char_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p)
st_load = fn("OSSL_STORE_load", c_void_p, c_void_p)
st_close = fn("OSSL_STORE_close", c_int, c_void_p)
info_pkey = fn("OSSL_STORE_INFO_get1_PKEY", c_void_p, c_void_p)
info_free = fn("OSSL_STORE_INFO_free", None, c_void_p)
thread_stop = fn("OPENSSL_thread_stop", None)
ctx = LIB_new()
assert LIB_load(ctx, sys.argv[1].encode()) == 1
def errs():
    out = []
    while True:
        f, l, fu, data, fl = c_char_p(), c_int(), c_char_p(), c_char_p(), c_int()
        if not get_err(byref(f), byref(l), byref(fu), byref(data), byref(fl)):
            return out
        if data.value:
            out.append(data.value.decode("utf-8", "replace"))
def gen(propq=None):
    c = CTX_name(ctx, b"EC", propq)
    k = c_void_p()
    ok = c and kg_init(c) == 1 and set_group(c, b"P-256") == 1 and generate(c, byref(k)) == 1
    CTX_free(c)
    return k.value if ok else None
def derive(key, peer, propq=None):
    c = CTX_pkey(ctx, key, propq)
    n = c_size_t(0)
    ok = c and d_init(c) == 1 and d_peer(c, peer) == 1 and d_derive(c, None, byref(n)) == 1
    buf = ctypes.create_string_buffer(n.value)
    ok = ok and d_derive(c, buf, byref(n)) == 1
    CTX_free(c)
    return buf.raw[: n.value] if ok else None
def checked(key, peer):
    """keyx's secret equals the default provider's from the public half of key."""
    got = derive(key, peer)
    pub = public_copy(key)
    want = derive(peer, pub, b"provider=default") if pub else None
    pkey_free(pub)
    return got is not None and got == want
peer = gen(b"provider=default")
def op_gen():
    k = gen()
    if not k:
        return {"ok": False, "errors": errs()}
    where = prov_name(get_prov(k)).decode()
    ok = checked(k, peer)
    pkey_free(k)
    return {"ok": ok, "provider": where, "errors": [] if ok else errs()}
persistent = None
def op_pers():
    global persistent
    if persistent is None:
        st = st_open(sys.argv[2].encode(), ctx, None, None, None, None, None, None)
        info = st_load(st) if st else None
        persistent = info_pkey(info) if info else None
        info_free(info)
        if st: st_close(st)
        if not persistent:
            return {"ok": False, "errors": errs()}
    ok = checked(persistent, peer)
    return {"ok": ok, "errors": [] if ok else errs()}
set_bits = fn("EVP_PKEY_CTX_set_rsa_keygen_bits", c_int, c_void_p, c_int)
def op_rsa():
    c = CTX_name(ctx, b"RSA", None)
    k = c_void_p()
    ok = c and kg_init(c) == 1 and set_bits(c, 2048) == 1 and generate(c, byref(k)) == 1
    CTX_free(c)
    if not ok:
        return {"ok": False, "errors": errs()}
    where = prov_name(get_prov(k.value)).decode()
    pkey_free(k.value)
    return {"ok": True, "provider": where}
def op_threads(n):
    res = []
    def work():
        t0 = time.monotonic()
        r = op_gen()
        r["took"] = time.monotonic() - t0
        res.append(r)
        thread_stop()
    ts = [threading.Thread(target=work) for _ in range(n)]
    [t.start() for t in ts]; [t.join() for t in ts]
    return {"ok": True, "results": res}
for line in sys.stdin:
    cmd = line.split()
    t0 = time.monotonic()
    if cmd[0] == "gen": r = op_gen()
    elif cmd[0] == "pers": r = op_pers()
    elif cmd[0] == "rsa": r = op_rsa()
    elif cmd[0] == "threads": r = op_threads(int(cmd[1]))
    else: break
    r["took"] = time.monotonic() - t0
    print(json.dumps(r), flush=True)
pkey_free(persistent)
pkey_free(peer)
fn("OSSL_LIB_CTX_free", None, c_void_p)(ctx)
print("bye", flush=True)
'''


class App:
    """The application process; ask() sends one command and returns (answer dict, seconds)."""

    def __init__(self, tmp, cnf, uri="keyx:tpm:handle=0x81000002", env=None):
        script = tmp / "stall_app.py"
        script.write_text(APP)
        self.err = open(tmp / "stall_app.err", "w")
        self.proc = subprocess.Popen(["/usr/bin/python3", str(script), str(cnf), uri],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     env=env or base_env(), text=True, start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def send(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def ask(self, command, timeout=kxutil.TIMEOUT):
        start = time.monotonic()
        self.send(command)
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{command!r}: no answer within {timeout}s (the process hangs)")
        assert line is not None, f"{command!r}: the process ended:\n{self.stderr()}"
        return json.loads(line), time.monotonic() - start

    def quit(self, timeout=kxutil.TIMEOUT):
        """Ends the process (provider unloaded, library context freed); seconds it took."""
        start = time.monotonic()
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.stdin.close()
        rc = self.proc.wait(timeout)
        return rc, time.monotonic() - start

    def stderr(self):
        self.err.flush()
        return self.err.name and open(self.err.name).read()[-3000:]

    def close(self):
        if self.proc.poll() is None:
            kxutil.kill_group(self.proc)
            self.proc.wait(10)
        self.err.close()


def stop(tpm):
    os.killpg(tpm.proc.pid, signal.SIGSTOP)


def cont(tpm):
    os.killpg(tpm.proc.pid, signal.SIGCONT)


def stalled_error(tpm, answer):
    text = " | ".join(answer["errors"])
    return tpm.tcti in text and "did not answer within 5000 ms" in text, text


def leftovers(tpm):
    """Transient objects and sessions in the TPM (to be read once keyx's process is gone)."""
    return (tpm.tools("tpm2_getcap", "handles-transient").out.split() +
            tpm.tools("tpm2_getcap", "handles-loaded-session").out.split())


def wait_recovered(app, what="gen"):
    """After SIGCONT the TPM first answers the commands keyx gave up on; the next operation
    that finds them answered reconnects. Returns the first successful answer."""
    deadline = time.monotonic() + BOUND + MARGIN
    while True:
        r, _ = app.ask(what)
        if r["ok"] or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_stalled_tpm_fails_within_bound_and_recovers(build, swtpm_factory, tmp):
    tpm = swtpm_factory()
    make_persistent(tpm, tmp, "ecc256", HANDLE)
    log = tmp / "audit.jsonl"
    cnf = tpm_cnf(tmp / "openssl.cnf", tpm, keyx={"audit-log": log})
    app = App(tmp, cnf)
    try:
        for _ in range(3):
            r, _ = app.ask("gen")
            assert r["ok"] and r["provider"] == "keyx", r
        r, _ = app.ask("pers")
        assert r["ok"], r

        stop(tpm)
        try:
            for i in range(3):
                r, took = app.ask("gen", timeout=BOUND * 4)
                assert not r["ok"], f"keygen {i} succeeded with swtpm stopped: {r}"
                assert took < BOUND + MARGIN, f"keygen {i} failed after {took:.1f}s"
                named, text = stalled_error(tpm, r)
                assert named, f"keygen {i}: the error does not say the TPM at the TCTI timed out: {text}"
            r, took = app.ask("pers", timeout=BOUND * 4)
            assert not r["ok"] and took < BOUND + MARGIN, (r, took)
            assert stalled_error(tpm, r)[0], r
        finally:
            cont(tpm)

        r = wait_recovered(app)
        assert r["ok"] and r["provider"] == "keyx", f"no recovery after SIGCONT: {r}"
        for _ in range(5):
            r, _ = app.ask("gen")
            assert r["ok"], f"after SIGCONT: {r}"
        r, _ = app.ask("pers")
        assert r["ok"], f"the persistent key after SIGCONT: {r}"
        rc, _ = app.quit()
        assert rc == 0, app.stderr()
    finally:
        app.close()
    # The keygen given up on ran once swtpm woke up: keyx flushed its object on reconnecting.
    assert not leftovers(tpm), "objects or sessions left in the TPM"
    assert f"0x{HANDLE:x}" in tpm.tools("tpm2_getcap", "handles-persistent").out.lower()
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    gens = [(e["backend"], e["ok"]) for e in events if e["event"] == "keygen"]
    assert gens.count(("tpm", False)) >= 3 and gens[-1] == ("tpm", True), gens


def test_stalled_tpm_fails_over_to_software(build, swtpm_factory, tmp):
    tpm = swtpm_factory()
    log = tmp / "audit.jsonl"
    cnf = tpm_cnf(tmp / "openssl.cnf", tpm, keyx={"backends": "tpm, software", "audit-log": log})
    app = App(tmp, cnf)
    try:
        r, _ = app.ask("gen")
        assert r["ok"], r
        stop(tpm)
        try:
            for i in range(3):
                r, took = app.ask("gen", timeout=BOUND * 4)
                assert r["ok"] and r["provider"] == "keyx", f"keygen+derive {i} did not fail over: {r}"
                assert took < BOUND + MARGIN, f"keygen+derive {i} took {took:.1f}s"
        finally:
            cont(tpm)
        rc, _ = app.quit()
        assert rc == 0, app.stderr()
    finally:
        app.close()
    events = [e for e in kxutil.read_audit(log) if e["pid"] == app.proc.pid]
    kxutil.check_audit_schema(events)
    gens = [(e["backend"], e["ok"]) for e in events if e["event"] == "keygen"]
    assert gens[0] == ("tpm", True), gens
    assert ("software", True) in gens, gens
    assert any(e["event"] == "failover" for e in events), [e["event"] for e in events]


def test_threads_behind_a_stalled_command_and_exit(build, swtpm_factory, tmp):
    """Four threads at once on a stopped swtpm: one waits for the TPM, the others for the lock;
    none waits longer than the bound. Then the process exits with swtpm still stopped: provider
    teardown does not wait for the TPM."""
    tpm = swtpm_factory()
    cnf = tpm_cnf(tmp / "openssl.cnf", tpm)
    app = App(tmp, cnf)
    try:
        r, _ = app.ask("gen")
        assert r["ok"], r
        stop(tpm)
        try:
            r, took = app.ask("threads 4", timeout=BOUND * 6)
            res = r["results"]
            assert len(res) == 4 and not any(x["ok"] for x in res), res
            slowest = max(x["took"] for x in res)
            assert slowest < BOUND + MARGIN, f"a thread waited {slowest:.1f}s: {res}"
            for x in res:
                text = " | ".join(x["errors"])
                assert tpm.tcti in text and ("did not answer" in text or "busy" in text), text
            rc, took = app.quit(timeout=BOUND * 4)
            assert rc == 0 and took < BOUND + MARGIN, f"exit took {took:.1f}s (rc {rc})"
        finally:
            cont(tpm)
    finally:
        app.close()
    # The TPM still works for the next process.
    app = App(tmp, cnf)
    try:
        r = wait_recovered(app)
        assert r["ok"], r
        app.quit()
    finally:
        app.close()


def test_rsa_key_creation_not_cut_by_the_bound(build, swtpm_factory, tmp):
    """A persistent RSA key made with `openssl genpkey` under the default bound (RSA creation
    gets ten times the bound: real chips take tens of seconds); it then signs, checked by the
    default provider."""
    tpm = swtpm_factory()
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", tpm))
    key = tmp / "rsa.pem"
    r = kxutil.openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                       "-pkeyopt", "keyx-persist:0x81000021", "-out", key, env=env)
    assert r.rc == 0, r
    (tmp / "msg").write_bytes(b"stall" * 100)
    r = kxutil.openssl("dgst", "-sha256", "-sign", key, "-out", tmp / "sig", tmp / "msg", env=env)
    assert r.rc == 0, r
    r = kxutil.openssl("pkey", "-in", key, "-pubout", "-out", tmp / "pub.pem", env=env)
    assert r.rc == 0, r
    r = kxutil.openssl("dgst", "-sha256", "-verify", tmp / "pub.pem", "-signature", tmp / "sig",
                       tmp / "msg", env=base_env())
    assert r.rc == 0 and "Verified OK" in r.out, r


def test_stalled_tpm_behind_tpm2_abrmd(build, abrmd, tmp):
    """Through tpm2-abrmd (its TCTI has no timeout either; keyx carries each command on a worker
    thread there): swtpm stopped behind abrmd, each keygen fails within the bound naming the
    TCTI, the process recovers after SIGCONT; abrmd drops the given-up connection's objects."""
    cnf = tpm_cnf(tmp / "openssl.cnf", None, keyx={"tpm-tcti": abrmd.tcti})
    app = App(tmp, cnf, env=abrmd.env())
    try:
        r, _ = app.ask("gen")
        assert r["ok"], r
        stop(abrmd.tpm)
        try:
            for i in range(3):
                r, took = app.ask("gen", timeout=BOUND * 4)
                assert not r["ok"] and took < BOUND + MARGIN, (i, r, took)
                text = " | ".join(r["errors"])
                assert abrmd.tcti in text and "did not answer within 5000 ms" in text, text
        finally:
            cont(abrmd.tpm)
        r = wait_recovered(app)
        assert r["ok"], f"no recovery after SIGCONT: {r}"
        for _ in range(3):
            r, _ = app.ask("gen")
            assert r["ok"], r
        rc, _ = app.quit()
        assert rc == 0, app.stderr()
    finally:
        app.close()
    r = kxutil.run(["tpm2_getcap", "handles-transient"], env=abrmd.tools_env())
    assert r.rc == 0 and not r.out.strip(), r


def test_rsa_key_creation_gets_ten_times_the_bound(build, swtpm_factory, tmp):
    """tpm-timeout = 1000: an RSA key creation the TPM answers after 3 s (swtpm stopped that
    long) succeeds, as RSA creation waits ten times the bound; an EC keygen on the stopped TPM
    fails after 1 s, naming the configured bound."""
    tpm = swtpm_factory()
    cnf = tpm_cnf(tmp / "openssl.cnf", tpm, keyx={"tpm-timeout": "1000"})
    app = App(tmp, cnf)
    try:
        r, _ = app.ask("rsa")  # connects, asks TPM2_TestParms, makes the storage parent
        assert r["ok"] and r["provider"] == "keyx", r
        r, _ = app.ask("gen")
        assert r["ok"], r
        stop(tpm)
        try:
            start = time.monotonic()
            app.send("rsa")
            time.sleep(3)
        finally:
            cont(tpm)
        line = app.lines.get(timeout=kxutil.TIMEOUT)
        took = time.monotonic() - start
        r = json.loads(line)
        assert r["ok"] and took >= 3, f"RSA key creation cut short after {took:.1f}s: {r}"
        stop(tpm)
        try:
            r, took = app.ask("gen", timeout=BOUND * 4)
        finally:
            cont(tpm)
        text = " | ".join(r["errors"])
        assert not r["ok"] and took < 1 + MARGIN and "did not answer within 1000 ms" in text, (took, r)
        r = wait_recovered(app)
        assert r["ok"], r
        rc, _ = app.quit()
        assert rc == 0, app.stderr()
    finally:
        app.close()


@pytest.mark.parametrize("tcti", ["swtpm", "mssim"])
def test_new_process_with_a_stopped_tpm_fails_within_bound(build, swtpm_factory, tmp, tcti):
    """A process that starts while the TPM is stopped: opening the TPM is bounded too. swtpm's
    TCTI is keyx's own socket; any other TCTI (mssim here, whose initialization talks to the
    simulator without a timeout) is opened by the loader in a thread keyx stops waiting for."""
    tpm = swtpm_factory()
    conf = f"{tcti}:host=127.0.0.1,port={tpm.port}"
    cnf = tpm_cnf(tmp / "openssl.cnf", tpm, keyx={"tpm-tcti": conf, "tpm-timeout": "1000"})
    env = base_env(OPENSSL_CONF=cnf)
    stop(tpm)
    try:
        start = time.monotonic()
        r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", env=env,
                           timeout=60)
        took = time.monotonic() - start
    finally:
        cont(tpm)
    assert r.rc != 0 and "PRIVATE KEY" not in r.out, r
    # one connect, and at most one reconnect after it (a TPM reset looks the same at first)
    assert took < 2 * 1.0 + MARGIN, f"genpkey took {took:.1f}s with the TPM stopped (tpm-timeout 1000 ms)"
    assert conf in r.err and "did not answer within 1000 ms" in r.err, f"the error does not say why:\n{r!r}"
    if tcti == "swtpm":
        # once the TPM runs again, a new process is served
        r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                           "-pkeyopt", "keyx-persist:0x81000003", env=env)
        assert r.rc == 0 and "KEYX KEY" in r.out, r
