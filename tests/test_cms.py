"""CMS and S/MIME to EC and DH recipients: key agreement with the exchange's KDF.

CMS key agreement (RFC 5753 ECDH, RFC 2631 DH) asks the key exchange for X9.63 (ECDH,
`kdf-type` X963KDF) or X9.42 (DH, X942KDF-ASN1 with `cekalg`) with a digest, an output length
and the message's UKM. keyx computes Z in the backend that holds the key and runs the KDF in its
own library context. Every round trip has the default provider alone on the other side:

- a default-provider sender (`openssl cms -encrypt`, DER and S/MIME output) to a recipient whose
  key keyx holds: in software (PEM file), in the TPM (key reference file of `genpkey
  -pkeyopt keyx-persist:`) and on a token (pkcs11-tool's key by URI), with several KDF digests;
- keyx as the sender (derive and KDF; `backends` software, tpm or pkcs11) to a default-provider
  recipient;
- the exchange's KDF parameters through EVP (keyx-test-derive kdf): the same bytes as the default
  provider's exchange on the same keys, read back the same, refused with keyx's own texts.

The certificates are made by a default-provider CA around the recipient's public key. keyx's
audit log shows where each derive ran. DH: CMS wants X9.42 ("DHX") recipient keys, which keyx
serves beside PKCS#3 DH keys: in software and on the token (named by its key reference file).
"""

import os
import re
import shutil

import pytest

import kxutil
from fixture_softhsm import MODULE, SoftHSM
from fixture_swtpm import Swtpm, tpm_cnf
from kxutil import base_env, openssl

TOKEN = "keyx-cms"
CURVES = ("P-256", "P-384", "P-521")
# The KDF digest a sender may choose (`-keyopt ecdh_kdf_md:`); CMS's default is SHA-1.
KDF_DIGESTS = (None, "sha256", "sha384", "sha512")


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    """A default-provider CA that certifies the recipients' public keys."""
    d = tmp_path_factory.mktemp("cms-ca")
    key, crt = d / "ca.key", d / "ca.crt"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", crt, "-subj", "/CN=keyx CMS test CA", "-days", "2",
            *kxutil.CA_EXTENSIONS, env=base_env()).ok("CA")
    return d, key, crt


def certify(ca, pub, name, inform="PEM"):
    """A certificate for the public key in pub (default provider only)."""
    d, cakey, cacrt = ca
    if inform != "PEM":
        pem = d / f"{name}.pub"
        openssl("pkey", "-pubin", "-inform", inform, "-in", pub, "-out", pem, env=base_env()).ok("pub to PEM")
        pub = pem
    crt = d / f"{name}.crt"
    openssl("x509", "-new", "-force_pubkey", pub, "-subj", f"/CN={name}", "-CA", cacrt, "-CAkey", cakey,
            "-days", "2", "-out", crt, env=base_env()).ok("certificate")
    return crt


class CmsToken(SoftHSM):
    """A SoftHSM2 token directory of this module's own with one token, keyx-cms (the session's
    keyx-a/keyx-b, whose objects other tests count, are never touched)."""

    def setup(self):
        return self.init_tokens(TOKEN)


@pytest.fixture(scope="module")
def hsm(tmp_path_factory, build):
    for tool in ("softhsm2-util", "pkcs11-tool"):
        assert shutil.which(tool), f"{tool} not found: install softhsm2 and opensc (scripts/test.sh does)"
    assert MODULE.exists(), f"SoftHSM2 module {MODULE} not found: install softhsm2"
    return CmsToken(tmp_path_factory.mktemp("softhsm-cms")).setup()


@pytest.fixture(scope="module")
def tpm(tmp_path_factory):
    t = Swtpm(tmp_path_factory.mktemp("swtpm-cms")).start()
    yield t
    t.kill()


def keyx_env(tmp, log, backends="software", tpm=None, hsm=None):
    """keyx preferred (default_properties ?provider=keyx) with the given backends."""
    opts = {"audit-log": log}
    if hsm is not None:
        opts.update(hsm.keyx_settings(tokens=(TOKEN,), backends=backends))
        return hsm.env(OPENSSL_CONF=kxutil.write_cnf(tmp / "keyx.cnf", keyx=opts))
    if tpm is not None:
        return base_env(OPENSSL_CONF=tpm_cnf(tmp / "keyx.cnf", tpm, keyx={**opts, "backends": backends}))
    opts["backends"] = backends
    return base_env(OPENSSL_CONF=kxutil.write_cnf(tmp / "keyx.cnf", keyx=opts))


