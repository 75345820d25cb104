"""scripts/demo.sh, the README's first command, against the build under test (`--no-build`: it
neither installs nor rebuilds anything). Its output is checked line by line: in each step
(software, PKCS#11 on its own SoftHSM2 token, TPM on its own swtpm) keyx's secret equals the
default-provider peer's (the demo derives both sides and prints both hashes), the TLS 1.3
handshake completed with a verified certificate, and the audit trail puts the TLS server's key
share in the step's backend. The demo must leave nothing behind: its temporary directory, $HOME,
and no swtpm or s_server, also when it fails half-way with swtpm running.
"""

import os
import re
from pathlib import Path

import kxutil
from kxutil import base_env, run

DEMO = kxutil.REPO / "scripts" / "demo.sh"
# The demo takes a few seconds (README promises ~2 minutes with the build); ASan builds are slower.
DEMO_TIMEOUT = max(kxutil.TIMEOUT, 300)


def run_demo(tmp, bin_dir=None):
    tmpdir, home = tmp / "tmpdir", tmp / "home"
    tmpdir.mkdir()
    home.mkdir()
    env = base_env(BUILD_DIR=kxutil.build_dir(), TMPDIR=tmpdir, HOME=home)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    r = run(["bash", DEMO, "--no-build"], env=env, timeout=DEMO_TIMEOUT)
    return r, tmpdir, home


def leftovers(tmpdir, home):
    """Files the demo left, and processes (swtpm, s_server) still running in or on its temp dir."""
    files = [str(p) for d in (tmpdir, home) for p in Path(d).rglob("*")]
    procs = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmdline = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            cwd = os.readlink(p / "cwd")
        except OSError:
            continue
        if str(tmpdir) in cmdline or cwd.startswith(str(tmpdir)):
            procs.append(f"{p.name}: {cmdline}")
    return files, procs


