"""swtpm fixtures: a real TPM 2.0 simulator on 127.0.0.1 for the tpm backend tests.

`swtpm` (session scope) is one swtpm shared by the whole test session; `swtpm_factory` starts
private ones for tests that kill and restart their TPM. Both fail (never skip) when swtpm is not
installed. swtpm serves one connection at a time and has three transient object slots, with no
resource manager in front: exactly the conditions keyx's tpm backend must cope with.
"""

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import kxutil
from kxutil import TIMEOUT, run


def _free_port_pair():
    """A port P with P and P+1 both free (swtpm's TCTI expects the control port at P+1).

    Taken below the kernel's ephemeral range: swtpm's TCTI opens one connection per command, so
    a suite run leaves thousands of client ports in TIME_WAIT, and a pair picked among them (a
    second run right after the first, as CI does) would often be taken."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    lo, hi = 10000, max(10002, min(low, 32768)) - 2
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(lo, hi)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s1, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s2:
                s1.bind(("127.0.0.1", port))
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two consecutive free TCP ports on 127.0.0.1 for swtpm")


class Swtpm:
    """One swtpm process with its state directory; kill() and start() keep state and ports."""

    def __init__(self, state_dir):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port_pair()
        self.proc = None
        self.log = self.dir / "swtpm.log"

    @property
    def tcti(self):
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def env(self, **extra):
        """Environment for tpm2-tools commands talking to this swtpm. They are the independent
        side and not instrumented: no sanitizer preload (tpm2-tools hang under libasan)."""
        return kxutil.base_env(TPM2TOOLS_TCTI=self.tcti, LD_PRELOAD=None, ASAN_OPTIONS=None,
                               UBSAN_OPTIONS=None, **extra)

    def start(self):
        exe = shutil.which("swtpm")
        assert exe, "swtpm is not installed (Debian packages swtpm swtpm-tools): the tpm tests need it"
        cmd = [exe, "socket", "--tpm2", "--tpmstate", f"dir={self.dir}",
               "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
               "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
               "--flags", "not-need-init,startup-clear", "--log", f"file={self.log}"]
        deadline = time.monotonic() + TIMEOUT
        while True:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, start_new_session=True)
            # Ready when the control port accepts (the TPM port is left alone: swtpm serves
            # one connection there at a time).
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port + 1), timeout=1):
                        return self
                except OSError:
                    time.sleep(0.05)
            err = self.proc.stderr.read().decode("utf-8", "replace") if self.proc.poll() is not None else ""
            self.kill()
            if "in use" in err.lower() and time.monotonic() < deadline:
                time.sleep(0.2)  # the old instance's port lingers a moment after a kill
                continue
            raise AssertionError(f"swtpm did not start on port {self.port}:\n$ {' '.join(cmd)}\n{err}")

    def kill(self):
        """SIGKILL: the TPM vanishes mid-conversation, as a crashed or rebooted device would."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.proc = None

    def restart(self):
        self.kill()
        return self.start()

    def tools(self, *args, check=True, timeout=TIMEOUT):
        """Runs a tpm2-tools command against this swtpm."""
        r = run(list(args), env=self.env(), timeout=timeout)
        if check:
            r.ok(" ".join(map(str, args)))
        return r

    def flush_transient(self):
        """tpm2-tools leave objects loaded; swtpm has three slots and nothing flushes them."""
        self.tools("tpm2_flushcontext", "-t")
        self.tools("tpm2_flushcontext", "-l")


def tpm_cnf(path, tpm, keyx=None, **kw):
    """openssl.cnf with keyx preferred and backends = tpm on the given swtpm (keyx options
    override or add to these; a value None drops the key), with the TLS `Groups` line for those
    backends as docs/tls-servers.md has operators write it (groups=None: without)."""
    kw.setdefault("groups", "auto")
    opts = {"backends": "tpm"}
    if tpm is not None:
        opts["tpm-tcti"] = tpm.tcti
    opts.update(keyx or {})
    opts = {k: v for k, v in opts.items() if v is not None}
    return kxutil.write_cnf(path, keyx=opts, **kw)


def tpm_derive_cmd(config, backend="tpm"):
    """keyx-test-derive loading keyx by config, importing private keys into backend."""
    return [kxutil.derive_bin(), "--config", config, "--backend", backend]


def tpm_derive(vectors, config, env=None, timeout=max(TIMEOUT, 300)):
    """Like kxutil.derive, with every private key moved into the TPM (TPM2_LoadExternal)."""
    text = "".join(" ".join(str(f) if str(f) else "-" for f in v) + "\n" for v in vectors)
    r = run(tpm_derive_cmd(config), input=text, env=env, timeout=timeout)
    assert r.rc == 0, f"driver failed:\n{r!r}"
    got = {}
    for line in r.out.splitlines():
        vid = line.split(" ", 1)[0]
        assert vid not in got, f"vector {vid} answered twice:\n{r!r}"
        got[vid] = kxutil.Outcome(vid, line)
    missing = [str(v[0]) for v in vectors if str(v[0]) not in got]
    assert not missing, f"driver did not answer {len(missing)} vectors ({missing[:5]}...):\n{r!r}"
    return got, r


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory):
    """The session's swtpm (started once, killed at the end of the session)."""
    tpm = Swtpm(tmp_path_factory.mktemp("swtpm")).start()
    yield tpm
    tpm.kill()


@pytest.fixture
def swtpm_factory(tmp_path):
    """swtpm_factory() -> a new private Swtpm, killed at teardown (for kill/restart tests)."""
    made = []

    def make():
        tpm = Swtpm(tmp_path / f"swtpm{len(made)}")
        made.append(tpm)
        return tpm.start()

    yield make
    for tpm in made:
        tpm.kill()