def events(log, event):
    evs = kxutil.read_audit(log)
    kxutil.check_audit_schema(evs)
    return [e for e in evs if e["event"] == event]


# ---- the openssl cms round trip -----------------------------------------------------------------


def message(tmp):
    m = tmp / "message.bin"
    m.write_bytes(b"keyx CMS test\r\n" + os.urandom(200))
    return m


def encrypt(env, tmp, crt, msg, form="DER", kdf_md=None, keyopts=()):
    out = tmp / f"enc.{form.lower()}"
    args = ["cms", "-encrypt", "-binary", "-in", msg, "-out", out, "-outform", form, "-aes-256-cbc",
            "-recip", crt]
    if kdf_md:
        args += ["-keyopt", f"ecdh_kdf_md:{kdf_md}"]
    for o in keyopts:
        args += ["-keyopt", o]
    r = openssl(*args, env=env)
    assert r.rc == 0, f"cms -encrypt failed:\n{r!r}"
    return out


def decrypt(env, tmp, enc, crt, key, form="DER"):
    out = tmp / "dec.bin"
    if out.exists():
        out.unlink()
    r = openssl("cms", "-decrypt", "-binary", "-in", enc, "-inform", form, "-recip", crt, "-inkey", key,
                "-out", out, env=env)
    assert r.rc == 0, f"cms -decrypt failed:\n{r!r}"
    return out.read_bytes()


def kdf_scheme(tmp, enc, form="DER"):
    """The key agreement scheme the message names (which tells the recipient the KDF digest)."""
    r = openssl("cms", "-cmsout", "-print", "-in", enc, "-inform", form, env=base_env()).ok("cms -print")
    m = re.search(r"keyEncryptionAlgorithm:\s*\n\s*algorithm: (\S+)", r.out)
    assert m, f"no key agreement algorithm in:\n{r.out[:2000]}"
    return m.group(1)


def check_derives(log, backend, n=1):
    """Exactly n derives, all by keyx in `backend`, all ok."""
    ds = events(log, "derive")
    assert len(ds) == n and all(e["ok"] and e["backend"] == backend for e in ds), ds
    return ds


# ---- software keys --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sw_recipients(ca, tmp_path_factory):
    """Per curve: a default-provider key pair (PEM) and its certificate."""
    d = tmp_path_factory.mktemp("cms-sw")
    out = {}
    for curve in CURVES:
        key, pub = d / f"{curve}.key", d / f"{curve}.pub"
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", f"group:{curve}", "-out", key, env=base_env()).ok()
        openssl("pkey", "-in", key, "-pubout", "-out", pub, env=base_env()).ok()
        out[curve] = (key, certify(ca, pub, f"sw-{curve}"))
    return out


@pytest.mark.parametrize("curve", CURVES)
@pytest.mark.parametrize("kdf_md", KDF_DIGESTS)
def test_default_sender_to_keyx_software_recipient(tmp, sw_recipients, curve, kdf_md):
    key, crt = sw_recipients[curve]
    msg, log = message(tmp), tmp / "audit.jsonl"
    enc = encrypt(base_env(), tmp, crt, msg, kdf_md=kdf_md)
    assert kdf_scheme(tmp, enc).startswith(f"dhSinglePass-stdDH-{kdf_md or 'sha1'}kdf-scheme")
    assert decrypt(keyx_env(tmp, log), tmp, enc, crt, key) == msg.read_bytes()
    check_derives(log, "software")


def check_sender(log):
    """What keyx does as a CMS sender: CMS makes the ephemeral key from the recipient
    certificate's public key, which the default provider decoded, so the default provider
    generates it (no keyx keygen); keyx's exchange then imports it (a software key: a `load`,
    not ephemeral) and derives and runs the KDF."""
    assert not events(log, "keygen"), kxutil.read_audit(log)
    (load,) = events(log, "load")
    assert load["backend"] == "software" and not load["ephemeral"], load
    check_derives(log, "software")


