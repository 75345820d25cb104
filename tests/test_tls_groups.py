"""TLS groups for each set of backends: the `Groups` line of docs/tls-servers.md.

OpenSSL 3.0 offers only the groups of keyx's TLS-GROUP list; 3.5 negotiates every provider's
groups, so openssl.cnf's `Groups` line (system_default section) must list what the backends serve.
With that line, clients in their default settings (openssl s_client, curl, Python's ssl, Go's
crypto/tls) complete handshakes against s_server, nginx and a Python ssl server, and with `tpm`
or `pkcs11` every server key share is made and used in that hardware (through a
HelloRetryRequest when the client guessed another group). Without the line, a hardware-only
server on 3.5 refuses the client's group, and keyx's error in the server's output names the
line that fixes it. keyx's own client programs on such a host work too. The docs' table, the
example configuration, scripts/lib.sh and keyx's message all give the same lines.
"""

import re
import subprocess
import time

import pytest

import kxutil
from conftest import pick_port
from fixture_abrmd import abrmd  # noqa: F401  (fixture)
from fixture_nginx import Pki, nginx_server, pki  # noqa: F401  (fixtures)
from fixture_swtpm import tpm_cnf
from kxutil import REPO, TIMEOUT, base_env, openssl, run
from test_python_ssl import PyServer

BACKEND_SETS = ["tpm", "pkcs11", "software", "tpm, software", "pkcs11, software", "tpm, pkcs11, software"]


# ---- one source of truth ------------------------------------------------------------------------


def docs_table():
    """{backends: (3.0 line, 3.5 line)} from docs/tls-servers.md's table."""
    rows = {}
    for m in re.finditer(r"^\|([^|\n]+)\|\s*`([^`]+)`\s*\|\s*`([^`]+)`\s*\|\s*$",
                         (REPO / "docs" / "tls-servers.md").read_text(), re.M):
        for backends in re.findall(r"`([a-z0-9, ]+)`", m.group(1)):
            rows[backends] = (m.group(2), m.group(3))
    return rows


def test_docs_examples_and_scripts_give_the_same_groups_lines():
    table = docs_table()
    for backends in BACKEND_SETS:
        assert backends in table, f"docs/tls-servers.md has no Groups row for `{backends}`: {sorted(table)}"
        assert table[backends] == (kxutil.tls_groups(backends, (3, 0, 0)), kxutil.tls_groups(backends, (3, 5, 0))), (
            backends, table[backends])
    text = (REPO / "examples" / "openssl.cnf").read_text()
    backends = re.search(r"^backends = (.+)$", text, re.M).group(1).strip()
    groups = re.search(r"^Groups = (.+)$", text, re.M).group(1).strip()
    assert groups == kxutil.tls_groups(backends, (3, 5, 0)), (backends, groups)
    assert kxutil.tls_groups(backends, (3, 0, 0)) in text, "examples/openssl.cnf lacks the OpenSSL 3.0 line"
    for backends in ("tpm", "pkcs11", "software"):
        r = run(["bash", "-c", f'. "{REPO}/scripts/lib.sh" && keyx_tls_groups {backends}'])
        assert r.rc == 0 and r.out.strip() == kxutil.tls_groups(backends), (backends, r)


def test_keyx_refusal_gives_the_groups_line_for_the_devices_it_has(swtpm, softhsm, tmp):
    """keyx computes the line from what its configured backends report (the real swtpm and token)."""
    for backends in ("tpm", "pkcs11", "tpm, pkcs11"):
        keyx = {"backends": backends, "tpm-tcti": swtpm.tcti, **softhsm.keyx_settings(backends=backends)}
        env = softhsm.env(OPENSSL_CONF=kxutil.write_cnf(tmp / "refuse.cnf", keyx=keyx))
        r = openssl("genpkey", "-algorithm", "X448", env=env)
        assert r.rc != 0 and f"X448: no backend in 'backends = {backends}'" in r.err, r
        assert f"'Groups = {kxutil.tls_groups(backends)}' in openssl.cnf's system_default section" in r.err, r
        assert 'docs/tls-servers.md, "Choosing the TLS groups"' in r.err, r


