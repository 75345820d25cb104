"""The audit log itself: JSON lines, one write per line, mode 0600, append, never a secret."""

import re
import stat
import subprocess

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