@pytest.mark.parametrize("curve", CURVES)
def test_keyx_sender_to_default_recipient(tmp, sw_recipients, curve):
    """keyx derives and applies the KDF for the sender; the default provider alone decrypts."""
    key, crt = sw_recipients[curve]
    msg, log = message(tmp), tmp / "audit.jsonl"
    enc = encrypt(keyx_env(tmp, log), tmp, crt, msg, kdf_md="sha256")
    check_sender(log)
    assert decrypt(base_env(), tmp, enc, crt, key) == msg.read_bytes()


@pytest.mark.parametrize("sender", ("default", "keyx"))
def test_cofactor_dh_scheme(tmp, sw_recipients, sender):
    """`ecdh_cofactor_mode:1` makes CMS name the cofactorDH scheme; the recipient sets the mode
    from the message. On the NIST curves (cofactor 1) Z is the same."""
    key, crt = sw_recipients["P-384"]
    msg, log = message(tmp), tmp / "audit.jsonl"
    kenv = keyx_env(tmp, log)
    enc = encrypt(kenv if sender == "keyx" else base_env(), tmp, crt, msg, kdf_md="sha256",
                  keyopts=("ecdh_cofactor_mode:1",))
    assert kdf_scheme(tmp, enc) == "dhSinglePass-cofactorDH-sha256kdf-scheme"
    assert decrypt(base_env() if sender == "keyx" else kenv, tmp, enc, crt, key) == msg.read_bytes()
    check_derives(log, "software")


@pytest.mark.parametrize("sender", ("default", "keyx"))
def test_smime_format_round_trip(tmp, sw_recipients, sender):
    """S/MIME: the MIME form of the same CMS message (`-outform SMIME`), keyx on one side."""
    key, crt = sw_recipients["P-256"]
    msg, log = message(tmp), tmp / "audit.jsonl"
    kenv = keyx_env(tmp, log)
    enc = encrypt(kenv if sender == "keyx" else base_env(), tmp, crt, msg, form="SMIME", kdf_md="sha256")
    assert enc.read_bytes().startswith(b"MIME-Version: 1.0"), enc.read_bytes()[:200]
    got = decrypt(base_env() if sender == "keyx" else kenv, tmp, enc, crt, key, form="SMIME")
    assert got == msg.read_bytes()
    check_derives(log, "software")


def test_openssl_smime_command_has_no_ec_recipients(tmp, sw_recipients):
    """`openssl smime` writes PKCS#7, which has key transport only: it refuses an EC recipient
    in the default provider alone, and the same with keyx preferred (S/MIME to EC recipients is
    `openssl cms`, above)."""
    _, crt = sw_recipients["P-256"]
    msg = message(tmp)
    for env in (base_env(), keyx_env(tmp, tmp / "audit.jsonl")):
        r = openssl("smime", "-encrypt", "-binary", "-in", msg, "-out", tmp / "p7.msg", "-aes256", crt, env=env)
        assert r.rc != 0 and "encryption not supported for this key type" in r.err, r


# ---- TPM keys -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tpm_recipients(tpm, ca, tmp_path_factory):
    """Per curve (P-256, P-384): a persistent TPM key made by `genpkey -pkeyopt keyx-persist:`,
    its key reference file and a certificate for the public key keyx exports."""
    d = tmp_path_factory.mktemp("cms-tpm")
    env = keyx_env(d, d / "audit.jsonl", backends="tpm", tpm=tpm)
    out = {}
    for curve, handle in (("P-256", 0x81000070), ("P-384", 0x81000071)):
        ref, pub = d / f"tpm-{curve}.pem", d / f"tpm-{curve}.pub"
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", f"group:{curve}", "-pkeyopt", "keyx-backend:tpm",
                "-pkeyopt", f"keyx-persist:0x{handle:08x}", "-out", ref, env=env).ok("genpkey keyx-persist")
        assert ref.read_text().startswith("-----BEGIN KEYX KEY-----")
        openssl("pkey", "-in", ref, "-pubout", "-out", pub, env=env).ok("TPM public key")
        out[curve] = (ref, certify(ca, pub, f"tpm-{curve}"))
    return out


@pytest.mark.parametrize("curve,kdf_md", (("P-256", None), ("P-256", "sha256"), ("P-384", "sha384")))
@pytest.mark.parametrize("form", ("DER", "SMIME"))
def test_default_sender_to_tpm_recipient(tpm, tmp, tpm_recipients, curve, kdf_md, form):
    """The recipient's key never leaves the TPM: Z comes from TPM2_ECDH_ZGen (the derive event in
    the tpm backend), the KDF runs in keyx."""
    ref, crt = tpm_recipients[curve]
    msg, log = message(tmp), tmp / "audit.jsonl"
    enc = encrypt(base_env(), tmp, crt, msg, form=form, kdf_md=kdf_md)
    assert decrypt(keyx_env(tmp, log, backends="tpm", tpm=tpm), tmp, enc, crt, ref, form=form) == msg.read_bytes()
    check_derives(log, "tpm")


