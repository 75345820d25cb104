"""The audit log itself: JSON lines, one write per line, mode 0600, append, never a secret."""

import json
import re
import shutil
import socket
import stat
import subprocess
import time

import pytest

import kxutil
from kxutil import base_env, openssl


def test_events_of_a_key_lifecycle(build, tmp):
    log = tmp / "audit.jsonl"
    k = kxutil.pair("EC", "P-384")
    got, r = kxutil.derive([("ab", "EC", "P-384", k["A"]["priv"], "spki", k["B"]["spki"])],
                           env=base_env(KEYX_AUDIT_LOG=log))
    assert got["ab"].ok and got["ab"].secret == k["S"], got["ab"]
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    kid = kxutil.key_id(k["A"]["pub"])
    mine = [e for e in events if e.get("key") == kid]
    kinds = [e["event"] for e in mine]
    assert kinds[:1] == ["load"], f"the imported private key was not logged as load first: {mine}"
    assert "derive" in kinds and kinds[-1] == "free", f"expected load, derive, free for {kid}: {mine}"
    for e in mine:
        assert e["pid"] == r.pid and e.get("backend") == "software" and e.get("alg") == "EC", e
        assert e.get("group") == "P-384" and e.get("ephemeral") is False, e
    kxutil.assert_no_secrets(log.read_text(), [k["S"], k["A"]["priv"], k["B"]["priv"]], "audit log")


def test_created_0600_and_appended(build, tmp):
    log = tmp / "audit.jsonl"
    kxutil.run(kxutil.driver_cmd() + ["uses", "X25519", "X25519", "1"], env=base_env(KEYX_AUDIT_LOG=log)).ok()
    mode = stat.S_IMODE(log.stat().st_mode)
    assert mode == 0o600, f"audit log created with mode {oct(mode)}, expected 0o600"
    first = log.read_text()
    kxutil.run(kxutil.driver_cmd() + ["uses", "X25519", "X25519", "1"], env=base_env(KEYX_AUDIT_LOG=log)).ok()
    assert log.read_text().startswith(first), "the second process did not append"
    assert len(kxutil.read_audit(log)) > len(first.splitlines())


def test_concurrent_writers_never_interleave_lines(build, tmp):
    """Four processes log into one file at once: every line stays one whole JSON object."""
    log = tmp / "audit.jsonl"
    env = base_env(KEYX_AUDIT_LOG=log)
    cmd = [str(c) for c in kxutil.driver_cmd()] + ["uses", "EC", "P-256", "200"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
             for _ in range(4)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=kxutil.TIMEOUT * 2)
            assert p.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    for p in procs:
        derives = [e for e in events if e["pid"] == p.pid and e["event"] == "derive"]
        assert len(derives) == 200, f"pid {p.pid}: {len(derives)} derive events for 200 derives"


def test_unwritable_audit_log_refuses_to_serve(module_dir, tmp):
    """An audit log keyx cannot open: keyx loads and refuses (test_fail_closed.py: every operation)."""
    bad = tmp / "no-such-dir" / "audit.jsonl"
    r = openssl("list", "-providers", "-verbose", "-provider-path", module_dir, "-provider", "keyx",
                env=base_env(KEYX_AUDIT_LOG=bad))
    r.ok("list")
    assert re.search(r"^  keyx\n(    .*\n)*    status: inactive$", r.out, re.M), f"keyx not inactive:\n{r!r}"
    assert "audit" in r.err and "refuses every operation" in r.err, f"the error does not say the audit log is the problem:\n{r!r}"


# ---- production: rotation, syslog, truthful events ------------------------------------------

GEN_APP = kxutil.LIBCRYPTO_CTYPES + r"""
ctx = LIB_new()
assert LIB_load(ctx, sys.argv[1].encode()) == 1
for line in sys.stdin:
    n = int(line)
    for i in range(n):
        c = CTX_name(ctx, b"EC", None)
        k = c_void_p()
        ok = c and kg_init(c) == 1 and set_group(c, b"P-256") == 1 and generate(c, byref(k)) == 1
        if not ok:
            print_errors()
            sys.exit(1)
        pkey_free(k)
        CTX_free(c)
    print("done", n, flush=True)
"""


