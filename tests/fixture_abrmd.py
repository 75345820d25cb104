"""tpm2-abrmd in front of a private swtpm, on a private D-Bus session bus.

Several processes (nginx's workers) can share one TPM only through a resource manager: the
kernel's /dev/tpmrm0 on real hosts, tpm2-abrmd here. `abrmd` (per test) starts its own swtpm, a
dbus-daemon listening in a temporary directory (never the user's or the system's bus) and
tpm2-abrmd with a bus name of its own on that bus; clients reach it with the TCTI
`tabrmd:bus_name=...,bus_type=session` and DBUS_SESSION_BUS_ADDRESS. Every daemon is killed at
teardown. Missing swtpm, dbus-daemon or tpm2-abrmd fails the test (scripts/test.sh installs them).
"""

import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

import kxutil
from fixture_swtpm import Swtpm
from kxutil import TIMEOUT

TABRMD_TCTI_LIB = "libtss2-tcti-tabrmd.so.0"


def _kill(proc):
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


class Abrmd:
    """swtpm + private dbus-daemon + tpm2-abrmd; tcti and env() for clients."""

    def __init__(self, root, max_transients=64):
        self.dir = root
        self.max_transients = max_transients  # tpm2-abrmd's limit of loaded objects per client
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tpm = Swtpm(self.dir / "swtpm")
        self.bus_name = f"com.intel.tss2.Tabrmd.keyx{uuid.uuid4().hex[:12]}"
        self.dbus = self.abrmd = None
        self.bus_address = None
        self.log = self.dir / "abrmd.log"

    @property
    def tcti(self):
        return f"tabrmd:bus_name={self.bus_name},bus_type=session"

    def env(self, **extra):
        """For keyx (or any TSS client) reaching the TPM through this abrmd."""
        return kxutil.base_env(DBUS_SESSION_BUS_ADDRESS=self.bus_address, **extra)

    def tools_env(self, **extra):
        """For tpm2-tools through abrmd (not instrumented: no sanitizer preload)."""
        return self.env(TPM2TOOLS_TCTI=self.tcti, LD_PRELOAD=None, ASAN_OPTIONS=None,
                        UBSAN_OPTIONS=None, **extra)

    def start(self):
        for exe in ("dbus-daemon", "tpm2-abrmd"):
            assert shutil.which(exe) or os.path.exists(f"/usr/sbin/{exe}"), (
                f"{exe} not found: install the Debian packages dbus and tpm2-abrmd (scripts/test.sh does)")
        self.tpm.start()
        sock_dir = self.dir / "bus"
        sock_dir.mkdir(exist_ok=True)
        conf = self.dir / "dbus.conf"
        conf.write_text(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n"
            " \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n"
            "<busconfig><type>session</type>"
            f"<listen>unix:dir={sock_dir}</listen>"
            "<policy context=\"default\"><allow send_destination=\"*\" eavesdrop=\"true\"/>"
            "<allow eavesdrop=\"true\"/><allow own=\"*\"/></policy></busconfig>\n")
        # --nofork with --print-address on stdout: the process is ours to kill.
        self.dbus = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        line = self.dbus.stdout.readline().strip()
        assert line.startswith("unix:"), f"dbus-daemon gave no address: {line!r} {self.dbus.stderr.read() if self.dbus.poll() is not None else ''}"
        self.bus_address = line
        abrmd_exe = shutil.which("tpm2-abrmd") or "/usr/sbin/tpm2-abrmd"
        cmd = [abrmd_exe, "--session", "--allow-root", "--flush-all", f"--dbus-name={self.bus_name}",
               f"--max-transients={self.max_transients}", f"--tcti={self.tpm.tcti}"]
        with open(self.log, "w") as log:
            self.abrmd = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          env=kxutil.base_env(DBUS_SESSION_BUS_ADDRESS=self.bus_address,
                                                              LD_PRELOAD=None),
                                          start_new_session=True)
        # Ready when a TPM command goes through it.
        deadline = time.monotonic() + TIMEOUT
        last = None
        while time.monotonic() < deadline:
            assert self.abrmd.poll() is None, f"tpm2-abrmd exited:\n$ {' '.join(cmd)}\n{self.log.read_text()}"
            last = kxutil.run(["tpm2_getrandom", "--hex", "4"], env=self.tools_env(), timeout=TIMEOUT)
            if last.rc == 0:
                return self
            time.sleep(0.2)
        raise AssertionError(f"tpm2-abrmd not answering on {self.tcti}:\n{last!r}\n{self.log.read_text()}")

    def stop(self):
        _kill(self.abrmd)
        _kill(self.dbus)
        self.tpm.kill()


@pytest.fixture
def abrmd(tmp_path):
    """A started Abrmd (its own swtpm and bus); everything killed at teardown."""
    a = Abrmd(tmp_path / "abrmd")
    try:
        yield a.start()
    finally:
        a.stop()