# ---- clients in their default settings --------------------------------------------------------


def handshakes(port, ca, go_client):
    """Each default client once against 127.0.0.1:port as "localhost": {client: Result}."""
    # The clients' host has no keyx: OpenSSL's defaults, and none of the sanitizer runtimes a
    # sanitized keyx.so needs in the servers (curl hangs with libasan preloaded)
    env = kxutil.plain_client_env()
    py = ("import socket, ssl, sys\n"
          "ctx = ssl.create_default_context(cafile=sys.argv[2])\n"
          "with socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=20) as s:\n"
          "    with ctx.wrap_socket(s, server_hostname='localhost') as t:\n"
          "        print('ok', t.version())\n")
    return {
        "s_client": run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                         "-CAfile", ca, "-verify_return_error"], env=env, input=""),
        "curl": run(["curl", "-sS", "--http0.9", "--max-time", "20", "--cacert", ca, "--resolve",
                     f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/"], env=env),
        "python": run(["/usr/bin/python3", "-c", py, str(port), ca], env=env),
        "go": run([go_client, f"127.0.0.1:{port}", "localhost", ca], env=env),
    }


def check_clients(results, what):
    failed = {c: r for c, r in results.items() if r.rc != 0}
    assert not failed, f"{what}: default clients failed:\n" + "\n".join(f"--- {c}\n{r!r}" for c, r in failed.items())
    assert "ok" in results["python"].out and results["go"].out.startswith("ok 0x0304"), results
    assert kxutil.protocol(results["s_client"].out) == "TLSv1.3", results["s_client"]


def check_key_shares(log, backend, n, pids=None):
    """At least n ephemeral key shares made and used in backend, none for TLS anywhere else."""
    events = [e for e in kxutil.read_audit(log) if pids is None or e["pid"] in pids]
    shares = [e for e in events if e.get("ephemeral") is True and e["event"] in ("keygen", "derive")]
    assert all(e["ok"] for e in shares), [e for e in shares if not e["ok"]]
    made = [e for e in shares if e["event"] == "keygen"]
    used = [e for e in shares if e["event"] == "derive"]
    assert len(made) >= n and len(used) >= n, f"{len(made)} keygens, {len(used)} derives for {n} handshakes"
    assert {e["backend"] for e in shares} == {backend}, {(e["backend"], e["alg"], e.get("group")) for e in shares}


def server_config(backends, tmp, swtpm, softhsm, abrmd=None):
    """(env, audit log) for a server preferring keyx with backends and the docs' Groups line."""
    log = tmp / "audit.jsonl"
    keyx = {"audit-log": log}
    if backends == "tpm":
        keyx["tpm-tcti"] = (abrmd or swtpm).tcti
        env_of = abrmd.env if abrmd else base_env
    elif backends == "pkcs11":
        keyx.update(softhsm.keyx_settings())
        env_of = softhsm.env
    else:
        env_of = base_env
    keyx["backends"] = backends
    return env_of(OPENSSL_CONF=kxutil.write_cnf(tmp / "server.cnf", keyx=keyx, groups="auto")), log


@pytest.mark.parametrize("backends", ["tpm", "pkcs11", "software"])
def test_default_clients_against_s_server(backends, swtpm, softhsm, pki, go_client, tmp):
    env, log = server_config(backends, tmp, swtpm, softhsm)
    crt, key = pki.software_cert("srv")
    port = pick_port()
    srv = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "4", "-www",
                            "-cert", crt, "-key", key], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=env, text=True, start_new_session=True)
    try:
        started = []
        while (line := srv.stdout.readline()) and not line.startswith("ACCEPT"):
            started.append(line)
        assert line, f"s_server did not start:\n{''.join(started)}"
        results = handshakes(port, pki.crt, go_client)
        out, _ = srv.communicate(timeout=TIMEOUT)
    finally:
        kxutil.kill_group(srv)
    check_clients(results, f"s_server, backends = {backends}\n{out}")
    check_key_shares(log, backends, 4, {srv.pid})


