"""Public keys and certificates by URI through keyx's STORE, beside the private keys.

A SoftHSM2 token of this module's own ("keyx-so", in its own token directory, so that the
session tokens whose objects other tests count are never touched) holds what an operator puts
there with pkcs11-tool: an EC P-256 and an RSA 2048 key pair (signing keys), the certificate of
each (written with `pkcs11-tool --write-object --type cert`, same label and id as its key) and a
CA certificate without a key. The certificates are issued by a CA of the default provider alone.
Everything keyx returns is checked against an independent source: the certificate files (their
fingerprints and DER, computed by the default provider), pkcs11-tool's reading of the public key
objects, the public keys in the certificates, pkcs11-tool's object listing for the counts, and
tpm2_readpublic for a persistent TPM key. A TLS server takes its certificate and its key from the
token by URI; a default-provider client verifies the chain.

`openssl storeutl` has no -pubkeys option (3.0 and 3.5): the application that asks for public
keys only (OSSL_STORE_expect(OSSL_STORE_INFO_PUBKEY)) is `openssl pkey -pubin` and a ctypes
program calling OSSL_STORE_expect itself. The errors of that expectation are read from the
program: OpenSSL 3.5's `pkey -pubin` tries the URI as a private key after a public key fails and
prints only that second attempt's error (and takes a private key's public part).
"""

import re
import shutil
import textwrap

import pytest

import kxutil
from fixture_softhsm import MODULE, PIN, SoftHSM
from fixture_swtpm import tpm_cnf

TOKEN = "keyx-so"
EMPTY_TOKEN = "keyx-so-empty"
ODD_TOKEN = "keyx-so-odd"  # a key pair on a curve keyx does not serve, and a certificate
TPM_HANDLE = 0x81000078  # no other test uses it on the session swtpm


class ObjectToken(SoftHSM):
    """Token keyx-so with two key pairs, their certificates and a CA certificate; keyx-so-empty
    with nothing."""

    def setup(self):
        self.init_tokens(TOKEN, EMPTY_TOKEN, ODD_TOKEN)
        d = self.root / "pki"
        d.mkdir()
        plain = kxutil.base_env()
        self.ca = d / "ca.pem"
        kxutil.openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                       "-keyout", d / "ca.key", "-out", self.ca, "-subj", "/CN=keyx store CA", "-days", "2",
                       *kxutil.CA_EXTENSIONS, env=plain).ok("CA")
        self.cert, self.pub = {}, {}
        for label, key_id, keytype, cn in (("srv", "01", "EC:prime256v1", "localhost"),
                                           ("srv-rsa", "02", "rsa:2048", "rsa.localhost")):
            self.tool(TOKEN, "--keypairgen", "--key-type", keytype, "--label", label, "--id", key_id,
                      "--usage-sign").ok("key pair")
            self.pub[label] = d / f"{label}.pub.der"
            self.tool(TOKEN, "--read-object", "--type", "pubkey", "--id", key_id,
                      "-o", self.pub[label]).ok("read pubkey")
            pem = d / f"{label}.pem"
            kxutil.openssl("x509", "-new", "-force_pubkey", self.pub[label], "-subj", f"/CN={cn}",
                           "-CA", self.ca, "-CAkey", d / "ca.key", "-days", "2", "-out", pem, env=plain).ok("issue")
            self.cert[label] = pem
            self.write_cert(label, key_id, pem)
        self.cert["ca"] = self.ca
        self.write_cert("ca", "03", self.ca)
        self.tool(ODD_TOKEN, "--keypairgen", "--key-type", "EC:secp256k1", "--label", "odd", "--id", "09",
                  "--usage-sign").ok("secp256k1 key pair")
        self.write_cert("ca", "03", self.ca, token=ODD_TOKEN)
        return self

    def write_cert(self, label, key_id, pem, token=TOKEN):
        der = pem.with_suffix(".der")
        kxutil.openssl("x509", "-in", pem, "-outform", "DER", "-out", der, env=kxutil.base_env()).ok("DER")
        self.tool(token, "--write-object", der, "--type", "cert", "--label", label, "--id", key_id).ok("write cert")

    def kinds(self, token=TOKEN):
        """pkcs11-tool's count of the token's objects per kind."""
        out = self.tool(token, "--list-objects").ok("list").out
        return {k: len(re.findall(rf"^{k} Object", out, re.M)) for k in ("Private Key", "Public Key", "Certificate")}