def test_keyx_sender_with_tpm_backend_to_default_recipient(tpm, tmp, sw_recipients):
    """With `backends = tpm` the sender works too; its ephemeral key is the default provider's
    (see check_sender), imported into keyx as a software key, so the derive runs in software."""
    key, crt = sw_recipients["P-256"]
    msg, log = message(tmp), tmp / "audit.jsonl"
    enc = encrypt(keyx_env(tmp, log, backends="tpm", tpm=tpm), tmp, crt, msg, kdf_md="sha256")
    check_sender(log)
    assert decrypt(base_env(), tmp, enc, crt, key) == msg.read_bytes()


# ---- token keys -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_recipients(hsm, ca, tmp_path_factory):
    """Per curve (P-256, P-521): a derive key pair made on the token by pkcs11-tool, as an
    operator would, its URI and a certificate for the public key pkcs11-tool reads."""
    d = tmp_path_factory.mktemp("cms-token")
    out = {}
    # P-521, not P-384: Debian 12's pkcs11-tool cannot read a P-384 public key ("cannot create
    # EVP_PKEY"), and the certificate must hold the public key as the token reports it.
    for curve, spec, kid in (("P-256", "EC:prime256v1", "c1"), ("P-521", "EC:secp521r1", "c2")):
        hsm.tool(TOKEN, "--keypairgen", "--key-type", spec, "--label", f"cms-{curve}", "--id", kid,
                 "--usage-derive").ok("token EC key")
        der = d / f"tok-{curve}.der"
        hsm.tool(TOKEN, "--read-object", "--type", "pubkey", "--id", kid, "-o", der).ok("read pubkey")
        out[curve] = (f"pkcs11:token={TOKEN};object=cms-{curve};type=private",
                      certify(ca, der, f"tok-{curve}", inform="DER"))
    return out


@pytest.mark.parametrize("curve,kdf_md", (("P-256", None), ("P-256", "sha256"), ("P-521", "sha512")))
@pytest.mark.parametrize("form", ("DER", "SMIME"))
def test_default_sender_to_token_recipient(hsm, tmp, token_recipients, curve, kdf_md, form):
    uri, crt = token_recipients[curve]
    msg, log = message(tmp), tmp / "audit.jsonl"
    enc = encrypt(base_env(), tmp, crt, msg, form=form, kdf_md=kdf_md)
    env = keyx_env(tmp, log, backends="pkcs11", hsm=hsm)
    assert decrypt(env, tmp, enc, crt, uri, form=form) == msg.read_bytes()
    check_derives(log, "pkcs11")


def test_keyx_sender_with_pkcs11_backend_to_default_recipient(hsm, tmp, sw_recipients):
    """As with the TPM: the sender's ephemeral key is imported into keyx's software backend."""
    key, crt = sw_recipients["P-384"]
    msg, log = message(tmp), tmp / "audit.jsonl"
    enc = encrypt(keyx_env(tmp, log, backends="pkcs11", hsm=hsm), tmp, crt, msg, kdf_md="sha384")
    check_sender(log)
    assert decrypt(base_env(), tmp, enc, crt, key) == msg.read_bytes()


# ---- DH ---------------------------------------------------------------------------------------------


# CMS DH takes X9.42 ("DHX", dhpublicnumber) keys only: p, q and g. Two kinds of parameters: RFC
# 7919's ffdhe2048 with its q, and explicit FIPS 186-4 parameters with a 224-bit q.
DHX_KINDS = ("ffdhe2048", "explicit")


def dhx_params(d, kind):
    params = d / f"dhx-{kind}.param"
    opts = (("dh_paramgen_type:2", "group:ffdhe2048") if kind == "ffdhe2048"
            else ("dh_paramgen_prime_len:2048", "dh_paramgen_subprime_len:224"))
    openssl("genpkey", "-genparam", "-algorithm", "DHX", *[a for o in opts for a in ("-pkeyopt", o)],
            "-out", params, env=base_env()).ok("DHX parameters")
    assert params.read_text().startswith("-----BEGIN X9.42 DH PARAMETERS-----")
    return params


