"""The TPM goes away under a running process and comes back.

One keyx-test-derive process derives in a loop (each line: a private key moved into the TPM,
one ECDH_ZGen). swtpm is killed with SIGKILL in the middle: every operation then fails with a
clear error naming the TCTI within 5 seconds (no hang). swtpm is restarted on the same port:
the same process reconnects and succeeds again, without a restart of the application. Threads
that meet a restarted TPM at the same moment each retry their own operation once.
"""

import queue
import select
import subprocess
import threading
import time

import pytest

import kxutil
from fixture_swtpm import tpm_cnf, tpm_derive_cmd
from kxutil import base_env
from test_tpm_persistent import make_persistent
from test_tpm_slots import app


class Driver:
    """keyx-test-derive fed one vector at a time; ask() returns (Outcome, seconds)."""

    def __init__(self, cmd, env, errfile):
        self.err = open(errfile, "w")
        self.proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, env=env, text=True,
                                     start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def send(self, vid, vector):
        self.proc.stdin.write(f"{vid} {vector}\n")
        self.proc.stdin.flush()

    def answer(self, vid, timeout=30):
        line = self.lines.get(timeout=timeout)
        assert line.split(" ", 1)[0] == str(vid), f"answer {line!r} for vector {vid}"
        return kxutil.Outcome(str(vid), line)

    def ask(self, vid, vector):
        start = time.monotonic()
        self.send(vid, vector)
        out = self.answer(vid)
        return out, time.monotonic() - start

    def close(self):
        try:
            self.proc.stdin.close()
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                kxutil.kill_group(self.proc)
            self.err.close()


def test_swtpm_killed_and_restarted(build, swtpm_factory, tmp):
    tpm = swtpm_factory()
    log = tmp / "audit.jsonl"
    cnf = tpm_cnf(tmp / "openssl.cnf", tpm, keyx={"audit-log": log})
    k = kxutil.pair("EC", "P-256")
    vector = f"EC P-256 {k['A']['priv']} spki {k['B']['spki']}"
    drv = Driver(tpm_derive_cmd(cnf), base_env(), tmp / "driver.err")
    try:
        vid = 0
        for _ in range(20):
            vid += 1
            out, _ = drv.ask(vid, vector)
            assert out.ok and out.secret == k["S"], out

        # Killed while derives are being sent.
        vid += 1
        drv.send(vid, vector)
        tpm.kill()
        drv.answer(vid)  # whichever came first: the derive or the kill
        for _ in range(5):
            vid += 1
            out, took = drv.ask(vid, vector)
            assert not out.ok, f"derive {vid} succeeded with swtpm killed: {out}"
            assert took < 5, f"failure took {took:.1f}s"
            assert tpm.tcti in out.error and "backend unavailable" in out.error, f"unclear error: {out.error}"

        tpm.start()
        for _ in range(20):
            vid += 1
            out, _ = drv.ask(vid, vector)
            assert out.ok and out.secret == k["S"], f"after the restart: {out}"
    finally:
        rc = drv.close()
    assert rc == 0, (tmp / "driver.err").read_text()[-3000:]
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    ok = [e for e in events if e["event"] == "derive" and e["ok"]]
    assert len(ok) >= 40 and all(e["backend"] == "tpm" for e in ok)
    # Nothing left behind in the restarted TPM once the process has exited.
    assert not tpm.tools("tpm2_getcap", "handles-transient").out.strip()


def test_tpm_restarted_between_derives(build, swtpm_factory, tmp):
    """swtpm restarted while the process is idle: its TCTI opens a new socket per command, so
    no I/O error shows the restart; the TPM no longer knows keyx's parent and session. The very
    next operation must still succeed (keyx reconnects and makes the key again)."""
    tpm = swtpm_factory()
    cnf = tpm_cnf(tmp / "openssl.cnf", tpm)
    k = kxutil.pair("EC", "P-256")
    vector = f"EC P-256 {k['A']['priv']} spki {k['B']['spki']}"
    drv = Driver(tpm_derive_cmd(cnf), base_env(), tmp / "driver.err")
    try:
        for vid in range(1, 31):
            if vid % 10 == 0:
                tpm.restart()
            out, took = drv.ask(vid, vector)
            assert out.ok and out.secret == k["S"], f"derive {vid} (restart every 10th): {out}"
    finally:
        rc = drv.close()
    assert rc == 0, (tmp / "driver.err").read_text()[-3000:]


