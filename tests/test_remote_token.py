"""A token behind p11-kit's RPC, as a network HSM is reached: `p11-kit server` exports a SoftHSM2
token on a unix socket in the test's directory, and keyx's `pkcs11-module` is p11-kit's client
module (`p11-kit-client.so`, the server's address in P11_KIT_SERVER_ADDRESS). keyx is unchanged.

- p11-kit 0.25 (Debian 13, OpenSSL 3.5 stage): static ECDH by URI (the secret equals the default
  provider's), TLS 1.3 ECDHE with the key shares made and used on the remote token, OAEP
  unwrapping (SHA-1, what SoftHSM does natively) and ECDSA / RSA-PSS signatures with the remote
  token's keys, each cross-checked by the default provider.
- p11-kit 0.24 (Debian 12): its RPC client does not carry CKM_ECDH1_DERIVE; keyx refuses ECDH on
  the remote token with an error that says so and never derives in software. OAEP and signatures
  work.
- A server killed under load never takes the application down: keyx keeps SIGPIPE away from the
  process around its Cryptoki calls (the RPC client writes to a dead socket), the failing call
  reports the token's error, and the process lives on with its signal dispositions unchanged.
- A server killed and started again on the same socket is used again by the same process (keyx
  re-initializes the module); a server stopped with SIGSTOP costs a signature at most
  `pkcs11-timeout`, says so, and signing resumes after SIGCONT.
Each test starts its own server processes and stops them by pid.
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import kxutil
from fixture_softhsm import MODULE, SoftHSM
from kxutil import base_env, openssl

TOKEN = "keyx-remote"
CLIENT = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")


def p11kit_version():
    """The version of p11-kit's client module (Debian package p11-kit-modules)."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "p11-kit-modules"], capture_output=True, text=True,
                         timeout=30).stdout
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", out)
    assert m, f"cannot read p11-kit-modules' version from {out!r} (install p11-kit-modules)"
    return tuple(int(x) for x in m.groups())


# p11-kit's RPC forwards CKM_ECDH1_DERIVE's parameters from 0.25.0 on (client and server).
REMOTE_ECDH = p11kit_version() >= (0, 25, 0)