@pytest.fixture(scope="module")
def dhx_recipients(ca, tmp_path_factory):
    """Per kind: a default-provider DHX key pair (PEM) and its certificate."""
    d = tmp_path_factory.mktemp("cms-dhx")
    out = {}
    for kind in DHX_KINDS:
        key, pub = d / f"dhx-{kind}.key", d / f"dhx-{kind}.pub"
        openssl("genpkey", "-paramfile", dhx_params(d, kind), "-out", key, env=base_env()).ok("DHX key")
        openssl("pkey", "-in", key, "-pubout", "-out", pub, env=base_env()).ok("DHX public key")
        out[kind] = (key, certify(ca, pub, f"dhx-{kind}"))
    return out


def check_dh_derives(log, backend):
    (d,) = check_derives(log, backend)
    assert d["alg"] == "DHX", d


@pytest.mark.parametrize("kind", DHX_KINDS)
@pytest.mark.parametrize("form", ("DER", "SMIME"))
def test_default_sender_to_keyx_dhx_recipient(tmp, dhx_recipients, kind, form):
    """keyx serves X9.42 keys as the default provider does: the recipient's PEM key is read into
    keyx, Z and the X9.42 KDF (id-smime-alg-ESDH) run there."""
    key, crt = dhx_recipients[kind]
    msg, log = message(tmp), tmp / "audit.jsonl"
    enc = encrypt(base_env(), tmp, crt, msg, form=form)
    assert kdf_scheme(tmp, enc, form=form) == "id-smime-alg-ESDH"
    assert decrypt(keyx_env(tmp, log), tmp, enc, crt, key, form=form) == msg.read_bytes()
    check_dh_derives(log, "software")


@pytest.mark.parametrize("kind", DHX_KINDS)
def test_keyx_sender_to_default_dhx_recipient(tmp, dhx_recipients, kind):
    key, crt = dhx_recipients[kind]
    msg, log = message(tmp), tmp / "audit.jsonl"
    enc = encrypt(keyx_env(tmp, log), tmp, crt, msg)
    check_sender(log)
    check_dh_derives(log, "software")
    assert decrypt(base_env(), tmp, enc, crt, key) == msg.read_bytes()


@pytest.fixture(scope="module")
def token_dhx_recipients(hsm, ca, tmp_path_factory):
    """Per kind: a DH key pair made on the token by an application (kxutil.KEY_ON_PARAMS_APP:
    the X9.42 parameters of a file, keyx-label), its key reference file and a certificate for the
    public key keyx wrote. The token keeps p, g and y (CKK_DH); the reference file records the
    X9.42 public key, q included, which makes the key a DHX key again when it is read."""
    d = tmp_path_factory.mktemp("cms-token-dhx")
    env = keyx_env(d, d / "audit.jsonl", backends="pkcs11", hsm=hsm)
    out = {}
    for kind in DHX_KINDS:
        ref, pub = d / f"tok-dhx-{kind}.pem", d / f"tok-dhx-{kind}.pub"
        r = kxutil.run(["/usr/bin/python3", "-c", kxutil.KEY_ON_PARAMS_APP, "DHX", dhx_params(d, kind),
                        f"cms-dhx-{kind}", ref, pub], env=env)
        assert r.rc == 0 and "generated" in r.out, r
        assert ref.read_text().startswith("-----BEGIN KEYX KEY-----")
        out[kind] = (ref, certify(ca, pub, f"tok-dhx-{kind}"))
    return out


@pytest.mark.parametrize("kind", DHX_KINDS)
@pytest.mark.parametrize("form", ("DER", "SMIME"))
def test_default_sender_to_token_dhx_recipient(hsm, tmp, token_dhx_recipients, kind, form):
    """The recipient's DH key never leaves the token: Z from C_DeriveKey (CKM_DH_PKCS_DERIVE), the
    KDF in keyx."""
    ref, crt = token_dhx_recipients[kind]
    msg, log = message(tmp), tmp / "audit.jsonl"
    enc = encrypt(base_env(), tmp, crt, msg, form=form)
    env = keyx_env(tmp, log, backends="pkcs11", hsm=hsm)
    assert decrypt(env, tmp, enc, crt, ref, form=form) == msg.read_bytes()
    check_dh_derives(log, "pkcs11")
    # the key read from its reference file has the certificate's X9.42 public key, q included
    der = openssl("pkey", "-in", ref, "-pubout", "-outform", "DER", env=env, text=False).ok("token DHX key").out
    cert_der = openssl("x509", "-in", crt, "-noout", "-pubkey", env=base_env()).ok("certificate key").out
    assert der == openssl("pkey", "-pubin", "-outform", "DER", env=base_env(), input=cert_der.encode(),
                          text=False).ok("certificate key DER").out


