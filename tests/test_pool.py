"""Pools of pre-generated ephemeral keys, `tpm-pool` and `pkcs11-pool`.

A pooled key is made by the backend's refill thread and handed out by the next ephemeral key
generation of its group. Every check drives real swtpm / SoftHSM: the secrets a pooled key
derives equal the default provider's (the peer's side of the same exchange, computed by the
default provider alone), no key is handed out twice (distinct public keys), the audit log shows
one keygen per key handed out, a forked child never gets its parent's pooled keys, a restarted
TPM gets no stale key handed out, and nothing is left in the TPM or on the token afterwards.
"""

import json
import re
import subprocess
import time

import pytest

import kxutil
from conftest import pick_port
from fixture_swtpm import tpm_cnf
from kxutil import base_env, run

# A driver in one process: `keys N GROUP [SLEEP]` makes N keys of GROUP through keyx (the
# application's default library context, keyx preferred), and for each a peer key in the default
# provider; keyx derives with its key and the peer's public key, the default provider with the
# peer's private key and keyx's public key: the two secrets must be equal (compared here, never
# printed). Prints one JSON line per batch: the public keys in hex and the mismatches. Commands
# come on stdin, one per line ("keys ...", "sleep S", "fork" [the child runs the next line and
# exits], "wait" [reads one more stdin line: the test restarts swtpm meanwhile]).
DRIVER = kxutil.LIBCRYPTO_CTYPES + r"""
import json, os, time
from ctypes import create_string_buffer, c_ubyte
ctx_new_name = fn("EVP_PKEY_CTX_new_from_name", c_void_p, c_void_p, c_char_p, c_char_p)
ctx_new_pkey = fn("EVP_PKEY_CTX_new_from_pkey", c_void_p, c_void_p, c_void_p, c_char_p)
ctx_free = fn("EVP_PKEY_CTX_free", None, c_void_p)
keygen_init = fn("EVP_PKEY_keygen_init", c_int, c_void_p)
derive_init = fn("EVP_PKEY_derive_init", c_int, c_void_p)
set_peer = fn("EVP_PKEY_derive_set_peer", c_int, c_void_p, c_void_p)
derive = fn("EVP_PKEY_derive", c_int, c_void_p, c_void_p, POINTER(c_size_t))
enc_pub = fn("EVP_PKEY_get1_encoded_public_key", c_size_t, c_void_p, POINTER(POINTER(c_ubyte)))
crypto_free = fn("CRYPTO_free", None, c_void_p, c_char_p, c_int)
pkey_dup = fn("EVP_PKEY_dup", c_void_p, c_void_p)
set_enc_pub = fn("EVP_PKEY_set1_encoded_public_key", c_int, c_void_p, c_char_p, c_size_t)
ALG = lambda g: "DH" if g.startswith("ffdhe") else ("EC" if g.startswith("P-") else g)

def keygen(group, propq):
    c = ctx_new_name(None, ALG(group).encode(), propq)
    assert c and keygen_init(c) == 1, "keygen init"
    if ALG(group) in ("EC", "DH"):
        assert set_group(c, group.encode()) == 1, "set group"
    k = c_void_p()
    ok = generate(c, byref(k))
    ctx_free(c)
    return k if ok == 1 else None

def secret(mine, peer, propq):
    c = ctx_new_pkey(None, mine, propq)
    n = c_size_t(0)
    ok = c and derive_init(c) == 1 and set_peer(c, peer) == 1 and derive(c, None, byref(n)) == 1
    buf = create_string_buffer(n.value)
    ok = ok and derive(c, buf, byref(n)) == 1
    ctx_free(c)
    return buf.raw[:n.value] if ok else None

def pub_hex(k):
    p = POINTER(c_ubyte)()
    n = enc_pub(k, byref(p))
    h = bytes(p[:n]).hex()
    crypto_free(p, None, 0)
    return h

def keys(n, group):
    pubs, bad, failed = [], 0, 0
    for _ in range(n):
        k = keygen(group, None)                  # keyx (preferred)
        peer = keygen(group, b"provider=default")
        if not k or not peer:
            failed += 1
            print_errors()
            continue
        s1 = secret(k, peer, None)               # keyx: its key, the peer's public key
        # default provider: the peer's private key and keyx's public key, copied into a key of
        # the default provider's own (the hardware key does not export)
        pub = bytes.fromhex(pub_hex(k))
        kpub = pkey_dup(peer)
        s2 = secret(peer, kpub, b"provider=default") if kpub and set_enc_pub(kpub, pub, len(pub)) == 1 else None
        pkey_free(kpub)
        if s1 is None or s2 is None or s1 != s2:
            bad += 1
        pubs.append(pub_hex(k))
        pkey_free(k)
        pkey_free(peer)
    print(json.dumps({"pid": os.getpid(), "group": group, "pubs": pubs, "bad": bad,
                      "failed": failed}), flush=True)

child = False
lines = iter(sys.stdin.readline, "")
for line in lines:
    w = line.split()
    if not w:
        continue
    if w[0] == "keys":
        keys(int(w[1]), w[2])
        if child:
            sys.stdout.flush()
            sys.exit(0)  # exit() as a process does: keyx's teardown runs (flushes its objects)
    elif w[0] == "sleep":
        time.sleep(float(w[1]))
    elif w[0] == "wait":
        print("waiting", flush=True)
        next(lines)
    elif w[0] == "fork":
        pid = os.fork()
        if pid == 0:
            child = True
        else:
            os.waitpid(pid, 0)
print("done", flush=True)
"""


