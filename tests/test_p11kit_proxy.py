"""The default PKCS#11 module: p11-kit's proxy, with SoftHSM2 registered as Debian registers it.

With no `pkcs11-module`, keyx uses p11-kit's proxy module (p11-kit-proxy.so), which serves the
tokens of every module registered with p11-kit, as pkcs11-provider does by default. The tests use
Debian's own registration of SoftHSM2 (/usr/share/p11-kit/modules/softhsm2.module, installed by
the softhsm2 package) and point SOFTHSM2_CONF at a token directory of their own; nothing is
written under /usr or /etc. (p11-kit reads user registrations in ~/.config/pkcs11/modules only
for users other than root, and neither Debian 12's p11-kit 0.24 nor Debian 13's 0.25 is built
with the P11_*_CONFIG_* environment overrides, so the tests, which run as root, rely on the
system's registration; the one test of a user's own registration runs its processes as nobody.)
pkcs11-tool, loading the same proxy, is the independent view of what the proxy serves; every
secret is checked against the default provider, and the TLS client runs on the default provider.
"""

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

import kxutil
from fixture_softhsm import PIN, SPY, SoftHSM
from test_fork import CHILDREN, children_of
from test_stress import TOKEN_EC, TOKEN_RSA, check_counts, sanitizer_env, stress_bin
from test_stress import stress_token  # noqa: F401
from test_tls import check_handshake, check_server_audit

REGISTRATION = Path("/usr/share/p11-kit/modules/softhsm2.module")
URI = "pkcs11:token=keyx-a;object=srv-ecdh;type=private"


def proxy_path():
    r = kxutil.run(["pkg-config", "--variable=proxy_module", "p11-kit-1"]).ok("pkg-config p11-kit-1")
    return Path(r.out.strip())


def check_registration(hsm):
    """SoftHSM is registered with p11-kit, and the proxy shows this test's tokens."""
    assert REGISTRATION.exists(), f"{REGISTRATION} missing: install softhsm2 (Debian registers it with p11-kit)"
    proxy = proxy_path()
    assert proxy.exists(), f"{proxy} missing: install p11-kit-modules"
    r = kxutil.run(["pkcs11-tool", "--module", proxy, "--list-token-slots"], env=hsm.tool_env()).ok("proxy slots")
    labels = re.findall(r"token label\s*:\s*(\S+)", r.out)
    assert {"keyx-a", "keyx-b"} <= set(labels), f"the proxy does not serve the test tokens:\n{r!r}"
    return labels


@pytest.fixture(scope="module")
def hsm(tmp_path_factory, build):
    h = SoftHSM(tmp_path_factory.mktemp("p11kit-softhsm")).setup()
    check_registration(h)
    return h


def settings(hsm, **more):
    """hsm's keyx settings without pkcs11-module (None values drop a key)."""
    s = hsm.keyx_settings()
    del s["pkcs11-module"]
    s.update(more)
    return {k: v for k, v in s.items() if v is not None}


# Generates an EC P-256 key in keyx (provider=keyx) and one in the default provider, derives on
# both sides; prints the provider of the key, both secrets and keyx's public key.
EPHEMERAL = kxutil.LIBCRYPTO_CTYPES + r"""
from ctypes import create_string_buffer, c_ubyte
enc_pub = fn("EVP_PKEY_get1_encoded_public_key", c_size_t, c_void_p, POINTER(POINTER(c_ubyte)))
ctx = LIB_new()
if LIB_load(ctx, sys.argv[1].encode()) != 1:
    print_errors(); sys.exit(2)

def keygen(propq):
    c = CTX_name(ctx, b"EC", propq)
    k = c_void_p()
    ok = c and kg_init(c) == 1 and set_group(c, b"P-256") == 1 and generate(c, byref(k)) == 1
    CTX_free(c)
    return k if ok else None

def secret(mine, peer, propq):
    c = CTX_pkey(ctx, mine, propq)
    n = c_size_t(0)
    ok = c and d_init(c) == 1 and d_peer(c, peer) == 1 and d_derive(c, None, byref(n)) == 1
    buf = create_string_buffer(n.value)
    ok = ok and d_derive(c, buf, byref(n)) == 1
    CTX_free(c)
    return buf.raw[:n.value].hex() if ok else None

k = keygen(b"provider=keyx")
if not k:
    print_errors(); sys.exit(3)
peer = keygen(b"provider=default")
print("provider", prov_name(get_prov(k)).decode())
p = POINTER(c_ubyte)()
n = enc_pub(k, byref(p))
print("pub", bytes(p[:n]).hex())
ossl_free(p, None, 0)
print("keyx", secret(k, peer, b"provider=keyx"))
print("default", secret(peer, public_copy(k), b"provider=default"))
sys.stdout.flush()
if not all((k, peer)): print_errors()
"""


