"""A device dies in the middle of a stream of TLS handshakes with `software` listed after it:
`backends = pkcs11, software` (the SoftHSM2 token's directory moved away and back)
and `backends = tpm, software` (swtpm SIGKILLed and restarted). One s_server process serves the
whole stream; every handshake must succeed, each within 5 s: keyx passes the failed device over
(audit `failover` naming it, the next backend `software`), serves the key shares in software
while the device is away, and uses the device again once it is back. No crash, no sanitizer
report, nothing left on the token or in the TPM after the server exits.
"""

import shutil
import subprocess
import time

import kxutil
from conftest import pick_port
from fixture_softhsm import SoftHSM
from fixture_swtpm import tpm_cnf

PHASE_HANDSHAKES = 6
BACK_WITHIN = 15  # seconds: keyx passes a failed backend over for 5 s, re-initializes once a second


def handshake(port):
    start = time.monotonic()
    r = kxutil.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-groups", "P-256",
                    "-brief"], env=kxutil.base_env(), input="")
    return r, time.monotonic() - start


def start_server(env, certs):
    crt, key = certs["rsa"]
    port = pick_port()
    srv = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", crt, "-key", key,
                            "-groups", "P-256", "-quiet"],
                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=env, text=True, start_new_session=True)
    deadline = time.monotonic() + 10
    while True:
        r, _ = handshake(port)
        if r.rc == 0:
            return srv, port
        assert srv.poll() is None, f"s_server died:\n{srv.stderr.read()}"
        assert time.monotonic() < deadline, f"s_server does not serve:\n{r!r}"
        time.sleep(0.1)


def ok_handshakes(port, n, what):
    for i in range(n):
        r, took = handshake(port)
        assert r.rc == 0, f"handshake {i + 1} {what} failed:\n{r!r}"
        assert took < 5, f"handshake {i + 1} {what} took {took:.1f}s"


def stream_until_backend(port, log, pid, backend, seconds):
    """Successful handshakes (each < 5 s) until the newest derive of pid is in backend."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        ok_handshakes(port, 1, f"#{n} while waiting for {backend}")
        mine = [e for e in kxutil.read_audit(log) if e["pid"] == pid and e["event"] == "derive" and e["ok"]]
        if mine and mine[-1]["backend"] == backend:
            return n
        time.sleep(0.2)
    raise AssertionError(f"the key shares did not move to {backend} within {seconds}s")


def stop(srv):
    srv.stdin.close()
    kxutil.kill_group(srv)
    srv.wait(kxutil.TIMEOUT)
    err = srv.stderr.read()
    for m in kxutil.SANITIZER_MARKERS:
        assert m not in err, f"sanitizer report in s_server:\n{err}"
    assert srv.returncode in (-9, 0), f"s_server died by itself (rc {srv.returncode}):\n{err[-3000:]}"
    return err


def phases(events):
    """Backends of the successful derives in order, run-length encoded: [('pkcs11', 7), ...]."""
    out = []
    for e in events:
        if e["event"] == "derive" and e["ok"]:
            if out and out[-1][0] == e["backend"]:
                out[-1][1] += 1
            else:
                out.append([e["backend"], 1])
    return [tuple(x) for x in out]


def check_trail(events, device):
    kxutil.check_audit_schema(events)
    runs = phases(events)
    assert len(runs) >= 3 and runs[0][0] == device and runs[-1][0] == device, runs
    assert "software" in [b for b, _ in runs], f"no handshake served in software while {device} was away: {runs}"
    assert {b for b, _ in runs} == {device, "software"}, runs
    fo = [e for e in events if e["event"] == "failover"]
    assert fo and all(e["backend"] == device for e in fo), fo
    assert [e for e in fo if e.get("next") == "software"], f"no failover to software: {fo}"
    return runs


def token_dir(hsm, label):
    found = [d for d in hsm.tokendir.iterdir()
             if d.is_dir() and label.encode() in (d / "token.object").read_bytes()]
    assert len(found) == 1, found
    return found[0]


def test_token_dies_mid_stream_software_serves_token_returns(tmp_path_factory, certs, cnf, tmp):
    hsm = SoftHSM(tmp_path_factory.mktemp("fo-p11")).setup()
    before = hsm.token_objects("keyx-a")
    tdir, away = token_dir(hsm, "keyx-a"), hsm.root / "away"
    log = tmp / "audit.jsonl"
    env = hsm.env(OPENSSL_CONF=cnf(keyx={"audit-log": log, **hsm.keyx_settings(backends="pkcs11, software")}))
    srv, port = start_server(env, certs)
    try:
        ok_handshakes(port, PHASE_HANDSHAKES, "with the token present")
        shutil.move(tdir, away)
        stream_until_backend(port, log, srv.pid, "software", BACK_WITHIN)
        ok_handshakes(port, PHASE_HANDSHAKES, "with the token away")
        shutil.move(away, tdir)
        stream_until_backend(port, log, srv.pid, "pkcs11", BACK_WITHIN)
        ok_handshakes(port, PHASE_HANDSHAKES, "after the token came back")
    finally:
        if away.exists():
            shutil.move(away, tdir)
        stop(srv)
    events = [e for e in kxutil.read_audit(log) if e["pid"] == srv.pid]
    runs = check_trail(events, "pkcs11")
    assert runs[-1][1] >= PHASE_HANDSHAKES, runs
    assert [e for e in events if e["event"] == "failover" and "keyx-a" in e["error"]], \
        "no failover event names the token"
    assert hsm.token_objects("keyx-a") == before, "token objects added or lost"


def test_tpm_dies_mid_stream_software_serves_tpm_returns(swtpm_factory, certs, tmp):
    tpm = swtpm_factory()
    log = tmp / "audit.jsonl"
    env = kxutil.base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", tpm,
                                               keyx={"audit-log": log, "backends": "tpm, software"}))
    srv, port = start_server(env, certs)
    try:
        ok_handshakes(port, PHASE_HANDSHAKES, "with the TPM up")
        tpm.kill()
        stream_until_backend(port, log, srv.pid, "software", BACK_WITHIN)
        ok_handshakes(port, PHASE_HANDSHAKES, "with the TPM gone")
        tpm.start()
        stream_until_backend(port, log, srv.pid, "tpm", BACK_WITHIN)
        ok_handshakes(port, PHASE_HANDSHAKES, "after the TPM came back")
    finally:
        if tpm.proc is None:
            tpm.start()
        stop(srv)
    events = [e for e in kxutil.read_audit(log) if e["pid"] == srv.pid]
    runs = check_trail(events, "tpm")
    assert runs[-1][1] >= PHASE_HANDSHAKES, runs
    fo = [e for e in events if e["event"] == "failover"]
    assert [e for e in fo if tpm.tcti in e["error"]], f"no failover event names the TCTI: {fo}"
    # the server was SIGKILLed: keyx could not flush; its objects are the TPM's to reclaim on
    # the next start-up clear. A fresh swtpm start (startup-clear) must hold none.
    tpm.restart()
    assert not tpm.tools("tpm2_getcap", "handles-transient").out.strip()
    assert not tpm.tools("tpm2_getcap", "handles-persistent").out.strip(), "a persistent object appeared"
