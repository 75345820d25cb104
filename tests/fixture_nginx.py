"""nginx (Debian's package) as a test server, with keyx enabled only through OPENSSL_CONF.

`nginx_server(...)` writes a private prefix (conf, pid, logs, temp dirs) in the test's temporary
directory and starts `nginx -p PREFIX -c nginx.conf` in the foreground (`daemon off;`) with
`master_process on; worker_processes 2;`. nginx clears its workers' environment except what
`env` names, so the configuration passes OPENSSL_CONF (and SOFTHSM2_CONF,
DBUS_SESSION_BUS_ADDRESS when set). The master and its workers are killed at teardown. nginx
runs as the test user; as root its workers would switch to `nobody`, so the test then says
`user root;` (the token directory and the audit log are the test user's).

`Pki` is a CA of the default provider alone that certifies a public key it is given
(`openssl x509 -new -force_pubkey`), as an operator certifies a hardware key.
"""

import os
import pwd
import grp
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import kxutil
from kxutil import TIMEOUT, openssl

NGINX = "/usr/sbin/nginx"


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, prefix, cert, key, env, curves="prime256v1:secp384r1", workers=2):
        self.prefix = Path(prefix)
        self.cert, self.key, self.env = cert, key, env
        self.curves, self.workers = curves, workers
        self.proc, self.port = None, None
        self.test_pids = []
        self.conf = self.prefix / "nginx.conf"
        self.error_log = self.prefix / "logs" / "error.log"

    def write_conf(self):
        for d in ("logs", "tmp"):
            (self.prefix / d).mkdir(parents=True, exist_ok=True)
        user = ""
        if os.geteuid() == 0:
            user = f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(0).gr_name};\n"
        passed = "".join(f"env {v};\n" for v in ("OPENSSL_CONF", "SOFTHSM2_CONF", "DBUS_SESSION_BUS_ADDRESS",
                                                  "KEYX_DEBUG", "TSS2_LOG")
                         if v in self.env)
        tmp = self.prefix / "tmp"
        self.conf.write_text(f"""daemon off;
master_process on;
worker_processes {self.workers};
{user}pid {self.prefix}/nginx.pid;
error_log {self.error_log} info;
{passed}events {{ worker_connections 256; }}
http {{
    access_log {self.prefix}/logs/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        # reuseport: one listening socket per worker, so the kernel spreads connections over both
        listen 127.0.0.1:{self.port} ssl reuseport;
        server_name localhost;
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ecdh_curve {self.curves};
        # every handshake a full one: the key share and the certificate signature each time
        ssl_session_cache off;
        ssl_session_tickets off;
        keepalive_timeout 0;
        location / {{ return 200 "keyx nginx\\n"; }}
    }}
}}
""")

    def start(self, attempts=3):
        assert Path(NGINX).exists(), f"{NGINX} not found: install Debian's nginx (scripts/test.sh does)"
        for _ in range(attempts):
            self.port = _free_port()
            self.write_conf()
            self.error_log.write_text("")
            t = kxutil.run([NGINX, "-t", "-p", self.prefix, "-c", self.conf, "-e", self.error_log],
                           env=self.env)
            assert t.rc == 0, f"nginx -t refused the configuration:\n{t!r}\n{self.conf.read_text()}"
            self.test_pids.append(t.pid)  # `nginx -t` loads the certificate key too
            self.proc = subprocess.Popen([NGINX, "-p", str(self.prefix), "-c", str(self.conf), "-e",
                                          str(self.error_log)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                if len(self.worker_pids()) == self.workers and self._listening():
                    return self
                time.sleep(0.05)
            out = self.proc.stdout.read().decode("utf-8", "replace") if self.proc.poll() is not None else ""
            self.stop()
            log = self.error_log.read_text()
            if "in use" in log or "in use" in out:
                continue
            raise AssertionError(f"nginx did not start:\n{out}\n--- error.log ---\n{log}")
        raise AssertionError("nginx: no free port after retries")

    def _listening(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    @property
    def master_pid(self):
        return self.proc.pid

    def worker_pids(self):
        """Pids of the master's children (its workers), from /proc."""
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == self.proc.pid:
                pids.append(int(d.name))
        return sorted(pids)

    def errors(self):
        """error.log lines at level crit/error/emerg/alert, and failed handshakes (which nginx
        logs at info when the client or the handshake itself failed)."""
        return [l for l in self.error_log.read_text().splitlines()
                if re.search(r"\[(emerg|alert|crit|error)\]|SSL_do_handshake\(\) failed", l)]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def nginx_server(tmp_path, build):
    """nginx_server(cert, key, env, curves=...) -> a started Nginx; all killed at teardown."""
    assert shutil.which("curl"), "curl not found: install curl (scripts/test.sh does)"
    started = []

    def start(cert, key, env, **kw):
        srv = Nginx(tmp_path / f"nginx{len(started)}", cert, key, env, **kw)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()


class Pki:
    """A CA made by the default provider alone; certifies given public keys for localhost."""

    def __init__(self, d):
        self.dir = Path(d)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.crt, self.key = self.dir / "ca.crt", self.dir / "ca.key"
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", self.key, "-out", self.crt, "-subj", "/CN=keyx test CA", "-days", "2", *kxutil.CA_EXTENSIONS,
                env=kxutil.base_env()).ok("CA")

    def certify(self, pub_pem, name):
        """A localhost server certificate for the public key in pub_pem (default provider)."""
        crt = self.dir / f"{name}.crt"
        ext = self.dir / "ext.cnf"
        ext.write_text("subjectAltName = DNS:localhost\nbasicConstraints = CA:FALSE\n"
                       "keyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n")
        openssl("x509", "-new", "-force_pubkey", pub_pem, "-CA", self.crt, "-CAkey", self.key,
                "-subj", "/CN=localhost", "-days", "2", "-extfile", ext, "-out", crt,
                env=kxutil.base_env()).ok("certificate for the hardware key")
        return crt

    def software_cert(self, name):
        """A certificate and PEM private key made by the default provider."""
        key = self.dir / f"{name}.key"
        pub = self.dir / f"{name}.pub"
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key,
                env=kxutil.base_env()).ok("software key")
        openssl("pkey", "-in", key, "-pubout", "-out", pub, env=kxutil.base_env()).ok("pubout")
        return self.certify(pub, name), key


@pytest.fixture
def pki(tmp_path, build):
    return Pki(tmp_path / "pki")