def test_tls_server_survives_tpm_restart(swtpm_factory, s_server, s_client, certs, tmp):
    """A running TLS server (one process, three connections): a handshake, then swtpm killed
    (the next handshake fails, the server logs an error naming the TCTI), then swtpm restarted
    (the third handshake succeeds in the same server process)."""
    tpm = swtpm_factory()
    log = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", tpm, keyx={"audit-log": log}))
    crt, key = certs["rsa"]
    srv = s_server(["-naccept", "3", "-cert", crt, "-key", key], env)
    args = ["-tls1_3", "-groups", "P-256"]
    first = s_client(srv.port, args, base_env())
    assert first.rc == 0 and kxutil.protocol(first.out) == "TLSv1.3", first
    tpm.kill()
    start = time.monotonic()
    second = s_client(srv.port, args, base_env())
    took = time.monotonic() - start
    assert second.rc != 0 and not kxutil.protocol(second.out), second
    assert took < 5, f"the failed handshake took {took:.1f}s"
    tpm.start()
    third = s_client(srv.port, args, base_env())
    out = srv.wait()
    assert third.rc == 0 and kxutil.protocol(third.out) == "TLSv1.3", f"{third!r}\n--- s_server ---\n{out}"
    assert tpm.tcti in out and "backend unavailable" in out, f"server error does not name the TCTI:\n{out}"
    events = [e for e in kxutil.read_audit(log) if e["pid"] == srv.pid]
    keygens = [(e["backend"], e["ok"]) for e in events if e["event"] == "keygen"]
    assert keygens[0] == ("tpm", True) and keygens[-1] == ("tpm", True) and ("tpm", False) in keygens, events


@pytest.mark.parametrize("session", ["keyx", "off", "esys"])
def test_tls_server_handshake_right_after_silent_tpm_restart(swtpm_factory, s_server, s_client, certs, tmp,
                                                             session):
    """swtpm restarted between two handshakes, no command failing in between (its TCTI opens a
    socket per command): the next handshake's key is made in the new TPM and its derive must
    succeed too (keyx notices the reset at keygen, before the key is used), with keyx's session,
    without sessions, and with ESYS's (RSA tpm-parent)."""
    tpm = swtpm_factory()
    opts = {}
    if session == "off":
        opts["tpm-encrypt-sessions"] = "0"
    elif session == "esys":
        tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-G", "rsa2048", "-c", tmp / "srk.ctx")
        tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", tmp / "srk.ctx", "0x81000012")
        tpm.flush_transient()
        opts["tpm-parent"] = "0x81000012"
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", tpm, keyx=opts))
    crt, key = certs["rsa"]
    srv = s_server(["-naccept", "3", "-cert", crt, "-key", key], env)
    args = ["-tls1_3", "-groups", "P-256"]
    for i in range(3):
        if i:
            tpm.restart()
        r = s_client(srv.port, args, base_env())
        assert r.rc == 0 and kxutil.protocol(r.out) == "TLSv1.3", f"handshake {i}: {r!r}"
    srv.wait()


def test_threads_right_after_silent_tpm_restart(swtpm_factory, tmp):
    """4 threads make and use a key at the same moment right after swtpm restarted, no command
    failing in between: each thread's first command meets the lost session, one thread
    reconnects first, and every other one must still retry its own key generation on the new
    connection (a retry once failed when another thread's reconnect came between a thread's
    failure and its retry check)."""
    tpm = swtpm_factory()
    cnf = tpm_cnf(tmp / "openssl.cnf", tpm)
    p = subprocess.Popen(["/usr/bin/python3", str(app(tmp)), str(cnf), "restart-threads"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         env=base_env(), text=True, start_new_session=True)
    try:
        for i in range(6):
            if i:
                tpm.restart()
            p.stdin.write("go\n")
            p.stdin.flush()
            # one line per round: nothing else is buffered, so select() sees what readline reads
            assert select.select([p.stdout], [], [], 60)[0], f"round {i}: no answer in 60 s"
            line = p.stdout.readline().strip()
            assert line == "round ok", f"round {i} (after {i} restarts): {line}"
        p.stdin.close()
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            kxutil.kill_group(p)


def test_persistent_key_survives_tpm_restart(build, swtpm_factory, tmp):
    """A key loaded by keyx:tpm:handle= before swtpm restarts is found again at its handle on
    the new connection: the first derive after the restart succeeds."""
    tpm = swtpm_factory()
    make_persistent(tpm, tmp, "ecc256", 0x81000002)
    cnf = tpm_cnf(tmp / "openssl.cnf", tpm)
    p = subprocess.Popen(["/usr/bin/python3", str(app(tmp)), str(cnf), "persist",
                          "keyx:tpm:handle=0x81000002"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=base_env(), text=True, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "before ok"
        tpm.restart()
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "after ok"
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            kxutil.kill_group(p)