@pytest.fixture(scope="module")
def hsm(tmp_path_factory, build):
    for tool in ("softhsm2-util", "pkcs11-tool"):
        assert shutil.which(tool), f"{tool} not found: install softhsm2 and opensc (scripts/test.sh does)"
    assert MODULE.exists(), f"SoftHSM2 module {MODULE} not found: install softhsm2"
    return ObjectToken(tmp_path_factory.mktemp("softhsm-so")).setup()


def keyx_env(hsm, cnf, tmp, pin=True):
    log = tmp / "audit.jsonl"
    settings = hsm.keyx_settings(tokens=(TOKEN,), **{"audit-log": log})
    if not pin:
        del settings["pkcs11-pin"]
    # groups: the TLS Groups line OpenSSL 3.5 needs with backends = pkcs11 (docs/tls-servers.md)
    return hsm.env(OPENSSL_CONF=cnf(keyx=settings, name="pin.cnf" if pin else "nopin.cnf", groups="auto"))


def plain():
    """The default provider alone: the independent side."""
    return kxutil.base_env()


def uri(obj=None, kind=None, token=TOKEN, key_id=None):
    u = f"pkcs11:token={token}"
    if obj:
        u += f";object={obj}"
    if key_id:
        u += f";id={key_id}"
    if kind:
        u += f";type={kind}"
    return u


def fingerprint(args, env):
    r = kxutil.openssl("x509", *args, "-noout", "-fingerprint", "-sha256", env=env).ok("fingerprint")
    m = re.search(r"Fingerprint=([0-9A-F:]+)", r.out)
    assert m, r
    return m.group(1)


def der_of(pem_text, kind, tmp):
    """The DER of each PEM block of kind ('CERTIFICATE', 'PUBLIC KEY') in storeutl's output,
    decoded by the default provider."""
    out = []
    blocks = re.findall(rf"-----BEGIN {kind}-----\n.*?-----END {kind}-----\n", pem_text, re.S)
    for i, block in enumerate(blocks):
        f = tmp / f"block{i}.pem"
        f.write_text(block)
        cmd = ("x509", "-in", f) if kind == "CERTIFICATE" else ("pkey", "-pubin", "-in", f)
        out.append(kxutil.openssl(*cmd, "-outform", "DER", env=plain(), text=False).ok("decode").out)
    return out


def file_der(path):
    return kxutil.openssl("x509", "-in", path, "-outform", "DER", env=plain(), text=False).ok("der").out


def cert_pub_der(path):
    """The public key in a certificate file, read by the default provider."""
    pem = kxutil.openssl("x509", "-in", path, "-noout", "-pubkey", env=plain()).ok("pubkey").out
    return kxutil.run(["openssl", "pkey", "-pubin", "-outform", "DER"], env=plain(), input=pem.encode(),
                      text=False).ok("pub der").out


def listed(r):
    """storeutl's listing: the object kinds in order ('Pkey', 'Public key', 'Certificate')."""
    kinds = re.findall(r"^\d+: (.*)$", r.out, re.M)
    m = re.search(r"^Total found: (\d+)$", r.out, re.M)
    # 3.0 always prints the total, 3.5 only when it found something
    assert (m and int(m.group(1)) == len(kinds)) or (not m and not kinds), r
    return kinds


def check_error(r, *needles):
    text = r.out + r.err
    assert r.rc not in (0, -11, -6) and r.rc > 0, f"expected a clean failure:\n{r!r}"
    for n in needles:
        assert n in text, f"error does not say {n!r}:\n{r!r}"
    assert PIN not in text, f"the PIN appears in the output:\n{r!r}"


