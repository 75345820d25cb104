"""TPM object slots without a resource manager. swtpm holds three transient objects;
keyx keeps its storage parent loaded and shares the other slots out among its keys, saving the
least recently used idle key out of the TPM (ContextSave) when a slot is needed and loading it
back when it is used. An application holding more keys than slots, threads generating and
deriving at once, and objects left behind by a process killed with SIGKILL must all work.

The application is Python calling libcrypto through ctypes in its own library context (keyx
preferred, the default provider beside it): each secret keyx derives is cross-checked by the
default provider from the public half of keyx's key.
"""

import subprocess

import kxutil
from fixture_swtpm import tpm_cnf
from kxutil import base_env, run

APP = kxutil.LIBCRYPTO_CTYPES + r'''
import threading
ctx = LIB_new()
assert LIB_load(ctx, sys.argv[1].encode()) == 1
def gen(group, propq=None):
    c = CTX_name(ctx, b"EC", propq)
    k = c_void_p()
    ok = c and kg_init(c) == 1 and set_group(c, group.encode()) == 1 and generate(c, byref(k)) == 1
    CTX_free(c)
    return k.value if ok else None
get_err = fn("ERR_get_error_all", ctypes.c_ulong, POINTER(c_char_p), POINTER(c_int), POINTER(c_char_p), POINTER(c_char_p), POINTER(c_int))
def errs():
    out = []
    while True:
        f, l, fu, data, fl = c_char_p(), c_int(), c_char_p(), c_char_p(), c_int()
        e = get_err(byref(f), byref(l), byref(fu), byref(data), byref(fl))
        if not e: return out
        out.append(f"{fu.value} {data.value}")
def derive(key, peer, propq=None):
    c = CTX_pkey(ctx, key, propq)
    n = c_size_t(0)
    ok = c and d_init(c) == 1 and d_peer(c, peer) == 1 and d_derive(c, None, byref(n)) == 1
    buf = ctypes.create_string_buffer(n.value)
    ok = ok and d_derive(c, buf, byref(n)) == 1
    CTX_free(c)
    return buf.raw[: n.value] if ok else None
thread_stop = fn("OPENSSL_thread_stop", None)
def exchange_ok():
    # one ephemeral keyx key and a default-provider peer: keyx's secret equals the default's
    k, p = gen("P-256"), gen("P-256", b"provider=default")
    ok = bool(k and p and derive(k, p) == derive(p, public_copy(k), b"provider=default"))
    pkey_free(k); pkey_free(p)
    return ok
if sys.argv[2] == "fork":
    import os
    k, p = gen("P-256"), gen("P-256", b"provider=default")
    assert derive(k, p) == derive(p, public_copy(k), b"provider=default"), "parent before fork"
    pid = os.fork()
    if pid == 0:
        # the parent's key does not exist in the child: refused, not computed on another key
        old = derive(k, p)
        e = errs()
        k2 = gen("P-256")
        ok = old is None and any("no longer exists" in x for x in e) and k2 is not None and \
            derive(k2, p) == derive(p, public_copy(k2), b"provider=default")
        pkey_free(k2)
        fn("OSSL_LIB_CTX_free", None, c_void_p)(ctx)
        print("child", "ok" if ok else f"bad {old is None} {e}", flush=True)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    # the parent goes on making and using keys
    k3 = gen("P-256")
    ok = k3 is not None and derive(k3, p) == derive(p, public_copy(k3), b"provider=default")
    print("parent", "ok" if ok else "bad", "child-status", status, flush=True)
    sys.exit(0)
if sys.argv[2] == "persist":
    # a persistent key loaded by URI, used before and after the TPM restarts (stdin line)
    st_open = fn("OSSL_STORE_open_ex", c_void_p, c_char_p, c_void_p, c_char_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p)
    st_load = fn("OSSL_STORE_load", c_void_p, c_void_p)
    info_pkey = fn("OSSL_STORE_INFO_get1_PKEY", c_void_p, c_void_p)
    st = st_open(sys.argv[3].encode(), ctx, None, None, None, None, None, None)
    k = info_pkey(st_load(st)) if st else None
    p = gen("P-256", b"provider=default")
    want = derive(p, public_copy(k), b"provider=default") if k else None
    print("before", "ok" if k and derive(k, p) == want else f"bad {errs()}", flush=True)
    sys.stdin.readline()
    got = derive(k, p)
    print("after", "ok" if got == want else f"bad {errs()}", flush=True)
    sys.exit(0)
if sys.argv[2] == "restart-threads":
    # One round per stdin line: 4 threads each make a key and derive with it, all starting at
    # the same moment (the test restarts swtpm between rounds: the first command of every thread
    # meets the lost session).
    for line in sys.stdin:
        start, bad = threading.Barrier(4), []
        def one():
            start.wait()
            if not exchange_ok():
                bad.append(errs())
            thread_stop()
        ts = [threading.Thread(target=one) for _ in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print("round", "ok" if not bad else f"bad {bad}", flush=True)
    fn("OSSL_LIB_CTX_free", None, c_void_p)(ctx)
    sys.exit(0)
if sys.argv[2] == "hold":
    held = [gen("P-256") for _ in range(2)]
    assert all(held)
    print("holding", flush=True)
    sys.stdin.read()
    sys.exit(0)
# several keys alive at once: more than swtpm's three object slots
groups = ["P-256", "P-384"] * 4
mine = [gen(g) for g in groups]
peers = [gen(g, b"provider=default") for g in groups]
assert all(mine) and all(peers), "keygen failed"
assert all(prov_name(get_prov(k)) == b"keyx" for k in mine)
bad = 0
for rnd in range(2):
    for i in (range(len(mine)) if rnd == 0 else reversed(range(len(mine)))):
        a, b = derive(mine[i], peers[i]), derive(peers[i], public_copy(mine[i]), b"provider=default")
        if a is None or a != b:
            bad += 1
print("held", len(mine), "bad", bad)
for k in mine + peers: pkey_free(k)
# threads
errors = []
def work(n):
    for _ in range(n):
        if not exchange_ok():
            errors.append(1)
    # Release this thread's OpenSSL state now: join() returns before the OS thread has run its
    # exit handlers, which could otherwise meet library contexts freed below.
    thread_stop()
ts = [threading.Thread(target=work, args=(25,)) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
print("threads bad", len(errors))
# Unloading keyx (freeing the library context) flushes its parent and session from the TPM.
fn("OSSL_LIB_CTX_free", None, c_void_p)(ctx)
'''


