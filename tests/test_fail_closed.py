"""Fail closed: when openssl.cnf asks for keyx and keyx cannot serve as configured, no program gets
software keys in its place.

keyx then still loads (a provider that fails to load is dropped and OpenSSL carries on with the
default provider, exit 0), shows `status: inactive`, prints the cause once on stderr and refuses
every operation with it: key generation (`genpkey`, `req -newkey`, EVP in a program), TLS key
shares (s_server, nginx), key reference files. Keys that are not keyx's (a PEM file of the default
provider) still load, in software, as they would without keyx. Causes: a value keyx does not
accept, an unknown key (a typo), an audit log keyx cannot open (a directory that does not exist,
a file the user may not write), with and without `config_diagnostics = 1`. A failover the
operator configured (`backends = tpm, software` with the TPM down) still serves, and says so on
stderr once per process.
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

import kxutil
from fixture_nginx import nginx_server, pki  # noqa: F401  (fixtures)
from kxutil import TIMEOUT, base_env, openssl

REASON = "keyx is not configured correctly and refuses to serve"


def broken_cnf(tmp, case, diagnostics=True):
    """(openssl.cnf, text the refusal must name) for one way of misconfiguring keyx."""
    settings, names = {
        "bad-value": ({"backends": "tmp"}, 'backends = "tmp"'),
        "unknown-key": ({"backedns": "tpm"}, 'unknown configuration key "backedns"'),
        "audit-dir-missing": ({"audit-log": tmp / "no-such-dir" / "audit.jsonl"}, "audit"),
        # a value that is also a section's name: OpenSSL reads the section, keyx never sees it
        "value-names-a-section": ({"backends": "hsm_list"}, "backends in [keyx_sect] cannot be read"),
    }[case]
    cnf = kxutil.write_cnf(tmp / f"{case}.cnf", keyx=settings, diagnostics=diagnostics)
    if case == "value-names-a-section":
        cnf.write_text(cnf.read_text() + "\n[hsm_list]\nfirst = pkcs11\n")
    return cnf, names


def refused(r, cause, what):
    assert r.rc != 0, f"{what} succeeded while keyx refuses to serve:\n{r!r}"
    assert "PRIVATE KEY" not in r.out, f"{what} wrote a software key:\n{r!r}"
    assert REASON in r.err and cause in r.err, f"{what}: the error does not say why:\n{r!r}"


def check_every_operation_refused(tmp, cnf, cause):
    env = base_env(OPENSSL_CONF=cnf)
    lst = openssl("list", "-providers", "-verbose", env=env).ok("list")
    assert lst.err.count("keyx: error: ") == 1 and cause in lst.err, f"no single stderr line naming the cause:\n{lst!r}"
    for alg, opts in (("EC", ["-pkeyopt", "ec_paramgen_curve:P-256"]), ("X25519", []), ("RSA", []),
                      ("DH", ["-pkeyopt", "group:ffdhe2048"])):
        refused(openssl("genpkey", "-algorithm", alg, *opts, env=env), cause, f"genpkey {alg}")
    key = tmp / "req.key"
    r = openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", key, "-subj", "/CN=x", "-out", tmp / "req.crt", env=env)
    refused(r, cause, "req -newkey")
    assert not key.exists() or "PRIVATE KEY" not in key.read_text(), "req wrote a software key file"
    # a program's own EVP key generation: the driver generates through its configured context
    r = kxutil.run(kxutil.driver_cmd(config=cnf) + ["uses", "EC", "P-256", "1"], env=env)
    assert r.rc != 0 and "pub " not in r.out and REASON in r.out, f"the driver got a key:\n{r!r}"


@pytest.mark.parametrize("case", ["bad-value", "unknown-key", "audit-dir-missing", "value-names-a-section"])
def test_misconfigured_keyx_refuses_every_operation(build, tmp, case):
    cnf, cause = broken_cnf(tmp, case)
    check_every_operation_refused(tmp, cnf, cause)


def test_config_diagnostics_changes_nothing(build, tmp):
    """With or without `config_diagnostics = 1`: keyx loads, refuses, and nothing runs in software."""
    cnf, cause = broken_cnf(tmp, "bad-value", diagnostics=False)
    assert "config_diagnostics" not in cnf.read_text()
    check_every_operation_refused(tmp, cnf, cause)


def test_software_key_files_still_load(build, tmp):
    """A PEM key of the default provider is no keyx key: it loads as it would without keyx (a
    server's certificate key), while keyx's own key files are refused with the cause."""
    cnf, cause = broken_cnf(tmp, "bad-value")
    key = tmp / "sw.key"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key,
            env=base_env()).ok("software key")
    openssl("pkey", "-in", key, "-noout", env=base_env(OPENSSL_CONF=cnf)).ok("software key with keyx refusing")
    good = kxutil.write_cnf(tmp / "good.cnf", keyx={"backends": "software"})
    ref = tmp / "ref.pem"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", ref,
            env=base_env(OPENSSL_CONF=good)).ok("keyx software key")
    assert "PRIVATE KEY" in ref.read_text()  # a software key of keyx's is PKCS#8: loads anywhere
    openssl("pkey", "-in", ref, "-noout", env=base_env(OPENSSL_CONF=cnf)).ok("PKCS#8 with keyx refusing")


def test_audit_log_the_user_cannot_write(build, tmp):
    """An audit log created by root (mode 0600) and a service running as another user: keyx
    refuses in that user's processes instead of dropping the audit trail or itself."""
    d = Path(tempfile.mkdtemp(prefix="keyx-failclosed-"))
    try:
        os.chmod(d, 0o755)
        log = d / "audit.jsonl"
        log.write_text("")
        os.chmod(log, 0o600 if os.geteuid() == 0 else 0o400)
        module, = kxutil.copies_for_another_user(d / "lib")
        cnf = kxutil.write_cnf(d / "openssl.cnf", keyx={"audit-log": log}, module=module)
        os.chmod(cnf, 0o644)
        cmd = ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
        if os.geteuid() == 0:
            # as the unprivileged user a service runs as (root bypasses the file's mode)
            cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"] + cmd
        r = kxutil.run(cmd, env=kxutil.env_for_another_user(base_env(OPENSSL_CONF=cnf), d / "lib"), cwd=d)
        refused(r, "audit", "genpkey as a user who may not write the audit log")
        assert log.read_text() == "", "the audit log was written"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_tls_server_fails_its_handshakes_with_the_cause(tmp, certs, s_server, s_client):
    """openssl s_server with a software certificate and keyx refusing: the handshake fails (no
    software key share), and the server's own output names the cause."""
    cnf, cause = broken_cnf(tmp, "bad-value")
    srv = s_server(["-cert", certs["ec"][0], "-key", certs["ec"][1]], base_env(OPENSSL_CONF=cnf))
    cli = s_client(srv.port, [], kxutil.plain_client_env())
    out = srv.wait()
    assert cli.rc != 0 or "Cipher is (NONE)" in cli.out, f"a handshake completed:\n{cli!r}"
    assert REASON in out and cause in out, f"s_server's output does not name the cause:\n{out}"


def test_nginx_fails_its_handshakes_and_logs_the_cause(build, tmp, pki, nginx_server):
    """nginx with keyx refusing: it starts (its certificate key is a software PEM file), every
    handshake fails instead of running on software key shares, and error.log says why."""
    cnf, cause = broken_cnf(tmp, "bad-value")
    crt, key = pki.software_cert("sw")
    srv = nginx_server(crt, key, base_env(OPENSSL_CONF=cnf))
    r = kxutil.run(["curl", "-sS", "--cacert", pki.crt, "--max-time", "10", f"https://localhost:{srv.port}/"],
                   env=kxutil.plain_client_env())
    assert r.rc != 0 and "keyx nginx" not in r.out, f"nginx served a request:\n{r!r}"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and REASON not in srv.error_log.read_text():
        time.sleep(0.1)
    log = srv.error_log.read_text()
    lines = [l for l in log.splitlines() if REASON in l]
    assert lines and cause in lines[0], f"error.log does not name the cause:\n{log}"
    # logged at nginx's default level or above, not only at info
    assert any(f"[{lvl}]" in l for l in lines for lvl in ("crit", "error", "alert", "emerg")), log


def test_configured_failover_to_software_warns_once_per_process(build, tmp, free_port):
    """`backends = tpm, software` and no TPM: keys are made in software as the operator allowed,
    with one warning on stderr per process however many keys follow."""
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={"backends": "tpm, software",
                                                       "tpm-tcti": f"swtpm:host=127.0.0.1,port={free_port}"})
    script = kxutil.LIBCRYPTO_CTYPES + r"""
ctx = LIB_new()
assert LIB_load(ctx, sys.argv[1].encode()) == 1
for i in range(3):
    c = CTX_name(ctx, b"EC", None)
    k = c_void_p()
    ok = c and kg_init(c) == 1 and set_group(c, b"P-256") == 1 and generate(c, byref(k)) == 1
    if not ok:
        print_errors()
    print(i, "ok" if ok else "err", prov_name(get_prov(k)).decode() if ok else "-")
    pkey_free(k)
    CTX_free(c)
"""
    r = kxutil.run(["/usr/bin/python3", "-c", script, str(cnf)], env=base_env())
    r.ok("three keys with the TPM down")
    assert r.out.split("\n")[:3] == ["0 ok keyx", "1 ok keyx", "2 ok keyx"], r
    warnings = [l for l in r.err.splitlines() if l.startswith("keyx: warning: the tpm backend failed")]
    assert len(warnings) == 1, f"expected one failover warning:\n{r!r}"
    assert "made in software, as 'backends = tpm, software' allows" in warnings[0], r