# ---- certificates and public keys by URI -----------------------------------------------------


@pytest.mark.parametrize("label,key_id", [("srv", "01"), ("srv-rsa", "02"), ("ca", "03")])
def test_certificate_by_uri_is_the_file_written_to_the_token(hsm, cnf, tmp, label, key_id):
    env = keyx_env(hsm, cnf, tmp)
    want = fingerprint(("-in", hsm.cert[label]), plain())
    for u in (uri(label, "cert"), uri(kind="cert", key_id=f"%{key_id}"), "keyx:" + uri(label, "cert")):
        assert fingerprint(("-in", u), env) == want, u
    der = kxutil.openssl("x509", "-in", uri(label, "cert"), "-outform", "DER", env=env, text=False).ok("der").out
    assert der == file_der(hsm.cert[label])


@pytest.mark.parametrize("label", ["srv", "srv-rsa"])
def test_public_key_by_uri_is_the_tokens_and_the_certificates(hsm, cnf, tmp, label):
    env = keyx_env(hsm, cnf, tmp)
    der = kxutil.openssl("pkey", "-pubin", "-in", uri(label, "public"), "-outform", "DER", env=env,
                         text=False).ok("pkey -pubin").out
    assert der == hsm.pub[label].read_bytes(), "not the public key pkcs11-tool reads from the token"
    assert der == cert_pub_der(hsm.cert[label]), "not the public key of the key's certificate"
    # the private key of the same name still loads by reference, and has that public key
    priv = kxutil.openssl("pkey", "-in", uri(label, "private"), "-pubout", "-outform", "DER", env=env,
                          text=False).ok("pkey -pubout").out
    assert priv == der


def test_a_uri_without_type_gives_the_key_pair_and_its_certificate(hsm, cnf, tmp):
    env = keyx_env(hsm, cnf, tmp)
    r = kxutil.openssl("storeutl", uri("srv"), env=env).ok("storeutl")
    assert listed(r) == ["Pkey", "Public key", "Certificate"], r.out
    assert der_of(r.out, "PUBLIC KEY", tmp) == [hsm.pub["srv"].read_bytes()]
    assert der_of(r.out, "CERTIFICATE", tmp) == [file_der(hsm.cert["srv"])]
    # the private key is a reference to the token key, never its value
    assert "-----BEGIN KEYX KEY-----" in r.out and "PRIVATE KEY-----" not in r.out
    # applications asking for one kind get that kind from the same URI
    assert fingerprint(("-in", uri("srv")), env) == fingerprint(("-in", hsm.cert["srv"]), plain())
    der = kxutil.openssl("pkey", "-pubin", "-in", uri("srv"), "-outform", "DER", env=env, text=False).ok("pubin").out
    assert der == hsm.pub["srv"].read_bytes()
    ref = kxutil.openssl("pkey", "-in", uri("srv"), env=env).ok("pkey").out
    assert ref.startswith("-----BEGIN KEYX KEY-----"), ref


def test_storeutl_counts_every_kind_on_the_token(hsm, cnf, tmp):
    env = keyx_env(hsm, cnf, tmp)
    n = hsm.kinds()
    assert n == {"Private Key": 2, "Public Key": 2, "Certificate": 3}, n
    r = kxutil.openssl("storeutl", uri(), env=env).ok("storeutl")
    assert listed(r) == ["Pkey"] * 2 + ["Public key"] * 2 + ["Certificate"] * 3, r.out
    assert sorted(der_of(r.out, "PUBLIC KEY", tmp)) == sorted(p.read_bytes() for p in hsm.pub.values())
    assert sorted(der_of(r.out, "CERTIFICATE", tmp)) == sorted(file_der(c) for c in hsm.cert.values())

    r = kxutil.openssl("storeutl", "-certs", uri(), env=env).ok("storeutl -certs")
    assert listed(r) == ["Certificate"] * 3, r.out
    assert sorted(der_of(r.out, "CERTIFICATE", tmp)) == sorted(file_der(c) for c in hsm.cert.values())
    r = kxutil.openssl("storeutl", "-keys", uri(), env=env).ok("storeutl -keys")
    assert listed(r) == ["Pkey"] * 2, r.out
    # type= narrows a token listing too
    assert listed(kxutil.openssl("storeutl", uri(kind="public"), env=env).ok("public")) == ["Public key"] * 2
    assert listed(kxutil.openssl("storeutl", uri(kind="cert"), env=env).ok("cert")) == ["Certificate"] * 3
    # an empty token: nothing, and no error
    r = kxutil.openssl("storeutl", uri(token=EMPTY_TOKEN), env=keyx_env_for(hsm, cnf, EMPTY_TOKEN)).ok("empty")
    assert listed(r) == [] and "error" not in r.err.lower(), r