def test_token_dh_key_by_uri_is_pkcs3(hsm, tmp, token_dhx_recipients):
    """By URI the same token key is a PKCS#3 DH key (a token keeps no q), which CMS refuses as
    the default provider refuses a PKCS#3 key: CMS recipients on the token are named by their key
    reference file."""
    ref, crt = token_dhx_recipients["ffdhe2048"]
    env = keyx_env(tmp, tmp / "audit.jsonl", backends="pkcs11", hsm=hsm)
    uri = f"pkcs11:token={TOKEN};object=cms-dhx-ffdhe2048;type=private"
    pub = openssl("pkey", "-in", uri, "-pubout", env=env).ok("token DH key by URI").out
    r = openssl("pkey", "-pubin", "-text_pub", "-noout", env=base_env(), input=pub).ok("default reads it")
    assert r.out.startswith("DH Public-Key") and "Q:" not in r.out, r.out[:400]
    enc = encrypt(base_env(), tmp, crt, message(tmp))
    r = openssl("cms", "-decrypt", "-binary", "-in", enc, "-inform", "DER", "-recip", crt, "-inkey", uri,
                "-out", tmp / "dec.bin", env=env)
    assert r.rc != 0 and "dh_cms_decrypt:peer key error" in r.err, r
    assert not events(tmp / "audit.jsonl", "derive")


# ---- the exchange's KDF parameters through EVP (keyx-test-derive kdf) -------------------------------


def kdf_run(env, *args, provider="keyx", expect_ok=True):
    cmd = [kxutil.derive_bin(), "--provider", provider]
    if provider == "keyx":
        cmd += ["--config", env["OPENSSL_CONF"]]
    r = kxutil.run(cmd + ["kdf", *args], env=env)
    lines = dict(line.split(" ", 1) for line in r.out.splitlines() if " " in line)
    if expect_ok:
        assert r.rc == 0 and lines.get("1", "").startswith("ok "), f"kdf derive failed:\n{r!r}"
        assert lines["provider"] == provider, r
    return lines, r


def pem_pair(tmp, name, alg, opt=None):
    key, pub = tmp / f"{name}.key", tmp / f"{name}.pub"
    opts = ["-pkeyopt", opt] if opt else []
    openssl("genpkey", "-algorithm", alg, *opts, "-out", key, env=base_env()).ok(name)
    openssl("pkey", "-in", key, "-pubout", "-out", pub, env=base_env()).ok(name)
    return key, pub


@pytest.mark.parametrize("curve", CURVES)
@pytest.mark.parametrize("digest,outlen,ukm", (("SHA256", 32, "-"), ("SHA384", 61, "00112233445566778899"),
                                               ("SHA512", 16, "ff"), ("SHA1", 100, "-"),
                                               ("SHA3-256", 24, "0a0b0c")))
def test_x963_kdf_equals_the_default_providers(tmp, curve, digest, outlen, ukm):
    """kdf-type X963KDF with kdf-digest, kdf-outlen and kdf-ukm: the size query answers
    kdf-outlen, the parameters read back as set, and the bytes equal the default provider's on
    the other side of the same exchange."""
    a, a_pub = pem_pair(tmp, "a", "EC", f"group:{curve}")
    b, b_pub = pem_pair(tmp, "b", "EC", f"group:{curve}")
    log = tmp / "audit.jsonl"
    env = keyx_env(tmp, log)
    ours, _ = kdf_run(env, a, b_pub, "X963KDF", digest, outlen, ukm)
    theirs, _ = kdf_run(base_env(), b, a_pub, "X963KDF", digest, outlen, ukm, provider="default")
    assert ours["size"] == theirs["size"] == str(outlen)
    assert ours["get"] == theirs["get"], (ours, theirs)
    assert ours["get"].split()[0] == "X963KDF" and ours["get"].split()[2] == str(outlen)
    assert ours["get"].split()[3] == ukm
    assert ours["1"] == theirs["1"] and len(ours["1"]) == 3 + 2 * outlen
    check_derives(log, "software")