def drive(tmp, env, script, timeout=max(kxutil.TIMEOUT, 300)):
    drv = tmp / "pool_driver.py"
    drv.write_text(DRIVER)
    r = run(["/usr/bin/python3", drv], env={**env, "KEYX_DEBUG": "1"}, input=script, timeout=timeout)
    assert r.rc == 0 and "done" in r.out, f"driver failed:\n{r!r}"
    return [json.loads(l) for l in r.out.splitlines() if l.startswith("{")], r


def pooled(r, backend):
    """How many keys the pool handed out (KEYX_DEBUG trace; the audit log has one keygen per
    key handed out, pooled or not)."""
    return len(re.findall(rf"^keyx: {backend} pool: handed out", r.err, re.M))


def check_batches(batches, r):
    for b in batches:
        assert b["failed"] == 0 and b["bad"] == 0, f"{b['failed']} failed, {b['bad']} secrets differ:\n{r!r}"


def keygens(log, pid, group=None):
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    return [e for e in events if e["pid"] == pid and e["event"] == "keygen" and e["ok"]
            and (group is None or e["group"] == group)]


def tpm_env(tmp, tpm, log, pool):
    return base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", tpm, keyx={"audit-log": log, "tpm-pool": pool}))


def pkcs11_env(softhsm, cnf, log, pool):
    return softhsm.env(OPENSSL_CONF=cnf(keyx={"audit-log": log, "pkcs11-pool": pool,
                                              **softhsm.keyx_settings()}))


# ---- secrets, distinct keys, audit -----------------------------------------------------------

# The sleeps let the refill thread fill the pool, so that most keys are pooled ones.
def batch_script(group, n, rounds=4):
    return "".join(f"keys {n} {group}\nsleep 0.5\n" for _ in range(rounds))


@pytest.mark.parametrize("group", ["P-256", "P-384", "P-521"])
def test_tpm_pooled_keys_derive_the_default_providers_secret(swtpm, tmp, group):
    log = tmp / "audit.jsonl"
    batches, r = drive(tmp, tpm_env(tmp, swtpm, log, 4), batch_script(group, 4))
    check_batches(batches, r)
    pubs = [p for b in batches for p in b["pubs"]]
    assert len(pubs) == 16 and len(set(pubs)) == 16, "a pooled key was handed out twice"
    made = keygens(log, batches[0]["pid"], group)
    assert len(made) == 16 and all(e["backend"] == "tpm" and e["ephemeral"] for e in made), made
    assert {e["key"] for e in made} == {kxutil.key_id(p) for p in pubs}, "keygen events are not the keys handed out"
    assert pooled(r, "tpm") >= 8, f"the pool handed out too few keys:\n{r.err}"
    assert not swtpm.tools("tpm2_getcap", "handles-transient").out.strip(), "TPM objects left behind"


