"""keyx's state as provider parameters: the configured backends, what keyx knows of each without a
device round trip (not connected yet, connected, down until when and why, a PKCS#11 module that
cannot be loaded), the audit sink, and why keyx refuses to serve when it does.

`openssl list -providers -verbose` prints the values of name, version, status and build info only;
of the other gettable parameters it prints the names and types. The values are read here as an
application or a monitoring probe reads them: OSSL_PROVIDER_get_params, in the same process as
the operations whose outcome they show (`openssl list` is a fresh process that has not used any
device yet).
"""

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import kxutil
from fixture_softhsm import PIN, softhsm  # noqa: F401  (fixture)
from fixture_swtpm import swtpm, swtpm_factory  # noqa: F401  (fixtures)
from kxutil import base_env, openssl
from test_provider import providers

STATE = ("keyx-backends", "keyx-backend-software", "keyx-backend-tpm", "keyx-backend-pkcs11",
         "keyx-audit", "keyx-refusal")

# A program's library context loaded from argv[1], keyx in it, and state(): keyx's parameters
# named in argv[2] (comma-separated) and its status, read with OSSL_PROVIDER_get_params into
# UTF8_STRING buffers, with the time the call took.
PARAMS = kxutil.LIBCRYPTO_CTYPES + r"""
import json, threading, time
from ctypes import Structure, c_uint, create_string_buffer
class PARAM(Structure):
    _fields_ = [("key", c_char_p), ("data_type", c_uint), ("data", c_void_p),
                ("data_size", c_size_t), ("return_size", c_size_t)]
UNMODIFIED = ctypes.c_size_t(-1).value
prov_load = fn("OSSL_PROVIDER_load", c_void_p, c_void_p, c_char_p)
prov_unload = fn("OSSL_PROVIDER_unload", c_int, c_void_p)
get_params = fn("OSSL_PROVIDER_get_params", c_int, c_void_p, POINTER(PARAM))
NAMES = [n.encode() for n in sys.argv[2].split(",")]
ctx = LIB_new()
assert LIB_load(ctx, sys.argv[1].encode()) == 1
prov = prov_load(ctx, b"keyx")
assert prov, "keyx is not loaded"

def state(size=4096):
    bufs = [create_string_buffer(size) for _ in NAMES]
    status = c_int(-1)
    params = (PARAM * (len(NAMES) + 2))()
    for i, n in enumerate(NAMES):
        params[i] = PARAM(n, 4, ctypes.cast(bufs[i], c_void_p), size, UNMODIFIED)  # UTF8_STRING
    params[len(NAMES)] = PARAM(b"status", 1, ctypes.cast(ctypes.pointer(status), c_void_p), 4, UNMODIFIED)
    t = time.monotonic()
    ok = get_params(prov, params)
    took = time.monotonic() - t
    if not ok:
        print_errors()
        return {"ok": 0}
    out = {n.decode(): bufs[i].value.decode() for i, n in enumerate(NAMES)
           if params[i].return_size != UNMODIFIED}
    out.update(ok=1, status=status.value, seconds=took, now=time.time())
    return out

def keygen(alg):
    c = CTX_name(ctx, alg.encode(), None)
    k = c_void_p()
    ok = c and kg_init(c) == 1 and (alg != "EC" or set_group(c, b"P-256") == 1) and generate(c, byref(k)) == 1
    if not ok:
        print_errors()
    pkey_free(k)
    CTX_free(c)
    return "ok" if ok else "err"
"""

# Prints the state as one JSON line ("before"), generates one key per algorithm named on the
# command line (printing "ok"/"err"), then prints the state again ("after"), in one process.
PROBE = PARAMS + r"""
print(json.dumps(state()), flush=True)
if "SMALL" in sys.argv[3:]:
    print(json.dumps(state(size=8)), flush=True)
for alg in sys.argv[3:]:
    if alg != "SMALL":
        print(keygen(alg), flush=True)
print(json.dumps(state()), flush=True)
prov_unload(prov)
LIB_free(ctx)
"""


