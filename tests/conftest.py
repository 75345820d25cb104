"""Fixtures of the keyx test suite. See kxutil.py for the helpers they share.

The build under test is $KEYX_BUILD_DIR (default build/): scripts/test.sh builds it and sets it.
Nothing here skips: a missing build, helper or vector file fails the tests that need it.
"""

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import kxutil
from kxutil import TIMEOUT, base_env, kill_group, openssl, run

# Fixtures that start real devices live in their own modules: a swtpm per test session
# (fixture_swtpm.py) and SoftHSM2 tokens in temporary directories (fixture_softhsm.py).
pytest_plugins = ["fixture_swtpm", "fixture_softhsm"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "valgrind: runs openssl under valgrind memcheck (plain build only; CI's ASan "
        "stage deselects it with -m 'not valgrind')")
    config.addinivalue_line(
        "markers", "package: builds keyx's Debian package and installs it in a clean Debian root "
        "(independent of the build under test: CI's sanitizer stages deselect it)")


def pytest_report_header(config):
    pre = kxutil.sanitizer_preload()
    return [
        f"keyx build dir: {kxutil.build_dir()}",
        f"keyx sanitizer preload: {pre or 'none'}",
        f"openssl: {subprocess.run(['openssl', 'version'], capture_output=True, text=True).stdout.strip()}",
    ]


@pytest.fixture(scope="session")
def build():
    """The build directory; fails (never skips) when keyx.so or the test helpers are missing."""
    d = kxutil.build_dir()
    assert kxutil.module_path().is_file(), (
        f"{kxutil.module_path()} not found: build first (bash scripts/test.sh, or "
        f"cmake -S . -B build && cmake --build build) or set KEYX_BUILD_DIR"
    )
    assert kxutil.derive_bin().is_file(), f"{kxutil.derive_bin()} not found (tests/CMakeLists.txt)"
    return d


@pytest.fixture(scope="session")
def module_dir(build):
    """Directory holding keyx.so, for OPENSSL_MODULES / -provider-path / --module."""
    return build


@pytest.fixture(scope="session")
def module_path(build):
    return kxutil.module_path()


@pytest.fixture(scope="session", autouse=True)
def _session_tmp(tmp_path_factory):
    os.environ["KEYX_TEST_TMP"] = str(tmp_path_factory.mktemp("session"))
    kxutil.neutral_cnf.cache_clear()
    yield


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


@pytest.fixture
def cnf(tmp, build):
    """cnf(keyx={...}, prefer=True, name="openssl.cnf", ...) writes an openssl.cnf in tmp."""

    def make(keyx=None, name="openssl.cnf", **kw):
        return kxutil.write_cnf(tmp / name, keyx=keyx, **kw)

    return make


@pytest.fixture
def free_port():
    return pick_port()


def pick_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def certs(tmp_path_factory, build):
    """Server credentials made by the default provider alone: an RSA and an ECDSA P-256 cert,
    and ffdhe2048 parameters for TLS 1.2 DHE."""
    d = tmp_path_factory.mktemp("certs")
    env = base_env()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "rsa.key",
            "-out", d / "rsa.crt", "-subj", "/CN=localhost", "-days", "2", *kxutil.CA_EXTENSIONS,
            env=env).ok("RSA cert")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", d / "ec.key", "-out", d / "ec.crt", "-subj", "/CN=localhost", "-days", "2",
            *kxutil.CA_EXTENSIONS, env=env).ok("EC cert")
    openssl("genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "group:ffdhe2048",
            "-out", d / "ffdhe2048.pem", env=env).ok("ffdhe2048 params")
    return {
        "rsa": (d / "rsa.crt", d / "rsa.key"),
        "ec": (d / "ec.crt", d / "ec.key"),
        "dhparam": d / "ffdhe2048.pem",
    }


class Server:
    """An `openssl s_server` on 127.0.0.1 serving one connection (-naccept 1)."""

    def __init__(self, args, env):
        self.args, self.env = args, env
        self.proc, self.port = None, None
        self.lines, self._accepting = [], threading.Event()
        self._reader = None

    def start(self, attempts=3):
        for _ in range(attempts):
            self.port = pick_port()
            cmd = ["openssl", "s_server", "-accept", f"127.0.0.1:{self.port}", "-naccept", "1",
                   *map(str, self.args)]
            self.cmd = cmd
            self.lines, self._accepting = [], threading.Event()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, env=self.env, text=True,
                                         errors="replace", start_new_session=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._accepting.wait(0.05):
                    return self
            if self.proc.poll() is None:
                self.stop()
                raise AssertionError(f"s_server not accepting after {TIMEOUT}s:\n{self.output}")
            self._reader.join(5)
            if "in use" not in self.output:
                break
        raise AssertionError(f"s_server exited before accepting (rc {self.proc.returncode}):\n"
                             f"$ {' '.join(self.cmd)}\n{self.output}")

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("ACCEPT"):
                self._accepting.set()

    @property
    def output(self):
        return "".join(self.lines)

    @property
    def pid(self):
        return self.proc.pid

    def wait(self, timeout=TIMEOUT):
        """Waits for the server to exit after its one connection; its output."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"s_server did not exit after its connection:\n{self.output}")
        self._reader.join(5)
        for m in kxutil.SANITIZER_MARKERS:
            assert m not in self.output, f"sanitizer report in s_server:\n{self.output}"
        return self.output

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self._reader is not None:
            self._reader.join(5)


@pytest.fixture
def s_server(build):
    """s_server(args, env) -> a started Server; every server is killed at teardown."""
    servers = []

    def start(args, env):
        srv = Server(args, env)
        servers.append(srv)
        return srv.start()

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
def s_client(build):
    """s_client(port, args, env) -> Result of a client that handshakes and closes (stdin EOF)."""

    def connect(port, args, env, timeout=TIMEOUT):
        return run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                    "-servername", "localhost", *args], env=env, input="", timeout=timeout)

    return connect


@pytest.fixture
def vectors_dir():
    d = kxutil.VECTORS
    assert d.is_dir(), f"Wycheproof vectors not found at {d} (they are part of the repository: tests/vectors/)"
    return d


@pytest.fixture(scope="session")
def go_client(build):
    """tests/helpers/tls_client.go (crypto/tls in its default settings), built with Debian's Go
    (golang-go) into the build directory; fails when go is missing."""
    src = kxutil.REPO / "tests" / "helpers" / "tls_client.go"
    go = shutil.which("go")
    assert go, "go not found: install golang-go (scripts/test.sh does)"
    out = build / "tests" / "keyx-go-tls-client"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        env = kxutil.plain_client_env(GOCACHE=build / "go-cache", GOPATH=build / "go-path", GOTOOLCHAIN="local",
                                      GOPROXY="off", GOFLAGS="-mod=mod", CGO_ENABLED="0")
        run([go, "build", "-o", out, src], env=env, timeout=600).ok("go build")
    return out
