"""nginx picks keyx up unchanged: Debian's nginx, 2 workers, keyx enabled only through
OPENSSL_CONF (`env OPENSSL_CONF;` in nginx.conf), the certificate key a KEYX KEY reference file.

The key is made in hardware with `openssl genpkey` (SoftHSM2 token: keyx-label; TPM behind
tpm2-abrmd: keyx-persist) and certified by a CA of the default provider for its public key. curl
and `openssl s_client` (default provider only, no keyx) make full handshakes (no session cache,
no tickets) over TLS 1.3 and 1.2. The audit log must show, for every handshake and only from the
workers' pids, an ephemeral key generated and derived in the configured backend and a `sign` of
the certificate key (its key id computed here from the certificate's public key) in hardware.
"""

import hashlib
import itertools
import re
import shutil
import subprocess
import time
from collections import Counter

import pytest

import kxutil
from fixture_abrmd import abrmd  # noqa: F401  (fixture)
from fixture_nginx import Pki, nginx_server, pki  # noqa: F401  (fixtures)
from fixture_softhsm import MODULE, SoftHSM
from kxutil import TIMEOUT, base_env, openssl

TOKEN = "keyx-ngx"
HANDSHAKES = 200
CURVES = "prime256v1:secp384r1"
LABELS = itertools.count(1)  # one token key per test on the module's token


class NginxToken(SoftHSM):
    """A SoftHSM2 token directory of its own with one empty token, keyx-ngx."""

    def setup(self):
        return self.init_tokens(TOKEN)


@pytest.fixture(scope="module")
def hsm(tmp_path_factory, build):
    for tool in ("softhsm2-util", "pkcs11-tool"):
        assert shutil.which(tool), f"{tool} not found: install softhsm2 and opensc (scripts/test.sh does)"
    assert MODULE.exists(), f"SoftHSM2 module {MODULE} not found: install softhsm2"
    return NginxToken(tmp_path_factory.mktemp("softhsm-ngx")).setup()


# ---- helpers --------------------------------------------------------------------------------


def ec_key_id(pub_pem):
    """The audit key id of an EC public key: SHA-256 of its uncompressed point, computed here
    from the SPKI the default provider writes (the audit log's documented definition, not
    keyx's code)."""
    der = openssl("pkey", "-pubin", "-in", pub_pem, "-outform", "DER", env=base_env(), text=False).ok("DER").out
    m = re.search(rb"\x03\x42\x00(\x04.{64})$", der, re.S)
    assert m, "not a P-256 SubjectPublicKeyInfo"
    return hashlib.sha256(m.group(1)).hexdigest()[:16]


def hardware_key(env, tmp, backend_opts, name="srv"):
    """genpkey in hardware through keyx, -out a reference file; its public key by pkey -pubout."""
    ref, pub = tmp / f"{name}.pem", tmp / f"{name}.pub"
    args = ["genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256"]
    for o in backend_opts:
        args += ["-pkeyopt", o]
    openssl(*args, "-out", ref, env=env).ok("genpkey in hardware")
    assert "-----BEGIN KEYX KEY-----" in ref.read_text(), f"not a reference file:\n{ref.read_text()}"
    openssl("pkey", "-in", ref, "-pubout", "-out", pub, env=env).ok("pubout of the reference")
    return ref, pub


def curl(port, ca, n, tls, timeout=max(TIMEOUT, 300)):
    """One curl process making n requests, each on a new connection with a full handshake
    (no session id reuse; the server closes after each response). Returns the Result."""
    ver = ["--tlsv1.3"] if tls == "1.3" else ["--tlsv1.2", "--tls-max", "1.2"]
    url = f"https://localhost:{port}/"
    cmd = ["curl", "-sS", "--no-sessionid", "--cacert", ca, "--resolve", f"localhost:{port}:127.0.0.1",
           *ver, "-w", "%{http_code} %{num_connects}\\n", "-o", "/dev/null", *([url] * n)]
    return kxutil.run(cmd, env=curl_env(), timeout=timeout)


def curl_env():
    """curl is the independent client (default provider, neutral openssl.cnf): no sanitizer
    runtime preloaded, under which it hangs in the ASan stage (as tpm2-tools do)."""
    return kxutil.plain_client_env()


def check_curl(r, n, srv=None):
    # -w prints "<status> <new connections>" per URL (the bodies go to stdout too, except the first)
    got = [line for line in r.out.splitlines() if re.fullmatch(r"\d{3} \d+", line)]
    if r.rc == 0 and got == ["200 1"] * n:
        return
    errs = sorted(set(r.err.splitlines()))[:5]
    log = "\n".join(srv.errors()[:5]) if srv is not None else ""
    raise AssertionError(f"curl (pid {r.pid}, exit {r.rc}): {got.count('200 1')} of {n} requests made a new "
                         f"connection and got 200; curl said:\n" + "\n".join(errs) + f"\nnginx error.log:\n{log}")


def probe(srv, ca):
    """Two handshakes per TLS version, with a short timeout, before the long runs."""
    for tls in ("1.3", "1.2"):
        check_curl(curl(srv.port, ca, 2, tls, timeout=60), 2, srv)