class RemoteToken(SoftHSM):
    """A token of its own (keyx-remote) with a P-256 derive key, an RSA-2048 decrypt/sign key and
    a P-256 sign key made by pkcs11-tool, and `p11-kit server` processes exporting it."""

    def setup(self):
        self.init_tokens(TOKEN)
        for args in (("EC:prime256v1", "ecdh", "01", "--usage-derive"),
                     ("rsa:2048", "rsa", "02", "--usage-decrypt", "--usage-sign"),
                     ("EC:prime256v1", "ecdsa", "03", "--usage-sign")):
            self.tool(TOKEN, "--keypairgen", "--key-type", args[0], "--label", args[1], "--id", args[2],
                      *args[3:]).ok(f"key {args[1]}")
        return self

    def serve(self, name="a", token=TOKEN):
        """Starts `p11-kit server` for `token` in the foreground on <root>/<name>.sock; returns the
        Popen."""
        sock = self.root / f"{name}.sock"
        if sock.exists():
            sock.unlink()
        p = subprocess.Popen(["p11-kit", "server", "-f", "--provider", str(MODULE), "-n", str(sock),
                              f"pkcs11:token={token}"], env=self.tool_env(), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert p.poll() is None, f"p11-kit server exited: {p.stderr.read().decode()}"
            assert time.monotonic() < deadline, "p11-kit server made no socket in 10 s"
            time.sleep(0.02)
        self.sock = sock
        return p

    def client_env(self, tmp, log, backends="pkcs11", settings=None, **kw):
        """keyx preferred, its pkcs11 backend on p11-kit's client module, this server's address;
        settings: more keyx settings."""
        cnf = kxutil.write_cnf(tmp / "keyx.cnf", keyx={
            **self.keyx_settings(tokens=(TOKEN,), backends=backends), "pkcs11-module": CLIENT,
            "audit-log": log, **(settings or {})}, **kw)
        return kxutil.base_env(OPENSSL_CONF=cnf, P11_KIT_SERVER_ADDRESS=f"unix:path={self.sock}")


def stop(p):
    """Stops a server and every p11-kit-remote it forked (its session)."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=10)


@pytest.fixture(scope="module")
def remote(tmp_path_factory, build):
    assert CLIENT.exists(), f"{CLIENT} not found: install p11-kit-modules"
    return RemoteToken(tmp_path_factory.mktemp("remote-token")).setup()


@pytest.fixture
def server(remote):
    p = remote.serve()
    yield p
    stop(p)


def uri(label, kind="private"):
    return f"pkcs11:token={TOKEN};object={label};type={kind}"


def events(log, event):
    evs = kxutil.read_audit(log)
    kxutil.check_audit_schema(evs)
    return [e for e in evs if e["event"] == event]


def peer(tmp):
    key, pub = tmp / "peer.pem", tmp / "peer.pub"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", key, env=base_env()).ok("peer")
    openssl("pkey", "-in", key, "-pubout", "-out", pub, env=base_env()).ok("peer pub")
    return key, pub


def test_static_ecdh_by_uri(remote, server, tmp):
    log = tmp / "audit.jsonl"
    env = remote.client_env(tmp, log)
    key, pub = peer(tmp)
    tokpub = tmp / "tok.pub"
    openssl("pkey", "-in", uri("ecdh"), "-pubout", "-out", tokpub, env=env).ok("remote public key")
    r = openssl("pkeyutl", "-derive", "-inkey", uri("ecdh"), "-peerkey", pub, "-out", tmp / "ours.bin", env=env)
    if not REMOTE_ECDH:
        # p11-kit 0.24's RPC client refuses the mechanism itself: keyx says so, nothing in software
        assert r.rc != 0 and "through p11-kit's RPC client older than 0.25" in r.err, r
        assert "reports Cryptoki 2.40" in r.err and "CKM_ECDH1_DERIVE" in r.err, r
        assert not [e for e in events(log, "derive") if e["ok"]]
        return
    assert r.rc == 0, r
    openssl("pkeyutl", "-derive", "-inkey", key, "-peerkey", tokpub, "-out", tmp / "theirs.bin",
            env=base_env()).ok("default provider")
    assert (tmp / "ours.bin").read_bytes() == (tmp / "theirs.bin").read_bytes()
    assert [(e["backend"], e["ok"]) for e in events(log, "derive")] == [("pkcs11", True)]


def test_tls_ecdhe_on_the_remote_token(remote, server, s_server, s_client, certs, tmp):
    if not REMOTE_ECDH:
        pytest.skip("p11-kit 0.24 (Debian 12) carries no ECDH: test_static_ecdh_by_uri checks the refusal")
    log = tmp / "audit.jsonl"
    env = remote.client_env(tmp, log, groups="auto")
    crt, key = certs["ec"]
    srv = s_server(["-cert", crt, "-key", key], env)
    cli = s_client(srv.port, ["-tls1_3", "-groups", "P-256"], kxutil.plain_client_env())
    out = srv.wait()
    assert cli.rc == 0 and "prime256v1" in kxutil.temp_key(cli.out), f"{cli!r}\n{out}"
    for event in ("keygen", "derive"):
        assert [(e["backend"], e["ok"]) for e in events(log, event)] == [("pkcs11", True)], event


def test_oaep_unwrap_and_signatures(remote, server, tmp):
    """RSA-OAEP (SHA-1, SoftHSM's own) decryption and ECDSA / RSA-PSS signatures with the remote
    token's keys, checked by the default provider with the public keys keyx reads."""
    log = tmp / "audit.jsonl"
    env = remote.client_env(tmp, log)
    plain = base_env()
    rsapub, ecpub = tmp / "rsa.pub", tmp / "ec.pub"
    openssl("pkey", "-in", uri("rsa"), "-pubout", "-out", rsapub, env=env).ok("RSA public key")
    openssl("pkey", "-in", uri("ecdsa"), "-pubout", "-out", ecpub, env=env).ok("EC public key")
    secret, wrapped = tmp / "key.bin", tmp / "key.wrapped"
    secret.write_bytes(os.urandom(32))
    openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", rsapub, "-in", secret, "-out", wrapped, "-pkeyopt",
            "rsa_padding_mode:oaep", env=plain).ok("wrap")
    r = openssl("pkeyutl", "-decrypt", "-inkey", uri("rsa"), "-in", wrapped, "-pkeyopt", "rsa_padding_mode:oaep",
                env=env, text=False)
    assert r.rc == 0 and r.out == secret.read_bytes(), r
    msg = tmp / "msg"
    msg.write_bytes(b"signed on a remote token")
    for key, pub, opts in ((uri("ecdsa"), ecpub, ()),
                           (uri("rsa"), rsapub, ("-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"))):
        openssl("dgst", "-sha256", "-sign", key, *opts, "-out", tmp / "sig", msg, env=env).ok("sign")
        openssl("dgst", "-sha256", "-verify", pub, *opts, "-signature", tmp / "sig", msg, env=plain).ok("verify")
    assert [(e["backend"], e["ok"]) for e in events(log, "decrypt")] == [("pkcs11", True)]
    assert [(e["backend"], e["ok"]) for e in events(log, "sign")] == [("pkcs11", True)] * 2


# An application that signs with a token key by URI every 20 ms and reports each result ("ok|fail
# I MS": MS the signature's milliseconds), with SIGPIPE at its default disposition (a C program's;
# Python itself ignores SIGPIPE): the process dies if a SIGPIPE reaches it. It prints its SIGPIPE
# disposition when it ends.
SIGNER = kxutil.LIBCRYPTO_CTYPES + r"""
import signal, time
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
store_open = fn("OSSL_STORE_open", c_void_p, c_char_p, c_void_p, c_void_p, c_void_p, c_void_p)
store_load = fn("OSSL_STORE_load", c_void_p, c_void_p)
info_pkey = fn("OSSL_STORE_INFO_get1_PKEY", c_void_p, c_void_p)
sign_init = fn("EVP_PKEY_sign_init", c_int, c_void_p)
sign = fn("EVP_PKEY_sign", c_int, c_void_p, c_char_p, POINTER(c_size_t), c_char_p, c_size_t)
err_clear = fn("ERR_clear_error", None)
set_md = fn("EVP_PKEY_CTX_set_signature_md", c_int, c_void_p, c_void_p)
sha256 = fn("EVP_get_digestbyname", c_void_p, c_char_p)(b"SHA256")
st = store_open(sys.argv[1].encode(), None, None, None, None)
key = st and info_pkey(store_load(st))
if not key:
    print_errors(); sys.exit(1)
dgst = b"" * 32
for i in range(int(sys.argv[2])):
    t0 = time.monotonic()
    ctx = CTX_pkey(None, key, None)
    sig = ctypes.create_string_buffer(128); n = c_size_t(128)
    ok = ctx and sign_init(ctx) == 1 and set_md(ctx, sha256) == 1 and sign(ctx, sig, byref(n), dgst, 32) == 1
    CTX_free(ctx)
    print(("ok" if ok else "fail"), i, int((time.monotonic() - t0) * 1000), flush=True)
    if not ok:
        print_errors()
    err_clear()
    time.sleep(0.02)
print("sigpipe", "default" if signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL else "changed", flush=True)
"""


class Signer:
    """SIGNER making n signatures with the remote ECDSA key in env; its stderr goes to a file (a
    pipe nobody reads while it signs would fill up and stop it). lines() yields its results as
    they come; finish() waits for its end and gives (all stdout, stderr)."""

    def __init__(self, env, tmp, n):
        self.err_path = tmp / "app.err"
        self.errf = open(self.err_path, "w")
        self.app = subprocess.Popen(["/usr/bin/python3", "-c", SIGNER, uri("ecdsa"), str(n)], env=env,
                                    stdout=subprocess.PIPE, stderr=self.errf, text=True)
        self.seen = []

    @property
    def rc(self):
        return self.app.returncode

    def lines(self):
        for line in self.app.stdout:
            self.seen.append(line)
            yield line

    def finish(self, timeout):
        out = self.app.communicate(timeout=timeout)[0]
        return "".join(self.seen) + out, self.err_path.read_text()

    def kill(self):
        if self.app.poll() is None:
            self.app.kill()
            self.app.wait(timeout=10)
        self.errf.close()


def test_killed_server_never_kills_the_application(remote, tmp):
    """Under load, the server and its per-connection backend are killed: the application's next
    token calls fail (the RPC client writes to a dead socket: SIGPIPE, kept away by keyx), and the
    application runs to its end with SIGPIPE still at its default disposition."""
    p = remote.serve("kill")
    log = tmp / "audit.jsonl"
    env = remote.client_env(tmp, log)
    signer = Signer(env, tmp, 150)
    try:
        for line in signer.lines():
            if line.split()[:2] == ["ok", "20"]:
                break
        stop(p)
        out, err = signer.finish(60)
    finally:
        signer.kill()
        stop(p)
    assert signer.rc == 0, f"the application died (rc {signer.rc}, -13 is SIGPIPE):\n{out}\n{err}"
    assert "ok 20 " in out and "fail 149 " in out and "sigpipe default" in out, out
    assert "pkcs11" in err, err
    assert not [e for e in events(log, "sign") if e["ok"] and e.get("backend") != "pkcs11"]


def results(out):
    """[(ok, index, ms)] of the signer's lines."""
    return [(w[0] == "ok", int(w[1]), int(w[2])) for w in (line.split() for line in out.splitlines())
            if len(w) == 3 and w[0] in ("ok", "fail")]


def test_restarted_server_is_used_again(remote, tmp):
    """The server is killed while the application signs, then started again on the same socket:
    keyx re-initializes the module (p11-kit's client never reconnects by itself) and the same
    process signs on the remote token again, without a restart."""
    p = remote.serve("restart")
    log = tmp / "audit.jsonl"
    env = remote.client_env(tmp, log)
    signer = Signer(env, tmp, 200)
    try:
        killed, restarted = False, False
        for line in signer.lines():
            if line.split()[:2] == ["ok", "20"]:
                stop(p)
                killed = True
            if killed and not restarted and line.startswith("fail"):
                p = remote.serve("restart")
                restarted = True
        out, err = signer.finish(60)
    finally:
        signer.kill()
        stop(p)
    r = results(out)
    assert signer.rc == 0 and len(r) == 200, f"rc {signer.rc}:\n{r}\n{err}"
    fails = [i for ok, i, _ in r if not ok]
    # down from the kill until the module is initialized again (at most once a second): then
    # every signature succeeds on the restarted server
    assert fails and fails[0] > 20 and len(fails) < 100, r
    assert all(ok for ok, i, _ in r if i > fails[-1]) and fails[-1] < 150, r
    assert "token or device unreachable" in err, err


def test_hung_server_costs_at_most_the_timeout(remote, tmp):
    """The server and its backend are stopped (SIGSTOP) while the application signs: the call
    waiting for the answer fails after pkcs11-timeout with an error that says so, no signature
    takes much longer than that, and once the server continues (SIGCONT) the same process signs
    again."""
    p = remote.serve("hung")
    log = tmp / "audit.jsonl"
    env = remote.client_env(tmp, log, settings={"pkcs11-timeout": "1000"})
    signer = Signer(env, tmp, 150)
    try:
        stopped_at = None
        for line in signer.lines():
            if line.split()[:2] == ["ok", "20"]:
                os.killpg(p.pid, signal.SIGSTOP)
                stopped_at = time.monotonic()
            if stopped_at and time.monotonic() - stopped_at > 4:
                os.killpg(p.pid, signal.SIGCONT)
                stopped_at = None
        out, err = signer.finish(120)
    finally:
        signer.kill()
        os.killpg(p.pid, signal.SIGCONT)
        stop(p)
    r = results(out)
    assert signer.rc == 0 and len(r) == 150, f"rc {signer.rc}:\n{r}\n{err}"
    fails = [(i, ms) for ok, i, ms in r if not ok]
    assert fails, r
    # a signature waits at most one pkcs11-timeout (for its own answer, or for the module's
    # re-initialization that reconnects), with room for a loaded machine
    assert max(ms for _, _, ms in r) < 2000, ([x for x in r if x[2] > 100], err)
    assert all(ok for ok, i, _ in r if i > fails[-1][0]) and fails[-1][0] < 140, r
    assert "no answer within 1000 ms (pkcs11-timeout)" in err, err
    failover = [e for e in events(log, "failover")]
    assert failover and "no answer within 1000 ms (pkcs11-timeout)" in failover[0]["error"], failover