def test_objects_keyx_cannot_read_are_passed_over(hsm, cnf, tmp):
    """A key pair on secp256k1 (keyx serves P-256/384/521) beside a certificate: the listing
    gives the certificate, without an error for the key pair pkcs11-tool lists."""
    assert hsm.kinds(ODD_TOKEN) == {"Private Key": 1, "Public Key": 1, "Certificate": 1}
    r = kxutil.openssl("storeutl", uri(token=ODD_TOKEN), env=keyx_env_for(hsm, cnf, ODD_TOKEN)).ok("storeutl")
    assert listed(r) == ["Certificate"] and "error" not in r.err.lower(), r
    assert der_of(r.out, "CERTIFICATE", tmp) == [file_der(hsm.ca)]


def keyx_env_for(hsm, cnf, token):
    return hsm.env(OPENSSL_CONF=cnf(keyx=hsm.keyx_settings(tokens=(token,)), name=f"{token}.cnf"))


@pytest.mark.parametrize("subject,label", [("/CN=localhost", "srv"), ("/CN=rsa.localhost", "srv-rsa"),
                                           ("/CN=keyx store CA", "ca"), ("/CN=nobody", None)])
def test_storeutl_subject_finds_the_certificate_of_that_subject(hsm, cnf, tmp, subject, label):
    env = keyx_env(hsm, cnf, tmp)
    for opts in ((), ("-certs",)):
        r = kxutil.openssl("storeutl", *opts, "-subject", subject, uri(), env=env).ok("storeutl -subject")
        if label is None:
            assert listed(r) == [], r.out
            continue
        assert listed(r) == ["Certificate"], r.out
        assert der_of(r.out, "CERTIFICATE", tmp) == [file_der(hsm.cert[label])]


# What OSSL_STORE_expect asks for is what comes back, counted by a program that sets it itself
# (storeutl has no -pubkeys). Types: OSSL_STORE_INFO_PKEY 4, PUBKEY 3, CERT 5.
EXPECT_APP = textwrap.dedent(r"""
    import ctypes, sys
    from ctypes import c_void_p, c_char_p, c_int
    L = ctypes.CDLL("libcrypto.so.3")
    def fn(name, res, *args):
        f = getattr(L, name); f.restype = res; f.argtypes = list(args); return f
    open_ex = fn("OSSL_STORE_open_ex", c_void_p, c_char_p, c_void_p, c_char_p, c_void_p, c_void_p,
                 c_void_p, c_void_p, c_void_p)
    expect = fn("OSSL_STORE_expect", c_int, c_void_p, c_int)
    load = fn("OSSL_STORE_load", c_void_p, c_void_p)
    eof = fn("OSSL_STORE_eof", c_int, c_void_p)
    info_type = fn("OSSL_STORE_INFO_get_type", c_int, c_void_p)
    info_free = fn("OSSL_STORE_INFO_free", None, c_void_p)
    close = fn("OSSL_STORE_close", c_int, c_void_p)
    print_errors = fn("ERR_print_errors_fp", None, c_void_p)
    stderr = c_void_p.in_dll(ctypes.CDLL(None), "stderr")
    uri, want = sys.argv[1].encode(), int(sys.argv[2])
    ctx = open_ex(uri, None, None, None, None, None, None, None)
    assert ctx and expect(ctx, want) == 1
    got = []
    while not eof(ctx):
        info = load(ctx)
        if info:
            got.append(info_type(info))
            info_free(info)
    close(ctx)
    print(" ".join(map(str, got)))
    sys.stdout.flush()
    print_errors(stderr)
""")