def app(tmp):
    path = tmp / "app.py"
    path.write_text(APP)
    return path


def test_more_keys_than_slots_and_threads(swtpm, tmp):
    log = tmp / "audit.jsonl"
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"audit-log": log})
    r = run(["/usr/bin/python3", app(tmp), cnf, "many"], env=base_env(), timeout=max(kxutil.TIMEOUT, 180))
    assert r.rc == 0, r
    assert "held 8 bad 0" in r.out and "threads bad 0" in r.out, r
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    gens = [e for e in events if e["event"] == "keygen"]
    assert len(gens) == 108 and all(e["ok"] and e["backend"] == "tpm" for e in gens), len(gens)
    assert not [e for e in events if not e["ok"]], [e for e in events if not e["ok"]][:5]
    assert not swtpm.tools("tpm2_getcap", "handles-transient").out.strip()


def test_objects_of_a_killed_process_are_reclaimed(swtpm, tmp):
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm)
    p = subprocess.Popen(["/usr/bin/python3", str(app(tmp)), str(cnf), "hold"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=base_env(), text=True,
                         start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "holding"
    finally:
        kxutil.kill_group(p)  # SIGKILL: nothing flushed
        p.wait(10)
    left = swtpm.tools("tpm2_getcap", "handles-transient").out.split()
    assert len([h for h in left if h.startswith("0x80")]) == 3, f"expected all three slots taken: {left}"
    r = run(["/usr/bin/python3", app(tmp), cnf, "many"], env=base_env(), timeout=max(kxutil.TIMEOUT, 180))
    assert r.rc == 0 and "held 8 bad 0" in r.out and "threads bad 0" in r.out, r
    assert not swtpm.tools("tpm2_getcap", "handles-transient").out.strip()


def test_fork_child_opens_its_own_connection(swtpm, tmp):
    """After fork() the child never uses the parent's TPM connection or objects: a key the
    parent made is refused in the child ("no longer exists"), new keys work there, and the
    parent goes on working after the child exits."""
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm)
    r = run(["/usr/bin/python3", app(tmp), cnf, "fork"], env=base_env(), timeout=max(kxutil.TIMEOUT, 120))
    assert r.rc == 0 and "child ok" in r.out and "parent ok child-status 0" in r.out, r