def s_client(port, ca, tls):
    ver = "-tls1_3" if tls == "1.3" else "-tls1_2"
    return kxutil.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                       "-CAfile", ca, "-verify_return_error", ver], env=base_env(), input="")


def s_client_loop(port, ca, n, tls):
    want = f"TLSv{tls}"
    for i in range(n):
        r = s_client(port, ca, tls)
        assert r.rc == 0 and kxutil.protocol(r.out) == want and "Verify return code: 0 (ok)" in r.out, (
            f"s_client handshake {i + 1} of {n} ({want}) failed:\n{r!r}")


def keyx_cnf(path, settings, audit):
    return kxutil.write_cnf(path, keyx=dict(settings, **{"audit-log": audit}))


def check_audit(audit, srv, handshakes, backend, cert_id, sign_backend):
    """Every handshake: keygen + derive of an ephemeral key in `backend` and a sign with the
    certificate key in `sign_backend`, only in the workers' pids, each worker serving some."""
    events = kxutil.read_audit(audit)
    kxutil.check_audit_schema(events)
    workers = set(srv.worker_pids())
    assert len(workers) == 2, f"nginx should run 2 workers, has {sorted(workers)}"
    failed = [e for e in events if not e["ok"]]
    assert not failed, f"failed keyx operations in nginx: {failed[:5]}"
    # The master (and `nginx -t` before it) load the certificate key; only workers use keys.
    loaders = {srv.master_pid, *srv.test_pids}
    in_loaders = [e for e in events if e["pid"] in loaders and e["event"] not in ("load", "free")]
    assert not in_loaders, f"key operations in nginx's master or nginx -t: {in_loaders[:5]}"
    served = [e for e in events if e["pid"] not in loaders]
    strangers = {e["pid"] for e in served} - workers
    assert not strangers, f"events from pids other than nginx's workers {sorted(workers)}: {sorted(strangers)}"
    per = {}
    for w in workers:
        mine = [e for e in served if e["pid"] == w]
        per[w] = Counter((e["event"], e.get("backend"), e.get("ephemeral"), e.get("key") == cert_id)
                         for e in mine if e["event"] in ("keygen", "derive", "sign"))
    total = Counter()
    for c in per.values():
        total.update(c)
    summary = {w: dict(c) for w, c in per.items()}
    assert total[("keygen", backend, True, False)] == handshakes, f"ephemeral keygens in {backend}: {summary}"
    assert total[("derive", backend, True, False)] == handshakes, f"ephemeral derives in {backend}: {summary}"
    assert total[("sign", sign_backend, False, True)] == handshakes, (
        f"signatures with the certificate key {cert_id} in {sign_backend}: {summary}")
    other = {k: v for k, v in total.items() if k not in {("keygen", backend, True, False),
                                                          ("derive", backend, True, False),
                                                          ("sign", sign_backend, False, True)}}
    assert not other, f"keyx operations elsewhere than expected: {other}"
    for w, c in per.items():
        assert c[("keygen", backend, True, False)] > 0, f"worker {w} served no handshake: {summary}"
        assert c[("keygen", backend, True, False)] == c[("derive", backend, True, False)] == \
            c[("sign", sign_backend, False, True)], f"worker {w}: keygen/derive/sign differ: {summary}"
    return per


def run_clients(srv, ca):
    """curl and s_client, each HANDSHAKES over TLS 1.3 and HANDSHAKES over TLS 1.2."""
    probe(srv, ca)
    for tls in ("1.3", "1.2"):
        check_curl(curl(srv.port, ca, HANDSHAKES, tls), HANDSHAKES, srv)
        s_client_loop(srv.port, ca, HANDSHAKES, tls)
    return 4 + 4 * HANDSHAKES


def hsm_setup(hsm, tmp, pki):
    audit = tmp / "audit.jsonl"
    cnf = keyx_cnf(tmp / "openssl.cnf", hsm.keyx_settings(tokens=(TOKEN,)), audit)
    env = hsm.env(OPENSSL_CONF=cnf)
    ref, pub = hardware_key(env, tmp, [f"keyx-label:srv-ngx-{next(LABELS)}"])
    crt = pki.certify(pub, "hsm")
    audit.unlink()
    return env, audit, ref, crt, ec_key_id(pub)


# ---- tests ----------------------------------------------------------------------------------


def test_nginx_hsm_certificate_key(hsm, tmp, pki, nginx_server):
    """The certificate key on the token (reference file), ECDHE on the token, 2 workers."""
    env, audit, ref, crt, cert_id = hsm_setup(hsm, tmp, pki)
    srv = nginx_server(crt, ref, env, curves=CURVES)
    n = run_clients(srv, pki.crt)
    assert not srv.errors(), "nginx logged errors:\n" + "\n".join(srv.errors())
    check_audit(audit, srv, n, "pkcs11", cert_id, "pkcs11")