def expect_app(env, u, expect):
    """Runs EXPECT_APP: (the OSSL_STORE_INFO types it got, its error output)."""
    r = kxutil.run(["/usr/bin/python3", "-c", EXPECT_APP, u, str(expect)], env=env)
    assert r.rc == 0, r
    return [int(t) for t in r.out.split()], r.err


@pytest.mark.parametrize("expect,want", [(3, "Public Key"), (4, "Private Key"), (5, "Certificate")])
def test_ossl_store_expect_gives_that_kind_only(hsm, cnf, tmp, expect, want):
    env = keyx_env(hsm, cnf, tmp)
    got, err = expect_app(env, uri(), expect)
    assert got == [expect] * hsm.kinds()[want] and "error" not in err, (got, err)


# ---- PINs: public objects need none ----------------------------------------------------------


def test_public_objects_and_certificates_load_without_a_pin(hsm, cnf, tmp):
    env = keyx_env(hsm, cnf, tmp, pin=False)
    assert fingerprint(("-in", uri("srv", "cert")), env) == fingerprint(("-in", hsm.cert["srv"]), plain())
    der = kxutil.openssl("pkey", "-pubin", "-in", uri("srv", "public"), "-outform", "DER", env=env,
                         text=False).ok("pubin").out
    assert der == hsm.pub["srv"].read_bytes()
    # without a login the private keys are not seen; the rest is listed without an error
    r = kxutil.openssl("storeutl", uri(), env=env).ok("storeutl without PIN")
    assert listed(r) == ["Public key"] * 2 + ["Certificate"] * 3, r.out
    # a private key still needs the PIN, and says so
    check_error(kxutil.openssl("pkey", "-in", uri("srv", "private"), env=env), "needs a login", "pkcs11-pin")
    # (storeutl reports load errors and exits 0)
    r = kxutil.openssl("storeutl", "-keys", uri(), env=env)
    assert listed(r) == [] and "needs a login" in r.err and PIN not in r.out + r.err, r


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needles", [
    (("pkeyutl", "-derive", "-inkey", uri("srv", "public"), "-peerkey", "PEER"),
     ["names a public key object", "type=private"]),
    (("x509", "-noout", "-in", uri("srv", "private")), ["names a private key object", "type=cert"]),
    (("x509", "-noout", "-in", uri("nothing", "cert")), ["nothing matches", "object=nothing"]),
    (("pkey", "-noout", "-in", uri("nothing")), ["no key matches", "object=nothing"]),
    (("x509", "-noout", "-in", uri("srv", "data")), ["names neither keys nor certificates"]),
    (("x509", "-noout", "-in", uri(token="no-such-token", kind="cert")), ["no token matches"]),
])
def test_wrong_or_missing_objects_are_clear_errors(hsm, cnf, tmp, args, needles):
    env = keyx_env(hsm, cnf, tmp)
    args = [str(hsm.pub["srv"]) if a == "PEER" else a for a in args]
    if "-peerkey" in args:
        args += ["-peerform", "DER"]
    check_error(kxutil.openssl(*args, env=env), *needles)


@pytest.mark.parametrize("u,needles", [
    (uri("srv", "cert"), ["names a certificate object", "a public key is asked for", "type=public"]),
    (uri("srv", "private"), ["names a private key object", "a public key is asked for", "-pubout"]),
    (uri("nothing", "public"), ["nothing matches", "object=nothing", "public keys"]),
])
def test_asking_for_a_public_key_of_the_wrong_uri_is_a_clear_error(hsm, cnf, tmp, u, needles):
    got, err = expect_app(keyx_env(hsm, cnf, tmp), u, 3)
    assert got == [], got
    for n in needles:
        assert n in err, f"error does not say {n!r}:\n{err}"
    assert PIN not in err


