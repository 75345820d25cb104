"""valgrind memcheck over the openssl command-line flows, each backend.

keyx is loaded through OPENSSL_CONF (keyx preferred, the backend under test configured) and the
openssl tool runs under valgrind for: genpkey (software key, a token key with its reference file,
a TPM persistent key), pkey -pubout and -text, pkeyutl -derive, pkeyutl -decrypt (RSA-OAEP
SHA-256), dgst -sign, storeutl, and one TLS 1.3 handshake with s_server under valgrind (its
ECDHE key share and certificate key on the backend; s_client is the plain openssl tool). On the
token, the certificate is read by URI too (x509 -in, storeutl of every kind and by subject,
s_server -cert). Every result is checked as the other tests check it (the default provider
derives the same secret, verifies the signature, encrypted the message). valgrind writes XML; a test fails on any invalid
read/write/free, uninitialised use or bad syscall argument whose stack has a keyx.so frame, and
on any definitely or indirectly lost block allocated under a keyx.so frame. Suppressions for
frames outside keyx: tests/valgrind.supp.

valgrind cannot run an ASan build: these tests carry the `valgrind` marker and CI's ASan stage
deselects them (-m 'not valgrind'); they run in the plain stage.
"""

import re
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET

import pytest

import kxutil
from conftest import pick_port
from fixture_softhsm import SoftHSM
from fixture_swtpm import Swtpm, tpm_cnf

pytestmark = pytest.mark.valgrind

SUPP = kxutil.REPO / "tests" / "valgrind.supp"
VG_TIMEOUT = max(kxutil.TIMEOUT, 180)
MEMORY_KINDS = ("Invalid", "Uninit", "SyscallParam", "Mismatched", "Overlap", "ClientCheck",
                "FishyValue")
LEAK_KINDS = ("Leak_DefinitelyLost", "Leak_IndirectlyLost")
TPM_EC, TPM_RSA, TPM_GEN = 0x81000E11, 0x81000E12, 0x81000E13


def valgrind_cmd(xml):
    exe = shutil.which("valgrind")
    assert exe, "valgrind is not installed (Debian package valgrind; scripts/test.sh installs it)"
    return [exe, "--tool=memcheck", "--leak-check=full", "--show-leak-kinds=definite,indirect",
            "--num-callers=30", "--keep-debuginfo=yes", f"--suppressions={SUPP}", "--xml=yes", f"--xml-file={xml}",
            "--child-silent-after-fork=yes"]


def keyx_findings(xml):
    """valgrind errors of the XML report that involve keyx.so (see the module doc)."""
    assert xml.exists() and xml.stat().st_size > 0, f"valgrind wrote no report {xml}"
    root = ET.parse(xml).getroot()
    found = []
    for err in root.iter("error"):
        kind = err.findtext("kind", "")
        if not (kind.startswith(MEMORY_KINDS) or kind in LEAK_KINDS):
            continue
        stack = err.find("stack")  # the first stack: where it happened / where it was allocated
        frames = [] if stack is None else stack.findall("frame")
        objs = [f.findtext("obj", "") for f in frames]
        if any(o.endswith("/keyx.so") for o in objs):
            what = err.findtext("what") or err.findtext("xwhat/text") or kind
            trace = "\n".join(f"    {f.findtext('fn', '?')} ({(f.findtext('obj') or '').rsplit('/', 1)[-1]}"
                              f"{':' + f.findtext('line') if f.findtext('line') else ''})"
                              for f in frames[:15])
            found.append(f"{kind}: {what}\n{trace}")
    return found


class VG:
    """Runs openssl commands under valgrind in one test, numbering their XML reports."""

    def __init__(self, tmp, env):
        self.tmp, self.env, self.n = tmp, env, 0

    def xml(self):
        self.n += 1
        return self.tmp / f"vg{self.n}.xml"

    def openssl(self, *args, input=None, text=True):
        xml = self.xml()
        r = kxutil.run([*valgrind_cmd(xml), "openssl", *args], env=self.env, input=input,
                       timeout=VG_TIMEOUT, text=text)
        found = keyx_findings(xml)
        assert not found, f"valgrind: openssl {args[0]} has errors in keyx:\n" + "\n".join(found) + f"\n{r!r}"
        return r


def plain(*args, env, **kw):
    """The openssl tool without valgrind (setup and the independent checks)."""
    return kxutil.openssl(*args, env=env, **kw)