def test_nginx_tpm_certificate_key(abrmd, tmp, pki, nginx_server):
    """The certificate key persistent in the TPM (reference file), ECDHE in the TPM, 2 workers
    sharing swtpm through tpm2-abrmd on a private bus."""
    audit = tmp / "audit.jsonl"
    cnf = keyx_cnf(tmp / "openssl.cnf", {"backends": "tpm", "tpm-tcti": abrmd.tcti}, audit)
    env = abrmd.env(OPENSSL_CONF=cnf)
    ref, pub = hardware_key(env, tmp, ["keyx-persist:0x81000010"])
    crt = pki.certify(pub, "tpm")
    audit.unlink()
    srv = nginx_server(crt, ref, env, curves=CURVES)
    n = run_clients(srv, pki.crt)
    assert not srv.errors(), "nginx logged errors:\n" + "\n".join(srv.errors())
    check_audit(audit, srv, n, "tpm", ec_key_id(pub), "tpm")


def parallel_curls(srv, ca, n, procs=4):
    """procs curl processes at once, n handshakes each (TLS 1.3 and 1.2 alternating)."""
    cmds = []
    for i in range(procs):
        tls = "1.3" if i % 2 == 0 else "1.2"
        ver = ["--tlsv1.3"] if tls == "1.3" else ["--tlsv1.2", "--tls-max", "1.2"]
        url = f"https://localhost:{srv.port}/"
        cmds.append(["curl", "-sS", "--no-sessionid", "--cacert", str(ca), "--resolve",
                     f"localhost:{srv.port}:127.0.0.1", *ver, "-w", "%{http_code} %{num_connects}\\n",
                     "-o", "/dev/null", *([url] * n)])
    procs_ = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=curl_env(),
                               start_new_session=True) for c in cmds]
    results = []
    try:
        for c, p in zip(cmds, procs_):
            out, err = p.communicate(timeout=max(TIMEOUT, 300))
            results.append(kxutil.Result(c, p.returncode, out, err, p.pid, 0))
    finally:
        for p in procs_:
            kxutil.kill_group(p) if p.poll() is None else None
    for r in results:
        check_curl(r, n, srv)
    return procs * n


def test_nginx_four_parallel_clients(hsm, tmp, pki, nginx_server):
    """4 client processes at once, 200 handshakes each, against nginx with the certificate key
    and ECDHE on the token: none fails, every one in the audit log."""
    env, audit, ref, crt, cert_id = hsm_setup(hsm, tmp, pki)
    srv = nginx_server(crt, ref, env, curves=CURVES)
    probe(srv, pki.crt)
    n = 4 + parallel_curls(srv, pki.crt, HANDSHAKES)
    assert not srv.errors(), "nginx logged errors:\n" + "\n".join(srv.errors())
    check_audit(audit, srv, n, "pkcs11", cert_id, "pkcs11")


def test_nginx_token_ecdhe_with_a_software_certificate(hsm, tmp, pki, nginx_server):
    """A software certificate key (PEM, default provider's format) and ECDHE on the token: each
    worker re-initializes the module after nginx forks it; 4 clients at once."""
    audit = tmp / "audit.jsonl"
    cnf = keyx_cnf(tmp / "openssl.cnf", hsm.keyx_settings(tokens=(TOKEN,)), audit)
    env = hsm.env(OPENSSL_CONF=cnf)
    crt, key = pki.software_cert("sw")
    pub = tmp / "sw.pub"
    openssl("pkey", "-in", key, "-pubout", "-out", pub, env=base_env()).ok("pubout")
    srv = nginx_server(crt, key, env, curves=CURVES)
    probe(srv, pki.crt)
    n = 4 + parallel_curls(srv, pki.crt, 50)
    s_client_loop(srv.port, pki.crt, 10, "1.3")
    s_client_loop(srv.port, pki.crt, 10, "1.2")
    assert not srv.errors(), "nginx logged errors:\n" + "\n".join(srv.errors())
    check_audit(audit, srv, n + 20, "pkcs11", ec_key_id(pub), "software")


def test_nginx_tpm_ecdhe_through_abrmd_with_a_software_certificate(abrmd, tmp, pki, nginx_server):
    """ECDHE in the TPM for both workers through tpm2-abrmd, software certificate key: the TPM
    part of the nginx setup without TPM signing."""
    audit = tmp / "audit.jsonl"
    cnf = keyx_cnf(tmp / "openssl.cnf", {"backends": "tpm", "tpm-tcti": abrmd.tcti}, audit)
    env = abrmd.env(OPENSSL_CONF=cnf)
    crt, key = pki.software_cert("sw")
    pub = tmp / "sw.pub"
    openssl("pkey", "-in", key, "-pubout", "-out", pub, env=base_env()).ok("pubout")
    srv = nginx_server(crt, key, env, curves=CURVES)
    probe(srv, pki.crt)
    n = 4 + parallel_curls(srv, pki.crt, 25)
    assert not srv.errors(), "nginx logged errors:\n" + "\n".join(srv.errors())
    check_audit(audit, srv, n, "tpm", ec_key_id(pub), "software")