def probe(cnf, *algs, env=None):
    """(state before, generation results, state after, the run) in one process."""
    r = kxutil.run(["/usr/bin/python3", "-c", PROBE, str(cnf), ",".join(STATE), *algs],
                   env=env or base_env())
    r.ok("state probe")
    lines = r.out.strip().splitlines()
    before, after = json.loads(lines[0]), json.loads(lines[-1])
    return before, lines[1:-1], after, r


def fast(state):
    """get_params answered without waiting for any device."""
    assert state["ok"] == 1, state
    assert state["seconds"] < 0.5, f"get_params took {state['seconds']:.3f} s: did it ask a device?"
    return state


def dead_tcti(free_port):
    return f"swtpm:host=127.0.0.1,port={free_port}"


def test_listed_with_state_parameter_names(tmp):
    """openssl list -providers -verbose names keyx's state parameters (it prints the values of
    name, version, status and build info only)."""
    cnf = kxutil.write_cnf(tmp / "openssl.cnf")
    r = openssl("list", "-providers", "-verbose", env=base_env(OPENSSL_CONF=cnf)).ok("list")
    assert providers(r.out)["keyx"]["status"] == "active", r
    keyx_part = r.out[r.out.index("\n  keyx\n"):]
    for name in STATE:
        assert re.search(rf"^      {name}: UTF8 encoded string", keyx_part, re.M), f"{name} not listed:\n{r!r}"


def test_software_only(tmp):
    log = tmp / "audit.jsonl"
    before, gens, after, r = probe(kxutil.write_cnf(tmp / "openssl.cnf", keyx={"audit-log": log}), "EC")
    assert gens == ["ok"], r
    for s in (fast(before), fast(after)):
        assert s["status"] == 1, s
        assert s["keyx-backends"] == "software", s
        assert s["keyx-backend-software"] == "ready", s
        assert s["keyx-backend-tpm"].startswith("not in backends"), s
        assert s["keyx-backend-pkcs11"].startswith("not in backends"), s
        assert s["keyx-audit"] == str(log), s
        assert s["keyx-refusal"] == "none", s


def test_audit_off_and_syslog(tmp):
    before, _, _, r = probe(kxutil.write_cnf(tmp / "off.cnf"))
    assert before["keyx-audit"].startswith("off"), r
    sock_path = tmp / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        before, _, _, r = probe(kxutil.write_cnf(tmp / "syslog.cnf", keyx={"audit-log": f"syslog:{sock_path}"}))
    assert "syslog" in before["keyx-audit"] and str(sock_path) in before["keyx-audit"], r


def test_tpm_down_before_and_after_a_failed_keygen(tmp, free_port):
    """backends = tpm, software with nothing at the TCTI: before any operation the TPM is 'not
    connected yet'; after a key generation (made in software, as configured) the same process sees
    the TPM marked down for a few seconds, with the error that made it so."""
    tcti = dead_tcti(free_port)
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={"backends": "tpm, software", "tpm-tcti": tcti})
    before, gens, after, r = probe(cnf, "EC")
    assert gens == ["ok"], r  # the failover the operator configured
    fast(before)
    fast(after)
    assert before["keyx-backends"] == after["keyx-backends"] == "tpm, software", r
    tpm0, tpm1 = before["keyx-backend-tpm"], after["keyx-backend-tpm"]
    assert "not connected yet" in tpm0 and tcti in tpm0, r
    assert "down until" not in tpm0 and "last error" not in tpm0, r
    assert "last attempt to connect failed" in tpm1 and tcti in tpm1, r
    m = re.search(r"down until (\d\d):(\d\d):(\d\d) UTC", tpm1)
    assert m, r
    # "until" is a few seconds after the failure, in UTC
    now = time.gmtime(after["now"])
    until = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3))
    delta = (until - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)) % 86400
    assert 0 <= delta <= 10, f"down until {m.group(0)}, now {time.strftime('%H:%M:%S', now)}:\n{r!r}"
    m = re.search(r"last error at \d\d:\d\d:\d\d UTC: (.*)$", tpm1)
    assert m and "tpm" in m.group(1) and tcti in m.group(1), r
    assert before["keyx-backend-software"] == after["keyx-backend-software"] == "ready", r
    assert after["status"] == 1 and after["keyx-refusal"] == "none", r