@pytest.mark.parametrize("case", ["no-token", "token-b", "module-is-proxy"])
def test_ephemeral_key_on_a_registered_token(hsm, cnf, tmp, case):
    """No pkcs11-module: an ephemeral P-256 key made on the token through the proxy derives the
    secret the default provider derives from the peer's side. No pkcs11-token: the first
    initialized token (keyx-a); pkcs11-module set to the proxy's own path works the same."""
    log = tmp / "audit.jsonl"
    more = {"no-token": {"pkcs11-token": None}, "token-b": {"pkcs11-token": "pkcs11:token=keyx-b"},
            "module-is-proxy": {"pkcs11-module": proxy_path()}}[case]
    conf = cnf(keyx=settings(hsm, **{"audit-log": log}, **more))
    r = kxutil.run(["python3", "-c", EPHEMERAL, conf], env=hsm.env())
    r.ok("ephemeral keygen and derive")
    out = dict(line.split(" ", 1) for line in r.out.splitlines() if " " in line)
    assert out.get("provider") == "keyx", r
    assert re.fullmatch(r"[0-9a-f]{64}", out.get("keyx", "")), f"keyx derived nothing:\n{r!r}"
    assert out["keyx"] == out.get("default"), f"keyx's secret differs from the default provider's:\n{r!r}"

    events = [e for e in kxutil.read_audit(log) if e["pid"] == r.pid]
    kxutil.check_audit_schema(events)
    kid = kxutil.key_id(out["pub"])
    mine = [e for e in events if e.get("key") == kid and e["event"] in ("keygen", "derive")]
    assert {e["event"] for e in mine} == {"keygen", "derive"}, events
    assert all(e["ok"] and e["backend"] == "pkcs11" and e["ephemeral"] for e in mine), mine
    assert not [e for e in events if not e["ok"]], events


def test_token_key_by_uri(hsm, cnf, tmp):
    """A token key by pkcs11: URI through the proxy: its public key is the one pkcs11-tool reads
    from the token, and it derives the secret the default provider derives from the peer's side
    with that public key."""
    env = hsm.env(OPENSSL_CONF=cnf(keyx=settings(hsm)))
    base = kxutil.base_env()
    peer, peer_pub = tmp / "peer.pem", tmp / "peer.pub"
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", peer, env=base).ok("peer")
    kxutil.openssl("pkey", "-in", peer, "-pubout", "-out", peer_pub, env=base).ok("peer pub")

    tool_der, tool_pem = tmp / "tool.der", tmp / "tool.pem"
    hsm.tool("keyx-a", "--read-object", "--type", "pubkey", "--label", "srv-ecdh", "-o", tool_der).ok("read pub")
    kxutil.openssl("pkey", "-pubin", "-inform", "DER", "-in", tool_der, "-out", tool_pem, env=base).ok("pub pem")
    keyx_pub = kxutil.openssl("pkey", "-in", URI, "-pubout", env=env).ok("keyx pubout").out
    assert keyx_pub == tool_pem.read_text(), "keyx's public key differs from pkcs11-tool's"

    ours, theirs = tmp / "keyx.bin", tmp / "default.bin"
    kxutil.openssl("pkeyutl", "-derive", "-inkey", URI, "-peerkey", peer_pub, "-out", ours, env=env).ok("derive")
    kxutil.openssl("pkeyutl", "-derive", "-inkey", peer, "-peerkey", tool_pem, "-out", theirs, env=base).ok("peer")
    assert len(ours.read_bytes()) == 32 and ours.read_bytes() == theirs.read_bytes()
    # the key loaded twice in one process, one copy freed (keyx-test-derive twice)
    kxutil.derive_twice(cnf(keyx=settings(hsm), name="twice.cnf"), URI, "P-256", hsm.env())


def test_tls_key_shares_on_a_registered_token(hsm, s_server, s_client, certs, cnf, tmp):
    """s_server with no pkcs11-module: TLS 1.3 P-256 key shares made and derived on the token
    through the proxy; the client runs on the default provider."""
    log = tmp / "audit.jsonl"
    env = hsm.env(OPENSSL_CONF=cnf(keyx=settings(hsm, **{"audit-log": log}), groups="auto"))
    crt, key = certs["ec"]
    srv = s_server(["-cert", crt, "-key", key], env)
    cli = s_client(srv.port, ["-tls1_3", "-groups", "P-256"], kxutil.base_env())
    check_handshake(cli, srv.wait(), "TLSv1.3", "P-256")
    check_server_audit(log, srv.pid, "P-256", backend="pkcs11")


