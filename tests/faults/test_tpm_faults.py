"""swtpm SIGKILLed and restarted under one long-lived application doing every kind of operation:
keygen (ephemeral P-256 made in the TPM), derive, RSA OAEP decrypt and ECDSA sign with
persistent keys made by `genpkey -pkeyopt keyx-persist:` (mixed_app.py, every result checked by
the default provider). While the TPM is gone each operation fails within 5 s with keyx's
'backend unavailable' naming the TCTI; the process survives; after the restart the same process
succeeds again with the same persistent keys. After the process exits no transient object is
left and the persistent handles are exactly the two keys.

test_tpm_fault.py (derive loop, TLS server, silent restarts) covers the derive-only cases.
"""

import queue
import re
import subprocess
import threading
import time
from pathlib import Path

import kxutil
from fixture_swtpm import tpm_cnf
from test_tpm_keyfiles import genpkey_persist

APP = Path(__file__).with_name("mixed_app.py")
OPS = ("keygen", "derive", "decrypt", "sign")
EC_HANDLE, RSA_HANDLE = 0x81000070, 0x81000071


class App:
    """mixed_app.py holding the EC and RSA keys at ec_uri, rsa_uri; ask(op) -> (answer, seconds)."""

    def __init__(self, cnf, env, errfile, ec_uri, rsa_uri):
        self.err = open(errfile, "w")
        self.proc = subprocess.Popen(["/usr/bin/python3", str(APP), str(cnf), ec_uri, rsa_uri],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env,
                                     text=True, start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self.lines.get(timeout=kxutil.TIMEOUT) == "ready", "the application did not start"

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def ask(self, op):
        start = time.monotonic()
        self.proc.stdin.write(op + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=30)
        except queue.Empty:
            raise AssertionError(f"{op}: no answer in 30 s (hang)")
        took = time.monotonic() - start
        assert line.startswith(op + " "), f"answer {line!r} to {op}"
        return line[len(op) + 1:], took

    def check_run(self, rc, errfile, log, backend):
        """After close(): no sanitizer report, exit 0, and in the audit log every operation kind
        both failed (during the fault) and succeeded, all in backend."""
        err = errfile.read_text()
        for m in kxutil.SANITIZER_MARKERS:
            assert m not in err, err
        assert rc == 0, f"the application exited {rc}:\n{err[-3000:]}"
        events = [e for e in kxutil.read_audit(log) if e["pid"] == self.proc.pid]
        kxutil.check_audit_schema(events)
        for ev in OPS:
            mine = [e for e in events if e["event"] == ev]
            assert [e for e in mine if e["ok"]] and [e for e in mine if not e["ok"]], f"{ev}: {mine}"
            assert {e["backend"] for e in mine} == {backend}, mine

    def close(self):
        try:
            self.proc.stdin.close()
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                kxutil.kill_group(self.proc)
            self.err.close()


def persistent(tpm):
    return set(re.findall(r"0x[0-9a-f]+", tpm.tools("tpm2_getcap", "handles-persistent").out.lower()))


def test_every_operation_across_a_tpm_kill_and_restart(swtpm_factory, tmp):
    tpm = swtpm_factory()
    log = tmp / "audit.jsonl"
    cnf = tpm_cnf(tmp / "openssl.cnf", tpm, keyx={"audit-log": log})
    env = kxutil.base_env(OPENSSL_CONF=cnf)
    genpkey_persist(env, None, "EC", EC_HANDLE, "P-256").ok("persistent EC key")
    genpkey_persist(env, None, "RSA", RSA_HANDLE, "rsa_keygen_bits:2048").ok("persistent RSA key")
    handles = persistent(tpm)
    assert handles == {f"0x{EC_HANDLE:x}", f"0x{RSA_HANDLE:x}"}, handles

    app = App(cnf, kxutil.base_env(), tmp / "app.err", f"keyx:tpm:handle=0x{EC_HANDLE:08x}",
              f"keyx:tpm:handle=0x{RSA_HANDLE:08x}")
    try:
        for _ in range(3):
            for op in OPS:
                res, _ = app.ask(op)
                assert res == "ok", f"{op} with the TPM up: {res}"
        tpm.kill()
        for _ in range(2):
            for op in OPS:
                res, took = app.ask(op)
                assert res.startswith("err "), f"{op} with swtpm killed: {res}"
                assert took < 5, f"{op} failed only after {took:.1f}s"
                assert "backend unavailable" in res and tpm.tcti in res and "tpm-tcti" in res, \
                    f"{op}: the error does not say what to check: {res}"
        tpm.start()
        for _ in range(3):
            for op in OPS:
                res, _ = app.ask(op)
                assert res == "ok", f"{op} after swtpm came back, same process: {res}"
    finally:
        rc = app.close()
    app.check_run(rc, tmp / "app.err", log, "tpm")
    assert not tpm.tools("tpm2_getcap", "handles-transient").out.strip(), "transient objects left in the TPM"
    assert persistent(tpm) == handles, "persistent keys lost or added"