def test_tpm_connected_after_use(swtpm, tmp):  # noqa: F811
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={"backends": "tpm", "tpm-tcti": swtpm.tcti})
    before, gens, after, r = probe(cnf, "EC")
    assert gens == ["ok"], r
    assert "not connected yet" in fast(before)["keyx-backend-tpm"], r
    tpm1 = fast(after)["keyx-backend-tpm"]
    assert tpm1.startswith("connected") and swtpm.tcti in tpm1, r
    assert "down until" not in tpm1 and "last error" not in tpm1, r


# Connects (one key), prints the state, waits for a line on stdin (the test stops the TPM), then
# reads the state while another thread's key generation waits for the stopped TPM, and once more
# after that generation gave up.
STALL = PARAMS + r"""
print(json.dumps({"gen": keygen("EC"), **state()}), flush=True)
sys.stdin.readline()
res = []
t = threading.Thread(target=lambda: res.append(keygen("EC")))
t.start()
time.sleep(0.5)
print(json.dumps({"waiting": t.is_alive(), **state()}), flush=True)
t.join()
print(json.dumps({"gen": res[0], **state()}), flush=True)
"""


def test_tpm_stalled_state_answers_at_once(swtpm_factory, tmp):  # noqa: F811
    """A TPM that takes commands and never answers (swtpm stopped): while another thread waits
    for it, holding the device, the state is read at once; after the wait runs out (tpm-timeout)
    the state says the connection was lost, and why."""
    tpm = swtpm_factory()
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={"backends": "tpm", "tpm-tcti": tpm.tcti,
                                                      "tpm-timeout": "1500"})
    proc = subprocess.Popen(["/usr/bin/python3", "-c", STALL, str(cnf), ",".join(STATE)], env=base_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(kxutil.TIMEOUT, proc.kill)  # a hung probe fails the test, not the run
    watchdog.start()
    try:
        first = json.loads(proc.stdout.readline() or "{}")
        assert first.get("gen") == "ok", proc.stderr.read() if proc.poll() is not None else first
        assert fast(first)["keyx-backend-tpm"].startswith("connected"), first
        os.killpg(tpm.proc.pid, signal.SIGSTOP)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        during = json.loads(proc.stdout.readline() or "{}")
        after = json.loads(proc.stdout.readline() or "{}")
    finally:
        if tpm.proc is not None:
            os.killpg(tpm.proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=kxutil.TIMEOUT)
        watchdog.cancel()
    assert proc.returncode == 0, err
    assert during.get("waiting") is True, f"the generation did not wait for the stopped TPM: {during}\n{err}"
    assert fast(during)["keyx-backend-tpm"].startswith("connected"), during
    assert after.get("gen") == "err", after
    tpm1 = fast(after)["keyx-backend-tpm"]
    assert "the connection was lost" in tpm1 and "down until" in tpm1, after
    assert re.search(r"last error at \d\d:\d\d:\d\d UTC: tpm: .*did not answer within 1500 ms", tpm1), after


def test_wrong_pkcs11_module_path(tmp):
    """The module is loaded at the first PKCS#11 operation, not when keyx starts (keyx stays
    active): before it, the state says the path names no file; after, why loading failed."""
    missing = tmp / "no-such-module.so"
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={"backends": "pkcs11", "pkcs11-module": missing})
    r = openssl("list", "-providers", "-verbose", env=base_env(OPENSSL_CONF=cnf)).ok("list")
    assert providers(r.out)["keyx"]["status"] == "active", r
    before, gens, after, r = probe(cnf, "EC")
    assert gens == ["err"] and "cannot load PKCS#11 module" in r.err, r
    p0, p1 = fast(before)["keyx-backend-pkcs11"], fast(after)["keyx-backend-pkcs11"]
    assert "not loaded yet" in p0 and "no such file" in p0 and str(missing) in p0, r
    assert "could not be loaded" in p1 and "check pkcs11-module" in p1 and str(missing) in p1, r