def test_wrong_token_names_the_tokens_seen(hsm, cnf, tmp):
    """A pkcs11-token no registered module has: the error names the tokens the proxy showed and
    where modules are registered."""
    seen = check_registration(hsm)
    env = hsm.env(OPENSSL_CONF=cnf(keyx=settings(hsm, **{"pkcs11-token": "pkcs11:token=no-such-token"})))
    r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", env=env)
    text = r.out + r.err
    assert r.rc > 0, f"expected a clean failure:\n{r!r}"
    assert "no token matches pkcs11-token entry 1 (no-such-token" in text, r
    m = re.search(r"tokens present in the modules registered with p11-kit: ([^)]*)\)", text)
    assert m, f"the error does not list the tokens:\n{r!r}"
    assert set(re.findall(r"'([^']*)'", m.group(1))) == set(seen), f"pkcs11-tool saw {seen}:\n{r!r}"
    assert "p11-kit list-modules" in text, r
    assert PIN not in text


def test_failover_past_a_missing_token(hsm, cnf, tmp):
    """A failover set through the proxy: the first token is not there, the second serves."""
    log = tmp / "audit.jsonl"
    conf = cnf(keyx=settings(hsm, **{"audit-log": log,
                                      "pkcs11-token": "pkcs11:token=no-such-token pkcs11:token=keyx-b"}))
    r = kxutil.run(["python3", "-c", EPHEMERAL, conf], env=hsm.env())
    r.ok("ephemeral keygen and derive")
    out = dict(line.split(" ", 1) for line in r.out.splitlines() if " " in line)
    assert out.get("keyx") and out["keyx"] == out.get("default"), r
    events = [e for e in kxutil.read_audit(log) if e["pid"] == r.pid]
    assert [e for e in events if e["event"] == "failover" and "no-such-token" in e.get("error", "")], events
    assert [e for e in events if e["event"] == "keygen" and e["ok"] and e["backend"] == "pkcs11"], events


def test_forked_children_through_the_proxy(stress_token, cnf, tmp):  # noqa: F811
    """A parent with token keys by URI forks 4 children (one after the other, as test_fork does
    on SoftHSM): each child re-initializes the proxy (which initializes SoftHSM again in the
    child), keeps using the inherited token keys, makes keys of its own, and every result is
    checked by the default provider; the parent's ephemeral key is refused in a child."""
    check_registration(stress_token)
    ops = 50
    log = tmp / "audit.jsonl"
    s = settings(stress_token, **{"audit-log": log, "pkcs11-raw-rsa": 1})
    conf = kxutil.write_cnf(tmp / "p11.cnf", keyx=s)
    env = sanitizer_env(stress_token.env())
    if "ASAN_OPTIONS" in env:
        # Leak checking stays off here: the system's registrations bring in OpenSC, which
        # dlcloses libpcsclite (a library with TLS) in C_Finalize, and LeakSanitizer's tracer then
        # crashes on the stale thread-local block at exit ("Tracer caught signal 11"). The same
        # run through the proxy with leak checking on: test_user_registration_and_fork.
        env["ASAN_OPTIONS"] = env["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0")
    r = kxutil.run([stress_bin(), "--config", conf, "--ec-key", TOKEN_EC, "--rsa-key", TOKEN_RSA,
                    "--groups", "P-256", "--ops", ops, "--fork", CHILDREN, "--serial", 1,
                    "--child-shared", "refused"], env=env, timeout=600)
    children = children_of(r)
    assert len(children) == CHILDREN, f"expected {CHILDREN} children:\n{r!r}"
    check_counts(r, ops, prefix="parent-before ")
    for pid, name in children.items():
        check_counts(r, ops, prefix=f"{name} {pid} ")
        assert f"{name} {pid} refused {ops // 5}" in r.out, r
    check_counts(r, ops, prefix="parent-after ")
    assert r.rc == 0, r
    events = kxutil.read_audit(log)
    for pid in [r.pid, *children]:
        mine = [e for e in events if e["pid"] == pid and e["ok"]]
        done = {e["event"] for e in mine if e["event"] in ("keygen", "derive", "decrypt", "sign")}
        assert done == {"keygen", "derive", "decrypt", "sign"}, f"pid {pid}: {sorted(done)}"
        assert {e.get("backend") for e in mine if e["event"] in done} == {"pkcs11"}, f"pid {pid}"


@pytest.mark.parametrize("what", ["text-file", "no-function-list"])
def test_broken_proxy_file_is_a_clear_error(hsm, cnf, tmp, what):
    """pkcs11-module naming a p11-kit-proxy.so that is not the proxy: loaded as the proxy would be
    (dlopen), refused with the reason and what to set, no crash."""
    path = tmp / "p11-kit-proxy.so"
    if what == "text-file":
        path.write_text("not a library\n")
        needle = "install p11-kit's proxy"
    else:  # a real shared library, but no PKCS#11 module
        path.write_bytes(Path("/lib/x86_64-linux-gnu/libz.so.1").read_bytes())
        needle = "it has no C_GetFunctionList"
    env = hsm.env(OPENSSL_CONF=cnf(keyx=settings(hsm, **{"pkcs11-module": path})))
    r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", env=env)
    text = r.out + r.err
    assert r.rc > 0, f"expected a clean failure:\n{r!r}"
    assert f"cannot load PKCS#11 module '{path}': p11-kit proxy: " in text and needle in text, r
    assert "set pkcs11-module" in text, r


NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]


@pytest.fixture
def user_dir():
    """A directory nobody can reach (pytest's own are root's, mode 0700), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="keyx-p11kit-user-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def chown_tree(root, uid):
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.chown(name, uid, uid)


def test_user_registration_and_fork(user_dir):
    """A module a user registers (~/.config/pkcs11/modules through XDG_CONFIG_HOME, read by
    p11-kit for users other than root; `user-config: only` leaves the system's modules out): OpenSC's
    pkcs11-spy in front of SoftHSM, so that every call the proxy makes is logged. A process of
    that user with no pkcs11-module, holding token keys by URI, forks 4 children through the
    proxy: every result is checked by the default provider, and the spy shows one C_Initialize
    in the parent and one in each child (the proxy initializes the module again in the child)."""
    assert shutil.which("setpriv"), "setpriv not found: install util-linux"
    assert SPY.exists(), f"{SPY} not found: install opensc"
    hsm = SoftHSM(user_dir / "softhsm").setup()
    hsm.tool("keyx-a", "--keypairgen", "--key-type", "EC:prime256v1", "--label", "stress-ec",
             "--id", "e1", "--usage-derive", "--usage-sign").ok("EC token key")
    hsm.tool("keyx-a", "--keypairgen", "--key-type", "rsa:2048", "--label", "stress-rsa",
             "--id", "e2", "--usage-decrypt").ok("RSA token key")
    conf_dir = user_dir / "config" / "pkcs11"
    (conf_dir / "modules").mkdir(parents=True)
    (conf_dir / "pkcs11.conf").write_text("user-config: only\n")
    (conf_dir / "modules" / "keyx-spy.module").write_text(f"module: {SPY}\n")
    spy_log, log = user_dir / "spy.log", user_dir / "audit.jsonl"
    ops = 50
    module, stress = kxutil.copies_for_another_user(user_dir / "lib", stress_bin())
    conf = kxutil.write_cnf(user_dir / "p11.cnf", keyx=settings(hsm, **{"audit-log": log, "pkcs11-raw-rsa": 1}),
                            module=module)
    chown_tree(user_dir, NOBODY)
    user = {"HOME": user_dir, "XDG_CONFIG_HOME": user_dir / "config"}

    # pkcs11-tool on the proxy, as that user: the spy's (SoftHSM's) tokens, and only those
    r = kxutil.run([*AS_NOBODY, "pkcs11-tool", "--module", proxy_path(), "--list-token-slots"],
                   env=hsm.env(LD_PRELOAD=None, ASAN_OPTIONS=None, UBSAN_OPTIONS=None,
                               PKCS11SPY=hsm.module, PKCS11SPY_OUTPUT=user_dir / "tool-spy.log", **user))
    r.ok("proxy slots as nobody")
    assert sorted(re.findall(r"token label\s*:\s*(\S+)", r.out)) == ["keyx-a", "keyx-b"], r
    assert "C_GetSlotList" in (user_dir / "tool-spy.log").read_text(), "the proxy did not go through the spy"

    env = kxutil.env_for_another_user(sanitizer_env(hsm.spy_env(spy_log, **user)), user_dir / "lib")
    r = kxutil.run([*AS_NOBODY, stress, "--config", conf, "--ec-key", TOKEN_EC, "--rsa-key", TOKEN_RSA,
                    "--groups", "P-256", "--ops", ops, "--fork", CHILDREN, "--serial", 1,
                    "--child-shared", "refused"], env=env, timeout=600)
    children = children_of(r)
    assert len(children) == CHILDREN, f"expected {CHILDREN} children:\n{r!r}"
    for pid, name in children.items():
        check_counts(r, ops, prefix=f"{name} {pid} ")
        assert f"{name} {pid} refused {ops // 5}" in r.out, r
    check_counts(r, ops, prefix="parent-after ")
    assert r.rc == 0, r
    inits = re.findall(r"^\d+: C_Initialize$", spy_log.read_text(), re.M)
    assert len(inits) == 1 + CHILDREN, f"{len(inits)} C_Initialize calls for 1 parent + {CHILDREN} children"
    events = kxutil.read_audit(log)
    for pid in [r.pid, *children]:
        done = {e["event"] for e in events if e["pid"] == pid and e["ok"] and e.get("backend") == "pkcs11"}
        assert {"keygen", "derive", "decrypt", "sign"} <= done, f"pid {pid}: {sorted(done)}"