def sections(out):
    """The demo's steps by their number: {"1": text, "2": text, "3": text}."""
    parts = re.split(r"^==> (\d)\. ", out, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def audit_rows(text):
    """{(process, backend): {event: count}} from a step's audit trail lines."""
    rows = {}
    for who, backend, events in re.findall(r"^ +(commands|s_server) +(\S+) +EC +P-256 +(.+)$", text, re.M):
        rows[(who, backend)] = {ev: int(n) for ev, n in re.findall(r"(\w+) (\d+)", events)}
    return rows


def check_step(text, backend, what):
    """Secrets equal, TLS 1.3 handshake verified, the server's ECDHE key in `backend`."""
    m = re.search(r"SHA-256 of the secrets: ([0-9a-f]{16})\.\.\. \(keyx\), ([0-9a-f]{16})\.\.\. \(peer", text)
    assert m, f"step '{what}' shows no secrets:\n{text}"
    assert m.group(1) == m.group(2), f"step '{what}': keyx's secret differs from the peer's:\n{text}"
    assert "secrets match" in text
    for line in ("New, TLSv1.3, Cipher is TLS_", "Verify return code: 0 (ok)",
                 f"TLS 1.3 handshake completed: {what}"):
        assert line in text, f"step '{what}': no '{line}':\n{text}"
    # "Server Temp Key" (OpenSSL 3.0), "Peer Temp Key" (3.5)
    assert re.search(r"^ +(Server|Peer) Temp Key: ECDH, prime256v1, 256 bits$", text, re.M), (
        f"step '{what}': not P-256:\n{text}")
    rows = audit_rows(text)
    server = rows.get(("s_server", backend), {})
    assert server.get("keygen") == 1 and server.get("derive") == 1 and server.get("free", 0) >= 1, (
        f"the TLS server's key share is not in {backend}:\n{text}")
    cmds = rows.get(("commands", backend), {})
    assert cmds.get("derive") == 1, f"the step's ECDH did not run in {backend}:\n{text}"
    if backend != "software":
        for ev in ("keygen", "derive"):
            assert ev not in rows.get(("s_server", "software"), {}), (
                f"the TLS server made or used a software key share with backends = {backend}:\n{text}")
    assert "every event ok" in text and "FAILED" not in text, text
    return rows


def check_certificate(text, backend, key_file, noun):
    """The server's certificate key is the hardware key: keyx signed with it (the default
    provider verified the signature) and the TLS server signed in `backend`, never in software."""
    rows = audit_rows(text)
    assert f"dgst -sha256 -sign {key_file}: signed with {noun}, verified by the default provider" in text, text
    assert f"certificate key: {key_file}, {noun}" in text, text
    assert re.search(rf"^ +\$ openssl s_server -tls1_3 -cert \S+ -key {re.escape(key_file)} ", text, re.M), text
    assert rows.get(("s_server", backend), {}).get("sign") == 1, f"the TLS server did not sign in {backend}:\n{text}"
    assert ("s_server", "software") not in rows, f"the TLS server used a software key with backends = {backend}:\n{text}"


def test_demo_shows_every_backend(build, tmp):
    r, tmpdir, home = run_demo(tmp)
    assert r.rc == 0, f"scripts/demo.sh failed:\n{r!r}"
    steps = sections(r.out)
    assert sorted(steps) == ["1", "2", "3"], f"the demo's steps are missing:\n{r.out}"

    check_step(steps["1"], "software", "software ECDHE key share")

    p11 = steps["2"]
    check_step(p11, "pkcs11", "ECDHE key share made and used on the token")
    assert "-----BEGIN KEYX KEY-----" in p11
    assert re.search(r"^ +private key: in the pkcs11 backend, pkcs11:.*token=keyx-demo.*object=demo-srv", p11, re.M), p11
    # pkcs11-tool's own listing: the key pair is on the token, its private half never extractable
    assert re.search(r"^ +Private Key Object; EC\n +label: +demo-srv\n +Usage: .*derive.*\n +Access: .*never extractable",
                     p11, re.M), p11
    assert audit_rows(p11)[("commands", "pkcs11")].get("keygen") == 1, p11
    check_certificate(p11, "pkcs11", "srv.pem", "the token key")

    tpm = steps["3"]
    check_step(tpm, "tpm", "ECDHE key share made and used in the TPM")
    assert "-----BEGIN KEYX KEY-----" in tpm
    assert re.search(r"^ +private key: in the tpm backend, handle=0x81000010$", tpm, re.M), tpm
    assert re.search(r"^ +persistent handles \(tpm2_getcap\): .*0x81000010", tpm, re.M), tpm
    assert audit_rows(tpm)[("commands", "tpm")].get("keygen") == 1, tpm
    check_certificate(tpm, "tpm", "tpm-srv.pem", "the TPM key")

    assert "PRIVATE KEY" not in r.out, "the demo printed a private key"
    assert r.seconds < 120, f"the demo took {r.seconds:.0f}s, not a two-minute demo"
    files, procs = leftovers(tmpdir, home)
    assert not files and not procs, f"the demo left files {files} and processes {procs}"


def test_demo_cleans_up_when_it_fails(build, tmp):
    """A tpm2_getcap that does not list the new key fails the demo with swtpm running: swtpm is
    stopped and the temporary directory removed all the same."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "tpm2_getcap"
    fake.write_text("#!/bin/sh\necho '- 0x81000099'\n")
    fake.chmod(0o755)
    r, tmpdir, home = run_demo(tmp, bin_dir)
    assert r.rc != 0, f"the demo ignored a TPM without its key:\n{r!r}"
    assert "error: tpm2_getcap does not list 0x81000010" in r.err, r
    assert "==> 3. TPM 2.0" in r.out and "swtpm pid" in r.out, r
    files, procs = leftovers(tmpdir, home)
    assert not files and not procs, f"the failed demo left files {files} and processes {procs}"