@pytest.mark.parametrize("cekalg,outlen", (("id-aes128-wrap", 16), ("AES-256-WRAP", 32),
                                           ("2.16.840.1.101.3.4.1.25", 24)))
@pytest.mark.parametrize("ukm", ("-", "5a5a5a5a"))
def test_x942_kdf_equals_the_default_providers(tmp, cekalg, outlen, ukm):
    """kdf-type X942KDF-ASN1 with cekalg on ffdhe2048 keys held by keyx: Z is the padded
    secret, as the default provider takes it."""
    a, a_pub = pem_pair(tmp, "a", "DH", "group:ffdhe2048")
    b, b_pub = pem_pair(tmp, "b", "DH", "group:ffdhe2048")
    log = tmp / "audit.jsonl"
    env = keyx_env(tmp, log)
    ours, _ = kdf_run(env, a, b_pub, "X942KDF-ASN1", "SHA256", outlen, ukm, cekalg)
    theirs, _ = kdf_run(base_env(), b, a_pub, "X942KDF-ASN1", "SHA256", outlen, ukm, cekalg,
                        provider="default")
    assert ours["size"] == theirs["size"] == str(outlen)
    assert ours["get"] == theirs["get"] and ours["get"].split()[4] == cekalg, (ours, theirs)
    assert ours["1"] == theirs["1"]
    check_derives(log, "software")


def test_x963_kdf_on_tpm_and_token_keys(tpm, hsm, tmp, tpm_recipients, token_recipients):
    """The EVP parameters on hardware keys (by key reference file and by URI): Z from the TPM or
    the token, the same KDF output as the default provider's from the peer's side."""
    for backend, (key, crt) in (("tpm", tpm_recipients["P-256"]), ("pkcs11", token_recipients["P-256"])):
        peer, peer_pub = pem_pair(tmp, f"peer-{backend}", "EC", "group:P-256")
        pub = tmp / f"{backend}.pub"
        openssl("x509", "-in", crt, "-noout", "-pubkey", "-out", pub, env=base_env()).ok("cert pubkey")
        log = tmp / f"audit-{backend}.jsonl"
        env = keyx_env(tmp, log, backends=backend, tpm=tpm if backend == "tpm" else None,
                       hsm=hsm if backend == "pkcs11" else None)
        ours, _ = kdf_run(env, key, peer_pub, "X963KDF", "SHA256", 48, "c0ffee")
        theirs, _ = kdf_run(base_env(), peer, pub, "X963KDF", "SHA256", 48, "c0ffee", provider="default")
        assert ours["1"] == theirs["1"] and ours["get"] == theirs["get"], (backend, ours, theirs)
        check_derives(log, backend)


def test_x942_kdf_on_a_token_dh_key(hsm, tmp):
    """A DH key made on the token by keyx (genpkey keyx-label), X9.42 KDF through EVP: equal to
    the default provider's with the public key keyx exports (pkcs11-tool cannot read DH public
    keys; a wrong public key could not give equal bytes)."""
    log = tmp / "audit.jsonl"
    env = keyx_env(tmp, log, backends="pkcs11", hsm=hsm)
    openssl("genpkey", "-algorithm", "DH", "-pkeyopt", "group:ffdhe2048", "-pkeyopt", "keyx-backend:pkcs11",
            "-pkeyopt", "keyx-label:cms-dh", "-out", tmp / "dh-ref.pem", env=env).ok("token DH key")
    uri = f"pkcs11:token={TOKEN};object=cms-dh;type=private"
    tokpub = tmp / "tok-dh.pub"
    openssl("pkey", "-in", uri, "-pubout", "-out", tokpub, env=env).ok("token DH public key")
    peer, peer_pub = pem_pair(tmp, "peer", "DH", "group:ffdhe2048")
    ours, _ = kdf_run(env, uri, peer_pub, "X942KDF-ASN1", "SHA256", 32, "0102", "id-aes256-wrap")
    theirs, _ = kdf_run(base_env(), peer, tokpub, "X942KDF-ASN1", "SHA256", 32, "0102", "id-aes256-wrap",
                        provider="default")
    assert ours["1"] == theirs["1"]
    check_derives(log, "pkcs11")