@pytest.mark.parametrize("group", ["P-256", "P-384", "P-521", "ffdhe2048", "ffdhe3072"])
def test_pkcs11_pooled_keys_derive_the_default_providers_secret(softhsm, cnf, tmp, group):
    log = tmp / "audit.jsonl"
    before = softhsm.token_objects("keyx-a")
    batches, r = drive(tmp, pkcs11_env(softhsm, cnf, log, 8), batch_script(group, 8))
    check_batches(batches, r)
    pubs = [p for b in batches for p in b["pubs"]]
    assert len(pubs) == 32 and len(set(pubs)) == 32, "a pooled key was handed out twice"
    made = keygens(log, batches[0]["pid"], group)
    assert len(made) == 32 and all(e["backend"] == "pkcs11" and e["ephemeral"] for e in made), made
    assert {e["key"] for e in made} == {kxutil.key_id(p) for p in pubs}
    assert pooled(r, "pkcs11") >= 16, f"the pool handed out too few keys:\n{r.err}"
    assert softhsm.token_objects("keyx-a") == before, "pooled keys left on the token"


@pytest.mark.parametrize("backend", ["tpm", "pkcs11"])
def test_500_keygens_500_distinct_keys(swtpm, softhsm, cnf, tmp, backend):
    log = tmp / "audit.jsonl"
    env = tpm_env(tmp, swtpm, log, 16) if backend == "tpm" else pkcs11_env(softhsm, cnf, log, 16)
    batches, r = drive(tmp, env, "keys 500 P-256\n", timeout=600)
    check_batches(batches, r)
    pubs = batches[0]["pubs"]
    assert len(pubs) == 500 and len(set(pubs)) == 500, f"{500 - len(set(pubs))} keys handed out twice"
    assert len(keygens(log, batches[0]["pid"])) == 500
    assert pooled(r, backend) >= 1, "no pooled key handed out"
    if backend == "tpm":
        assert not swtpm.tools("tpm2_getcap", "handles-transient").out.strip()


# ---- TLS ---------------------------------------------------------------------------------------

CLIENT = r"""
import socket, ssl, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
ok, errors = 0, []
for i in range(n):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ecdh_curve("prime256v1")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            with ctx.wrap_socket(s, server_hostname="localhost") as t:
                ok += 1
    except Exception as e:
        errors.append(f"{i}: {e!r}")
        if len(errors) > 5:
            break
print("ok", ok)
for e in errors:
    print("error", e)
"""


@pytest.mark.parametrize("backend,pool", [("tpm", 4), ("tpm", 64), ("pkcs11", 8)])
def test_200_handshakes_with_a_pool(swtpm, softhsm, s_server, certs, cnf, tmp, backend, pool):
    n = 200
    log = tmp / "audit.jsonl"
    env = tpm_env(tmp, swtpm, log, pool) if backend == "tpm" else pkcs11_env(softhsm, cnf, log, pool)
    crt, key = certs["rsa"]
    env["KEYX_DEBUG"] = "1"  # traces each key the pool hands out
    srv = s_server(["-naccept", str(n), "-groups", "P-256", "-cert", crt, "-key", key], env)
    script = tmp / "client.py"
    script.write_text(CLIENT)
    r = run(["/usr/bin/python3", script, srv.port, n], env=base_env(), timeout=max(kxutil.TIMEOUT, 300))
    server_out = srv.wait(timeout=60)
    assert r.rc == 0 and f"ok {n}" in r.out, f"handshakes failed:\n{r!r}\n--- s_server ---\n{server_out}"
    errors = kxutil.server_errors(server_out)
    assert "0x902" not in server_out and not errors, server_out
    events = [e for e in kxutil.read_audit(log) if e["pid"] == srv.pid]
    assert not [e for e in events if not e["ok"]], [e for e in events if not e["ok"]][:5]
    for ev in ("keygen", "derive", "free"):
        hits = [e for e in events if e["event"] == ev and e.get("ephemeral")]
        assert len(hits) == n, f"{len(hits)} {ev} events for {n} handshakes"
        assert all(e["backend"] == backend and e["group"] == "P-256" for e in hits), hits[:3]
    assert len({e["key"] for e in events if e["event"] == "keygen"}) == n, "a key share was reused"
    handed = len(re.findall(rf"keyx: {backend} pool: handed out", server_out))
    assert handed >= n // 2, f"only {handed} of {n} key shares came from the pool"
    if backend == "tpm":
        assert not swtpm.tools("tpm2_getcap", "handles-transient").out.strip(), "TPM objects left behind"