def check_flows(vg, tmp, key, rsa_key, key_is_file=True, store_uri=None):
    """The common flows with EC key `key` and RSA key `rsa_key` (paths or URIs)."""
    dflt = kxutil.base_env()
    # public export and text
    # public export and text in one run (a PEM reader skips the text before the PEM block)
    vg.openssl("pkey", "-in", key, "-pubout", "-text", "-out", tmp / "pub.pem").ok("pkey -pubout -text")
    assert "NIST CURVE: P-256" in (tmp / "pub.pem").read_text()
    # derive with a default-provider peer; the default provider derives the same from its side
    plain("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
          tmp / "peer.pem", env=dflt).ok("peer key")
    plain("pkey", "-in", tmp / "peer.pem", "-pubout", "-out", tmp / "peer.pub", env=dflt).ok("peer pub")
    vg.openssl("pkeyutl", "-derive", "-inkey", key, "-peerkey", tmp / "peer.pub",
               "-out", tmp / "z1.bin").ok("pkeyutl -derive")
    plain("pkeyutl", "-derive", "-inkey", tmp / "peer.pem", "-peerkey", tmp / "pub.pem",
          "-out", tmp / "z2.bin", env=dflt).ok("default-provider derive")
    assert (tmp / "z1.bin").read_bytes() == (tmp / "z2.bin").read_bytes(), "keyx derived a wrong secret"
    # ECDSA signature, verified by the default provider
    (tmp / "data.txt").write_text("valgrind flows\n")
    vg.openssl("dgst", "-sha256", "-sign", key, "-out", tmp / "sig.bin", tmp / "data.txt").ok("dgst -sign")
    plain("dgst", "-sha256", "-verify", tmp / "pub.pem", "-signature", tmp / "sig.bin",
          tmp / "data.txt", env=dflt).ok("default provider verifies the signature")
    # RSA-OAEP decryption of what the default provider encrypted
    plain("pkey", "-in", rsa_key, "-pubout", "-out", tmp / "rsa.pub", env=vg.env).ok("RSA pubout")
    (tmp / "msg.bin").write_bytes(bytes(range(32)))
    oaep = ["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256",
            "-pkeyopt", "rsa_mgf1_md:sha256"]
    plain("pkeyutl", "-encrypt", "-pubin", "-inkey", tmp / "rsa.pub", *oaep, "-in", tmp / "msg.bin",
          "-out", tmp / "ct.bin", env=dflt).ok("default-provider encrypt")
    vg.openssl("pkeyutl", "-decrypt", "-inkey", rsa_key, *oaep, "-in", tmp / "ct.bin",
               "-out", tmp / "pt.bin").ok("pkeyutl -decrypt")
    assert (tmp / "pt.bin").read_bytes() == bytes(range(32)), "wrong OAEP plaintext"
    # storeutl
    r = vg.openssl("storeutl", "-noout", "-keys", store_uri or key).ok("storeutl")
    assert "Total found:" in r.out and "Total found: 0" not in r.out, r


def handshake(vg, tmp, env, key, cert):
    """One TLS 1.3 handshake, s_server under valgrind (X25519 off: P-256 key share)."""
    xml = vg.xml()
    port = pick_port()
    cmd = [*valgrind_cmd(xml), "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1",
           "-key", key, "-cert", cert, "-groups", "P-256", "-tls1_3"]
    srv = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=env, text=True, errors="replace", start_new_session=True)
    lines, accepting = [], threading.Event()

    def read():
        for line in srv.stdout:
            lines.append(line)
            if line.startswith("ACCEPT"):
                accepting.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert accepting.wait(VG_TIMEOUT), f"s_server under valgrind not accepting:\n{''.join(lines)}"
        r = kxutil.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                        "-groups", "P-256", "-tls1_3"], env=kxutil.base_env(), input="", timeout=VG_TIMEOUT)
        assert r.rc == 0 and kxutil.protocol(r.out) == "TLSv1.3", f"handshake failed:\n{r!r}\n{''.join(lines)}"
        srv.wait(VG_TIMEOUT)
    finally:
        if srv.poll() is None:
            kxutil.kill_group(srv)
            srv.wait(10)
        reader.join(5)
    found = keyx_findings(xml)
    assert not found, "valgrind: s_server has errors in keyx:\n" + "\n".join(found) + "\n" + "".join(lines)


def self_signed(tmp, env, key):
    """A certificate for key, signed with it through keyx (not under valgrind)."""
    cert = tmp / "cert.pem"
    plain("req", "-new", "-x509", "-key", key, "-out", cert, "-subj", "/CN=localhost", "-days", "2",
          env=env).ok("self-signed certificate")
    return cert