@pytest.mark.parametrize("alg,args,stage,text", (
    ("EC", ("X942KDF-ASN1", "SHA256", 16, "-"), "set_params",
     "kdf-type 'X942KDF-ASN1' is not supported here: use 'X963KDF' or '' (none)"),
    ("DH", ("X963KDF", "SHA256", 16, "-"), "set_params",
     "kdf-type 'X963KDF' is not supported here: use 'X942KDF-ASN1' or '' (none)"),
    ("EC", ("X963KDF", "NO-SUCH-MD", 16, "-"), "set_params",
     "kdf-digest 'NO-SUCH-MD' is not available to keyx's KDF"),
    ("EC", ("X963KDF", "SHA256", 16, "-", "-", "provider=nowhere"), "set_params",
     "kdf-digest 'SHA256' (properties 'provider=nowhere') is not available to keyx's KDF"),
    ("EC", ("X963KDF", "SHAKE256", 16, "-"), "set_params", "is an XOF"),
    ("DH", ("X942KDF-ASN1", "SHA256", 16, "-"), "derive",
     "X942KDF-ASN1 needs cekalg, the key-wrap algorithm its output is for"),
))
def test_kdf_refusals(tmp, alg, args, stage, text):
    """Unknown KDFs and digests, an XOF, a missing cekalg: keyx's reason and a text that says
    what to do; nothing derived in the backend."""
    opt = "group:P-256" if alg == "EC" else "group:ffdhe2048"
    a, _ = pem_pair(tmp, "a", alg, opt)
    _, b_pub = pem_pair(tmp, "b", alg, opt)
    log = tmp / "audit.jsonl"
    lines, r = kdf_run(keyx_env(tmp, log), a, b_pub, *args, expect_ok=False)
    assert r.rc != 0 and lines.get("1", "").startswith(f"err {stage}:"), r
    assert "key exchange KDF error" in lines["1"] and text in lines["1"], r
    assert not events(log, "derive")


def test_x25519_has_no_kdf(tmp):
    """As in the default provider, X25519 has no KDF: keyx says to apply one after derive."""
    a, _ = pem_pair(tmp, "a", "X25519")
    _, b_pub = pem_pair(tmp, "b", "X25519")
    lines, r = kdf_run(keyx_env(tmp, tmp / "audit.jsonl"), a, b_pub, "X963KDF", "SHA256", 16, "-",
                       expect_ok=False)
    assert lines.get("1", "").startswith("err set_params:") and "this key exchange has no KDF" in lines["1"], r


def _der(tag, body):
    n = len(body)
    size = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + size + body


def _int(hexstr):
    v = bytes.fromhex(hexstr if len(hexstr) % 2 == 0 else "0" + hexstr).lstrip(b"\0") or b"\0"
    return _der(0x02, (b"\0" + v) if v[0] & 0x80 else v)


def test_x942_kdf_takes_z_padded(tmp):
    """Z of DH goes into X9.42 padded to the size of p: a key pair whose plain secret starts with a
    zero byte (keyx-test-derive pair ... zero) gives the default provider's bytes, which an unpadded
    Z could not."""
    drv = kxutil.derive_bin()
    pair = dict(line.split(" ", 1) for line in kxutil.run([drv, "--provider", "default", "pair", "DH",
                                                          "ffdhe2048", "zero"]).ok("pair").out.splitlines())
    assert pair["S"].startswith("00"), pair["S"]
    p, _, g = kxutil.run([drv, "--provider", "default", "params", "ffdhe2048"]).ok("params").out.split()
    a_priv = pair["A"].split()[0]
    dh_oid = bytes.fromhex("06092a864886f70d010301")  # dhKeyAgreement
    pkcs8 = _der(0x30, _int("00") + _der(0x30, dh_oid + _der(0x30, _int(p) + _int(g)))
                 + _der(0x04, _int(a_priv)))
    key, peer = tmp / "a.der", tmp / "b.der"
    key.write_bytes(pkcs8)
    peer.write_bytes(bytes.fromhex(pair["B"].split()[2]))
    log = tmp / "audit.jsonl"
    args = (key, peer, "X942KDF-ASN1", "SHA256", 32, "-", "id-aes256-wrap")
    ours, _ = kdf_run(keyx_env(tmp, log), *args)
    theirs, _ = kdf_run(base_env(), *args, provider="default")
    assert ours["1"] == theirs["1"]
    check_derives(log, "software")