# ---- a TLS server with its certificate and key on the token -----------------------------------


@pytest.mark.parametrize("label,version", [("srv", "-tls1_3"), ("srv", "-tls1_2"), ("srv-rsa", "-tls1_3")])
def test_tls_server_takes_certificate_and_key_by_uri(hsm, cnf, tmp, s_server, s_client, label, version):
    env = keyx_env(hsm, cnf, tmp)
    srv = s_server(["-cert", uri(label, "cert"), "-key", uri(label, "private")], env)
    host = "localhost" if label == "srv" else "rsa.localhost"
    cli = s_client(srv.port, [version, "-CAfile", hsm.ca, "-verify_return_error", "-verify_hostname", host],
                   plain())
    out = srv.wait()
    assert cli.rc == 0, f"handshake failed:\n{cli!r}\n--- server ---\n{out}"
    assert "Verify return code: 0 (ok)" in cli.out, cli
    assert kxutil.protocol(cli.out) == ("TLSv1.3" if version == "-tls1_3" else "TLSv1.2"), cli
    # the certificate the client got is the one on the token
    served = re.search(r"-----BEGIN CERTIFICATE-----\n.*?-----END CERTIFICATE-----\n", cli.out, re.S)
    assert served, cli.out
    (tmp / "served.pem").write_text(served.group(0))
    assert file_der(tmp / "served.pem") == file_der(hsm.cert[label])
    # and the handshake was signed on the token
    signs = [e for e in kxutil.read_audit(tmp / "audit.jsonl") if e["event"] == "sign" and e["pid"] == srv.pid]
    assert signs and all(e["ok"] and e["backend"] == "pkcs11" for e in signs), signs


# ---- TPM: a persistent handle gives its public key -------------------------------------------


def make_persistent(tpm, d, handle):
    """An ECC P-256 decrypt key under the owner SRK, evicted to handle (once per swtpm)."""
    if f"0x{handle:x}" in tpm.tools("tpm2_getcap", "handles-persistent").out.lower():
        return
    tpm.flush_transient()
    tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256", "-c", d / "prim.ctx")
    tpm.flush_transient()
    tpm.tools("tpm2_create", "-Q", "-C", d / "prim.ctx", "-G", "ecc256:null", "-a",
              "decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
              "-u", d / "key.pub", "-r", d / "key.priv")
    tpm.flush_transient()
    tpm.tools("tpm2_load", "-Q", "-C", d / "prim.ctx", "-u", d / "key.pub", "-r", d / "key.priv",
              "-c", d / "key.ctx")
    tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", d / "key.ctx", f"0x{handle:x}")
    tpm.flush_transient()


def test_tpm_handle_gives_its_public_key(swtpm, tmp):
    make_persistent(swtpm, tmp, TPM_HANDLE)
    env = kxutil.base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm))
    u = f"keyx:tpm:handle=0x{TPM_HANDLE:08x}"
    theirs = tmp / "tpm-pub.pem"
    swtpm.tools("tpm2_readpublic", "-c", f"0x{TPM_HANDLE:x}", "-f", "pem", "-o", theirs)
    ours = kxutil.openssl("pkey", "-pubin", "-in", u, env=env).ok("pkey -pubin").out
    assert ours == theirs.read_text(), "not the public key tpm2_readpublic reads"
    r = kxutil.openssl("storeutl", u, env=env).ok("storeutl")
    assert listed(r) == ["Pkey", "Public key"], r.out
    assert re.search(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----\n", r.out, re.S).group(0) == ours
    assert listed(kxutil.openssl("storeutl", "-keys", u, env=env).ok("-keys")) == ["Pkey"]
    check_error(kxutil.openssl("x509", "-noout", "-in", u, env=env), "names a key pair object",
                "a TPM key URI names a key pair only")
    # the key stays where it is
    assert f"0x{TPM_HANDLE:x}" in swtpm.tools("tpm2_getcap", "handles-persistent").out.lower()