def test_valgrind_software(build, tmp):
    log = tmp / "audit.jsonl"
    cnf = kxutil.write_cnf(tmp / "sw.cnf", keyx={"backends": "software", "audit-log": log})
    env = kxutil.base_env(OPENSSL_CONF=cnf)
    vg = VG(tmp, env)
    vg.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", tmp / "ec.pem").ok("genpkey")
    plain("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", tmp / "rsa.pem",
          env=kxutil.base_env()).ok("RSA key")
    check_flows(vg, tmp, tmp / "ec.pem", tmp / "rsa.pem")
    handshake(vg, tmp, env, tmp / "ec.pem", self_signed(tmp, env, tmp / "ec.pem"))
    events = kxutil.read_audit(log)
    assert {e["event"] for e in events if e.get("backend") == "software" and e["ok"]} >= {
        "keygen", "derive", "sign", "decrypt"}


def test_valgrind_pkcs11(build, tmp_path_factory, tmp):
    hsm = SoftHSM(tmp_path_factory.mktemp("vg-softhsm")).setup()
    hsm.tool("keyx-a", "--keypairgen", "--key-type", "rsa:2048", "--label", "vg-rsa", "--id", "e5",
             "--usage-decrypt").ok("RSA token key")
    log = tmp / "audit.jsonl"
    cnf = kxutil.write_cnf(tmp / "p11.cnf", keyx=hsm.keyx_settings(**{"pkcs11-raw-rsa": 1, "audit-log": log}))
    env = hsm.env(OPENSSL_CONF=cnf)
    vg = VG(tmp, env)
    ref = tmp / "ec.ref.pem"
    vg.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt", "keyx-backend:pkcs11",
               "-pkeyopt", "keyx-label:vg-ec", "-out", ref).ok("genpkey on the token")
    assert "BEGIN KEYX KEY" in ref.read_text()
    check_flows(vg, tmp, ref, "pkcs11:token=keyx-a;object=vg-rsa;type=private",
                store_uri="pkcs11:token=keyx-a")
    # the certificate on the token beside its key: read by URI, listed, found by subject, served
    cert = self_signed(tmp, env, ref)
    plain("x509", "-in", cert, "-outform", "DER", "-out", tmp / "cert.der", env=kxutil.base_env()).ok("DER")
    hsm.tool("keyx-a", "--write-object", tmp / "cert.der", "--type", "cert", "--label", "vg-ec",
             "--id", "e6").ok("certificate on the token")
    cert_uri = "pkcs11:token=keyx-a;object=vg-ec;type=cert"
    fp = vg.openssl("x509", "-noout", "-fingerprint", "-sha256", "-in", cert_uri).ok("x509 -in URI").out
    assert fp == plain("x509", "-noout", "-fingerprint", "-sha256", "-in", cert, env=kxutil.base_env()).out
    r = vg.openssl("storeutl", "-noout", "pkcs11:token=keyx-a").ok("storeutl, every kind")
    assert {"Pkey", "Public key", "Certificate"} <= set(re.findall(r"^\d+: (.*)$", r.out, re.M)), r
    r = vg.openssl("storeutl", "-noout", "-subject", "/CN=localhost", "pkcs11:token=keyx-a").ok("storeutl -subject")
    assert re.findall(r"^\d+: (.*)$", r.out, re.M) == ["Certificate"], r
    handshake(vg, tmp, env, ref, cert_uri)
    events = kxutil.read_audit(log)
    assert {e["event"] for e in events if e.get("backend") == "pkcs11" and e["ok"]} >= {
        "keygen", "derive", "sign", "decrypt"}


def test_valgrind_tpm(build, tmp_path_factory, tmp):
    from test_stress import make_tpm_key

    tpm = Swtpm(tmp_path_factory.mktemp("vg-swtpm")).start()
    try:
        base = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda"
        make_tpm_key(tpm, tmp, "rsa2048:null:null", f"decrypt|{base}", TPM_RSA)
        log = tmp / "audit.jsonl"
        cnf = tpm_cnf(tmp / "tpm.cnf", tpm, keyx={"audit-log": log})
        env = kxutil.base_env(OPENSSL_CONF=cnf)
        vg = VG(tmp, env)
        ref = tmp / "ec.ref.pem"
        vg.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt", "keyx-backend:tpm",
                   "-pkeyopt", f"keyx-persist:0x{TPM_GEN:08x}", "-out", ref).ok("genpkey in the TPM")
        assert "BEGIN KEYX KEY" in ref.read_text()
        check_flows(vg, tmp, ref, f"keyx:tpm:handle=0x{TPM_RSA:08x}",
                    store_uri=f"keyx:tpm:handle=0x{TPM_GEN:08x}")
        handshake(vg, tmp, env, ref, self_signed(tmp, env, ref))
        events = kxutil.read_audit(log)
        assert {e["event"] for e in events if e.get("backend") == "tpm" and e["ok"]} >= {
            "keygen", "derive", "sign", "decrypt"}
    finally:
        tpm.kill()