def test_pkcs11_ready_and_no_pin(softhsm, tmp):  # noqa: F811
    """A working token: 'not loaded yet', then loaded with the token logged in. The PIN (here in
    the environment) appears in no parameter."""
    settings = softhsm.keyx_settings(backends="pkcs11", **{"pkcs11-pin": "env:KX_STATE_PIN"})
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx=settings)
    before, gens, after, r = probe(cnf, "EC", env=softhsm.env(KX_STATE_PIN=PIN))
    assert gens == ["ok"], r
    p0, p1 = fast(before)["keyx-backend-pkcs11"], fast(after)["keyx-backend-pkcs11"]
    assert "not loaded yet" in p0 and "no such file" not in p0, r
    assert "loaded" in p1 and "not loaded" not in p1 and "token 'keyx-a': ready (logged in)" in p1, r
    assert PIN not in r.out, r


def test_refusing_shows_the_reason(tmp):
    """An audit log keyx cannot open: keyx refuses every operation; its parameters say why, and
    that the listed backends were not opened."""
    log = tmp / "no-such-dir" / "audit.jsonl"
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={"backends": "tpm, software", "audit-log": log})
    before, gens, after, r = probe(cnf, "EC")
    assert gens == ["err"], r
    s = fast(before)
    assert s["status"] == 0, r
    assert "audit" in s["keyx-refusal"] and str(log) in s["keyx-refusal"], r
    assert s["keyx-backends"] == "tpm, software", r
    for b in ("keyx-backend-tpm", "keyx-backend-software"):
        assert "keyx refuses to serve" in s[b] and "keyx-refusal" in s[b], r
    assert s["keyx-backend-pkcs11"] == "not in backends", r
    assert "not open" in s["keyx-audit"] and str(log) in s["keyx-audit"], r
    assert after["keyx-refusal"] == s["keyx-refusal"], r


def test_buffer_too_small_is_an_error(tmp):
    r = kxutil.run(["/usr/bin/python3", "-c", PROBE, str(kxutil.write_cnf(tmp / "openssl.cnf")),
                    ",".join(STATE), "SMALL"], env=base_env())
    r.ok("state probe")
    assert json.loads(r.out.splitlines()[1]) == {"ok": 0}, r
    assert "pass a UTF-8 string buffer of at least" in r.err, r


def test_state_example_program(tmp):
    """examples/state.c, the probe docs/guide.md shows: the values, and exit status 2 when keyx
    refuses."""
    exe = kxutil.build_dir() / "examples" / "keyx-state-example"
    assert exe.exists(), f"{exe} not built"
    cnf = kxutil.write_cnf(tmp / "ok.cnf", keyx={"backends": "tpm, software", "tpm-tcti": "device:/dev/null"})
    r = kxutil.run([exe], env=base_env(OPENSSL_CONF=cnf)).ok("keyx-state-example")
    lines = dict(l.split(": ", 1) for l in r.out.splitlines())
    assert lines["status"] == "active" and lines["keyx-backends"] == "tpm, software", r
    assert "not connected yet" in lines["keyx-backend-tpm"] and "device:/dev/null" in lines["keyx-backend-tpm"], r
    assert lines["keyx-refusal"] == "none", r
    bad = kxutil.write_cnf(tmp / "bad.cnf", keyx={"backends": "tmp"})
    r = kxutil.run([exe], env=base_env(OPENSSL_CONF=bad))
    assert r.rc == 2, r
    lines = dict(l.split(": ", 1) for l in r.out.splitlines())
    assert lines["status"] == "inactive" and 'backends = "tmp"' in lines["keyx-refusal"], r
    # not the default list in place of the one keyx could not read
    assert lines["keyx-backends"].startswith("unknown"), r
    assert all("keyx refuses to serve" in lines[f"keyx-backend-{b}"] for b in ("software", "tpm", "pkcs11")), r
    assert "keyx refuses to serve" in lines["keyx-audit"], r