class GenApp:
    """A long-lived process making software EC keys on request (a keygen and a free event each)."""

    def __init__(self, cnf):
        self.proc = subprocess.Popen(["/usr/bin/python3", "-c", GEN_APP, str(cnf)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=base_env())

    def gen(self, n):
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.strip() == f"done {n}", f"app failed: {line!r} {self.proc.stderr.read() if not line else ''}"

    def close(self):
        self.proc.stdin.close()
        assert self.proc.wait(kxutil.TIMEOUT) == 0, self.proc.stderr.read()
        return self.proc.stderr.read()


def app_events(path, pid):
    return [e for e in kxutil.read_audit(path) if e["pid"] == pid] if path.exists() else []


@pytest.mark.parametrize("how", ["moved", "deleted", "copytruncate"])
def test_log_rotation_without_a_signal(build, tmp, how):
    """logrotate's three ways: the file moved away (create), deleted, or copied and truncated.
    Events keep going to the path (a new file, mode 0600) within a second, and none is lost."""
    log, old = tmp / "audit.jsonl", tmp / "audit.jsonl.1"
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={"audit-log": log})
    app = GenApp(cnf)
    try:
        app.gen(5)
        before = app_events(log, app.proc.pid)
        assert len(before) == 10, before
        if how == "moved":
            log.rename(old)
        elif how == "deleted":
            log.unlink()
        else:
            shutil.copyfile(log, old)
            with open(log, "r+") as f:
                f.truncate(0)
        app.gen(3)  # may still land in the moved file: keyx looks at the path once a second
        time.sleep(1.2)
        app.gen(4)
    finally:
        err = app.close()
    assert "warning" not in err, err
    new = app_events(log, app.proc.pid)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600, oct(log.stat().st_mode)
    assert len(new) >= 8, f"events after the rotation not at {log}: {new}"
    assert "\0" not in log.read_text(), "a hole in the truncated file"
    if how != "deleted":  # a deleted file takes what was written to it before the reopen along
        total = len(new) + len(app_events(old, app.proc.pid))
        assert total == 2 * (5 + 3 + 4), f"events lost or doubled: {total}"


def test_syslog_sink(build, tmp):
    """`audit-log = syslog:SOCKET` (`syslog` alone: /dev/log, journald's and rsyslog's socket):
    one datagram per event, as syslog(3) sends them, facility authpriv, tag keyx[PID]; failures
    at warning, successes at info. The receiver here is a datagram socket in the test directory."""
    sock_path = tmp / "log.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(sock_path))
    rx.settimeout(kxutil.TIMEOUT)
    try:
        cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={"audit-log": f"syslog:{sock_path}"})
        app = GenApp(cnf)
        app.gen(2)
        app.close()
        r = openssl("genpkey", "-algorithm", "X448", env=base_env(OPENSSL_CONF=cnf))
        r.ok("X448 in software")  # keyx serves X448 in software: one more keygen
        msgs = []
        while len(msgs) < 5:
            msgs.append(rx.recv(4096).decode())
    finally:
        rx.close()
    for m in msgs:
        g = re.fullmatch(r"<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d keyx\[(\d+)\]: (\{.*\})", m)
        assert g, f"not a syslog datagram: {m!r}"
        ev = json.loads(g.group(3))
        kxutil.check_audit_schema([ev])
        assert int(g.group(1)) == (10 << 3) | (6 if ev["ok"] else 4), m
        assert int(g.group(2)) == ev["pid"], m
    assert [json.loads(m.split(": ", 1)[1])["event"] for m in msgs[:4]] == ["keygen", "free"] * 2, msgs


def test_syslog_nobody_serves_refuses_to_serve(build, tmp):
    """A syslog socket that does not exist is a configuration error at load (fail closed), not a
    trail silently lost later."""
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={"audit-log": f"syslog:{tmp / 'nothing.sock'}"})
    r = openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", env=base_env(OPENSSL_CONF=cnf))
    assert r.rc != 0 and "PRIVATE KEY" not in r.out, r
    assert "cannot reach syslog at" in r.err and "refuses to serve" in r.err, r


def test_failed_keygen_event_keeps_the_cause(build, tmp, free_port):
    """The failure event says why (here: the TPM unreachable at its TCTI), not only that
    generation failed."""
    log = tmp / "audit.jsonl"
    tcti = f"swtpm:host=127.0.0.1,port={free_port}"
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={"backends": "tpm", "tpm-tcti": tcti, "audit-log": log})
    r = openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", env=base_env(OPENSSL_CONF=cnf))
    assert r.rc != 0, r
    fails = [e for e in kxutil.read_audit(log) if e["event"] == "keygen" and not e["ok"]]
    assert fails and tcti in fails[0]["error"], fails