@pytest.mark.parametrize("backends", ["tpm", "pkcs11", "software"])
def test_default_clients_against_python_ssl(backends, swtpm, softhsm, pki, go_client, tmp):
    env, log = server_config(backends, tmp, swtpm, softhsm)
    crt, key = pki.software_cert("srv")
    srv = PyServer(crt, key, env)
    try:
        results = handshakes(srv.port, pki.crt, go_client)
        time.sleep(0.2)
    finally:
        srv.stop()
    check_clients(results, f"Python ssl server, backends = {backends}\n{srv.output}")
    assert srv.output.count("HANDSHAKE TLSv1.3") == 4, srv.output
    check_key_shares(log, backends, 4, {srv.pid})


@pytest.mark.parametrize("backends", ["tpm", "pkcs11", "software"])
def test_default_clients_against_nginx(backends, request, swtpm, softhsm, pki, nginx_server, go_client, tmp):
    # nginx's workers share the TPM: through tpm2-abrmd, as docs/tls-servers.md says
    abrmd = request.getfixturevalue("abrmd") if backends == "tpm" else None
    env, log = server_config(backends, tmp, swtpm, softhsm, abrmd)
    crt, key = pki.software_cert("srv")
    srv = nginx_server(crt, key, env, curves="auto")  # nginx's default: the system's Groups line
    results = handshakes(srv.port, pki.crt, go_client)
    check_clients(results, f"nginx, backends = {backends}")
    assert "keyx nginx" in results["curl"].out, results["curl"]
    assert not srv.errors(), "nginx logged errors:\n" + "\n".join(srv.errors())
    check_key_shares(log, backends, 4, set(srv.worker_pids()))


# ---- without the line; keyx as the client -------------------------------------------------------


def test_without_the_groups_line_the_server_log_names_the_fix(swtpm, certs, s_server, s_client, tmp):
    """A TPM-only server without the Groups line, a default client. On 3.0 keyx's TLS-GROUP list
    keeps X25519 out and the client is sent to P-256; 3.5 negotiates the client's X25519MLKEM768,
    whose X25519 half keyx refuses: the handshake fails and the server's output says what to write."""
    log = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"audit-log": log}, groups=None))
    crt, key = certs["ec"]
    srv = s_server(["-cert", crt, "-key", key], env)
    cli = s_client(srv.port, [], base_env())
    out = srv.wait()
    events = kxutil.read_audit(log) if log.exists() else []
    assert not [e for e in events if e.get("backend") == "software" and e["event"] in ("keygen", "derive")], events
    if kxutil.openssl_version() < (3, 5):
        assert cli.rc == 0 and kxutil.temp_key(cli.out) == "ECDH, prime256v1, 256 bits", cli
        return
    assert cli.rc != 0 and not kxutil.protocol(cli.out), f"handshake completed:\n{cli!r}"
    assert "X25519: no backend in 'backends = tpm' can generate it" in out, out
    assert f"'Groups = {kxutil.tls_groups('tpm')}' in openssl.cnf's system_default section" in out, out


@pytest.mark.parametrize("backends", ["tpm", "pkcs11"])
def test_keyx_client_with_the_groups_line_makes_its_share_in_hardware(backends, swtpm, softhsm, certs,
                                                                       s_server, tmp):
    """A client program on a host whose openssl.cnf prefers keyx with hardware: its key share is
    made in hardware; the server is plain OpenSSL with its defaults, which on 3.5 lists no
    SecP256r1MLKEM768 and sends the client's first share (that hybrid, EC half in hardware) back
    with a HelloRetryRequest to P-256, also made in hardware."""
    env, log = server_config(backends, tmp, swtpm, softhsm)
    crt, key = certs["ec"]
    srv = s_server(["-cert", crt, "-key", key], base_env())
    cli = run(["openssl", "s_client", "-connect", f"127.0.0.1:{srv.port}", "-servername", "localhost"],
              env=env, input="")
    srv.wait()
    assert cli.rc == 0 and kxutil.protocol(cli.out) == "TLSv1.3", cli
    assert kxutil.temp_key(cli.out) == "ECDH, prime256v1, 256 bits", cli
    check_key_shares(log, backends, 1, {cli.pid})