# ---- fork, restart ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["tpm", "pkcs11"])
def test_fork_child_never_gets_the_parents_pooled_keys(swtpm, softhsm, cnf, tmp, backend):
    log = tmp / "audit.jsonl"
    env = tpm_env(tmp, swtpm, log, 8) if backend == "tpm" else pkcs11_env(softhsm, cnf, log, 8)
    # the parent fills its pool and forks with the pool full; the child makes 8 keys and exits
    # (it inherited the parent's buffered stdin), the parent, after it, 8 and 8 more
    batches, r = drive(tmp, env, "keys 2 P-256\nsleep 1\nfork\nkeys 8 P-256\nkeys 8 P-256\n")
    check_batches(batches, r)
    parent_pid = batches[0]["pid"]
    child = [b for b in batches if b["pid"] != parent_pid]
    parent = [b for b in batches if b["pid"] == parent_pid]
    assert len(child) == 1 and len(parent) == 3, batches
    pubs_child = set(child[0]["pubs"])
    pubs_parent = {p for b in parent for p in b["pubs"]}
    assert len(pubs_child) == 8 and len(pubs_parent) == 18, batches
    assert not pubs_child & pubs_parent, "the child was handed a key of its parent's pool"
    assert len(keygens(log, child[0]["pid"])) == 8 and len(keygens(log, parent_pid)) == 18
    assert pooled(r, backend) >= 8, f"the pool handed out too few keys:\n{r.err}"
    if backend == "tpm":
        assert not swtpm.tools("tpm2_getcap", "handles-transient").out.strip()


def test_tpm_restart_with_keys_pooled(swtpm_factory, tmp):
    tpm = swtpm_factory()
    log = tmp / "audit.jsonl"
    env = tpm_env(tmp, tpm, log, 8)
    drv = tmp / "pool_driver.py"
    drv.write_text(DRIVER)
    p = subprocess.Popen(["/usr/bin/python3", drv], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        p.stdin.write("keys 3 P-256\nsleep 1.5\nwait\n")
        p.stdin.flush()
        first = json.loads(p.stdout.readline())
        assert p.stdout.readline().strip() == "waiting"
        tpm.restart()  # the pool holds 8 keys of the old TPM
        out, err = p.communicate("go\nkeys 12 P-256\n", timeout=max(kxutil.TIMEOUT, 120))
    finally:
        if p.poll() is None:
            kxutil.kill_group(p)
    after = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    assert p.returncode == 0 and len(after) == 1, f"{out}\n{err}"
    # every key after the restart works and derives the default provider's secret: none of the
    # old TPM's pooled keys was handed out (its derive would fail)
    assert after[0]["failed"] == 0 and after[0]["bad"] == 0, f"{after}\n{err}"
    assert first["bad"] == 0 and first["failed"] == 0
    assert len(set(first["pubs"] + after[0]["pubs"])) == 15
    made = keygens(log, first["pid"])
    assert len(made) == 15, made
    failed = [e for e in kxutil.read_audit(log) if e["pid"] == first["pid"] and not e["ok"]]
    assert not failed, failed
