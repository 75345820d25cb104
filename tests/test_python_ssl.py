"""A TLS server written without keyx in mind picks it up through OPENSSL_CONF.

The server is Python's `ssl` module (Debian's /usr/bin/python3 on the system libssl): a plain
accept loop with a software certificate (PEM from the default provider) and OpenSSL's default
groups, no keyx-specific call. Clients are `openssl s_client` with the default provider only.
The audit log shows where the server's ephemeral key shares were made, in the server's pid.

With `backends = tpm` only (swtpm reached directly: one process needs no resource manager), a
client offering only X25519 gets a handshake failure, never a software X25519 key; one that also
offers P-256 gets P-256 from the TPM. `openssl s_server` keeps working on swtpm without abrmd.
"""

import subprocess
import sys
import threading
import time

import pytest

import kxutil
from fixture_swtpm import tpm_cnf
from kxutil import TIMEOUT, base_env

PYTHON = "/usr/bin/python3"  # Debian's, linked to the system OpenSSL 3

SERVER = r"""
import os, socket, ssl, sys
crt, key = sys.argv[1], sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(crt, key)
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(16)
print("READY", os.getpid(), ls.getsockname()[1], ssl.OPENSSL_VERSION, flush=True)
while True:
    c, _ = ls.accept()
    try:
        with ctx.wrap_socket(c, server_side=True) as s:
            print("HANDSHAKE", s.version(), flush=True)
            s.sendall(b"hello from python\n")
            try:
                s.unwrap()  # close_notify, so that the client sees a clean end
            except (ssl.SSLError, OSError):
                pass
    except (ssl.SSLError, OSError) as e:
        print("FAILED", type(e).__name__, e, flush=True)
"""


class PyServer:
    def __init__(self, crt, key, env):
        self.proc = subprocess.Popen([PYTHON, "-c", SERVER, str(crt), str(key)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                     start_new_session=True)
        self.lines = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert self.ready.wait(TIMEOUT), f"python ssl server did not start:\n{self.output}"
        _, pid, port, *version = self.lines[0].split()
        self.pid, self.port, self.version = int(pid), int(port), " ".join(version)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("READY"):
                self.ready.set()
        self.ready.set()

    @property
    def output(self):
        return "".join(self.lines)

    def stop(self):
        kxutil.kill_group(self.proc)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.reader.join(5)


@pytest.fixture
def py_server(build):
    started = []

    def start(crt, key, env):
        srv = PyServer(crt, key, env)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def client(port, *args):
    return kxutil.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                       "-ign_eof", *args], env=base_env(), input="")


def keyx_events(audit, pid):
    events = kxutil.read_audit(audit)
    kxutil.check_audit_schema(events)
    return [e for e in events if e["pid"] == pid]


def test_python_ssl_server_does_ecdhe_on_the_token(softhsm, cnf, tmp, certs, py_server):
    audit = tmp / "audit.jsonl"
    env = softhsm.env(OPENSSL_CONF=cnf(keyx=softhsm.keyx_settings(**{"audit-log": audit}), groups="auto"))
    crt, key = certs["ec"]
    srv = py_server(crt, key, env)
    assert srv.version.startswith("OpenSSL 3."), srv.version
    n = 0
    for tls in ("-tls1_3", "-tls1_2"):
        for _ in range(10):
            r = client(srv.port, tls)
            assert r.rc == 0 and "hello from python" in r.out, f"handshake failed:\n{r!r}\n{srv.output}"
            assert kxutil.temp_key(r.out).startswith("ECDH, prime256v1"), f"not P-256 ECDHE:\n{r!r}"
            n += 1
    mine = keyx_events(audit, srv.pid)
    assert mine, f"no keyx event in the server's pid {srv.pid}"
    assert not [e for e in mine if not e["ok"]], f"failed operations: {mine}"
    keygens = [e for e in mine if e["event"] == "keygen" and e.get("ephemeral")]
    derives = [e for e in mine if e["event"] == "derive" and e.get("ephemeral")]
    assert len(keygens) == n and {(e["backend"], e["group"]) for e in keygens} == {("pkcs11", "P-256")}, keygens
    assert len(derives) == n and {e["backend"] for e in derives} == {"pkcs11"}, derives
    assert {e["key"] for e in keygens} == {e["key"] for e in derives}, "derives with keys not generated here"
    assert not [e for e in mine if e["event"] == "keygen" and e["backend"] == "software"]


def test_tpm_only_x25519_client_gets_no_software_key(swtpm, tmp, certs, py_server):
    audit = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "tpm.cnf", swtpm, keyx={"audit-log": audit}))
    crt, key = certs["ec"]
    srv = py_server(crt, key, env)
    for tls in ("-tls1_3", "-tls1_2"):
        r = client(srv.port, tls, "-groups", "X25519")
        assert r.rc != 0 and "handshake failure" in r.err, f"an X25519-only client got a handshake:\n{r!r}"
    # One that also offers P-256: HelloRetryRequest (TLS 1.3) to P-256, made in the TPM.
    r = client(srv.port, "-tls1_3", "-groups", "X25519:P-256")
    assert r.rc == 0 and kxutil.temp_key(r.out).startswith("ECDH, prime256v1"), f"no P-256:\n{r!r}\n{srv.output}"
    time.sleep(0.2)
    mine = keyx_events(audit, srv.pid)
    keygens = [e for e in mine if e["event"] == "keygen"]
    assert [(e["backend"], e["group"], e["ok"]) for e in keygens] == [("tpm", "P-256", True)], (
        f"key generation other than one P-256 key in the TPM: {keygens}")
    # (the certificate key is a software key: its load and sign events are expected)
    assert not [e for e in mine if e.get("backend") == "software" and e["event"] in ("keygen", "derive")], (
        f"software key exchange: {mine}")
    assert "FAILED" in srv.output and srv.output.count("HANDSHAKE") == 1, srv.output


def test_s_server_on_the_tpm_without_a_resource_manager(swtpm, tmp, certs, s_server, s_client):
    """One process reaches swtpm directly (TCTI swtpm:), as before abrmd existed in the tests."""
    audit = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "tpm.cnf", swtpm, keyx={"audit-log": audit}))
    assert "tabrmd" not in swtpm.tcti
    crt, key = certs["ec"]
    for tls in ("-tls1_3", "-tls1_2"):
        srv = s_server(["-cert", crt, "-key", key, "-groups", "P-256"], env)
        r = s_client(srv.port, [tls, "-groups", "P-256"], base_env())
        srv.wait()
        assert r.rc == 0 and kxutil.temp_key(r.out).startswith("ECDH, prime256v1"), f"handshake:\n{r!r}"
        mine = keyx_events(audit, srv.pid)
        got = {(e["event"], e.get("backend")) for e in mine if e["event"] in ("keygen", "derive")}
        assert got == {("keygen", "tpm"), ("derive", "tpm")} and all(e["ok"] for e in mine), mine
