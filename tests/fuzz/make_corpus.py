"""Writes the seed corpora of tests/fuzz/corpus/ (run once by hand; its output is committed):

    KEYX_BUILD_DIR=build-dev /usr/bin/python3 -m pytest tests/fuzz/make_corpus.py -q -p no:cacheprovider

Seeds are real inputs: URIs and locators keyx writes, configuration values of
docs/configuration.md, key parameters and encoded public keys of keys the default provider
generates (parsed out of `openssl pkey -text`), Wycheproof's public points, and key reference
files made by `openssl genpkey` through keyx on a swtpm and a SoftHSM token, plus a TSS2 key
file made by tpm2-openssl. Not collected by the suite (not a test_*.py file).
"""

import json
import re
import shutil
from pathlib import Path

import pytest

import kxutil
from kxutil import openssl
from fixture_softhsm import SoftHSM
from fixture_swtpm import Swtpm, tpm_cnf

CORPUS = Path(__file__).resolve().parent / "corpus"
WYCHEPROOF = kxutil.VECTORS


def seed(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data.encode() if isinstance(data, str) else data)


# ---- import: records as fuzz_import.c reads them ------------------------------------------------

NAMES = ["pub", "priv", "group", "encoded-pub-key", "point-format", "encoding",
         "use-cofactor-ecdh", "field-type", "p", "a", "b", "generator", "order", "cofactor",
         "seed", "qx", "qy", "include-public", "q", "g", "j", "gindex", "pcounter", "hindex",
         "priv_len", "safeprime-generator", "n", "e", "d", "rsa-factor1", "rsa-factor2",
         "rsa-exponent1", "rsa-exponent2", "rsa-coefficient1", "keyx-backend"]
WORDS = ["P-256", "prime256v1", "secp256r1", "P-384", "secp384r1", "P-521", "secp521r1",
         "secp256k1", "brainpoolP256r1", "sect163k1", "ffdhe2048", "ffdhe3072", "ffdhe4096",
         "modp_2048", "dh_2048_224", "dh_1024_160", "uncompressed", "compressed", "hybrid",
         "named_curve", "explicit", "prime-field", "characteristic-two-field", "software", "tpm",
         "pkcs11", "X25519", ""]
ALGS = ["EC", "X25519", "X448", "DH", "RSA"]


def rec(name, typ, value):
    """typ: 0 big-endian integer, 1 octet string, 3 one of WORDS."""
    i = NAMES.index(name)
    if typ == 3:
        return bytes([i, 3, WORDS.index(value)])
    n = len(value)
    head = bytes([n]) if n < 128 else bytes([0x80 | (n >> 8), n & 0xFF])
    return bytes([i, typ]) + head + value


def text_fields(pem):
    """`openssl pkey -text` of a key: {label: bytes} for its hex blocks, and its group name."""
    out = openssl("pkey", "-in", pem, "-text", "-noout").ok("pkey -text").out
    fields, cur, group = {}, None, None
    for line in out.splitlines():
        if line.startswith("    "):
            if cur is not None and re.match(r"^[0-9a-f:]+$", line.strip()):
                fields[cur] += bytes.fromhex(line.strip().replace(":", ""))
            continue
        if ":" not in line:
            cur = None
            continue
        key, rest = (x.strip() for x in line.split(":", 1))
        if key in ("GROUP", "ASN1 OID", "NIST CURVE"):
            group, cur = rest, None
        elif rest == "" or rest.startswith("("):
            cur = key
            fields[cur] = b""
        elif re.match(r"^\d+ \(0x[0-9a-f]+\)$", rest):  # publicExponent: 65537 (0x10001)
            v = int(rest.split()[0])
            fields[key] = v.to_bytes((v.bit_length() + 7) // 8, "big")
            cur = None
        else:
            cur = None
    for k in fields:  # hex dumps of integers carry a leading 00 when the top bit is set
        if fields[k][:1] == b"\x00" and len(fields[k]) > 1:
            fields[k] = fields[k][1:]
    return fields, group


def genkey(tmp, name, alg, *opts):
    pem = tmp / f"{name}.pem"
    args = ["genpkey", "-algorithm", alg]
    for o in opts:
        args += ["-pkeyopt", o]
    openssl(*args, "-out", pem).ok(f"genpkey {name}")
    return pem


def make_import(tmp):
    ec_groups = {"P-256": "P-256", "P-384": "P-384", "P-521": "P-521"}
    for g in ec_groups:
        f, _ = text_fields(genkey(tmp, g, "EC", f"group:{g}"))
        grp = rec("group", 3, g)
        seed("import", f"ec-{g}-keypair", bytes([0, 0]) + grp + rec("priv", 0, f["priv"]) + rec("pub", 1, f["pub"]))
        seed("import", f"ec-{g}-public", bytes([0, 1]) + grp + rec("pub", 1, f["pub"]))
    seed("import", "ec-P-256-params", bytes([0, 2]) + rec("group", 3, "P-256"))
    # explicit curve parameters (P-256's, as `ec_param_enc:explicit` writes them)
    f, _ = text_fields(genkey(tmp, "explicit", "EC", "group:P-256", "ec_param_enc:explicit"))
    explicit = (rec("field-type", 3, "prime-field") + rec("p", 0, f["Prime"]) + rec("a", 0, f["A"])
                + rec("b", 0, f["B"]) + rec("generator", 1, f["Generator (uncompressed)"])
                + rec("order", 0, f["Order"]) + rec("cofactor", 0, b"\x01"))
    seed("import", "ec-explicit-keypair", bytes([0, 3]) + explicit + rec("priv", 0, f["priv"]) + rec("pub", 1, f["pub"]))
    for i, alg in ((1, "X25519"), (2, "X448")):
        f, _ = text_fields(genkey(tmp, alg, alg))
        seed("import", f"{alg}-keypair", bytes([i, 0]) + rec("priv", 1, f["priv"]) + rec("pub", 1, f["pub"]))
        seed("import", f"{alg}-public", bytes([i, 1]) + rec("pub", 1, f["pub"]))
        seed("import", f"{alg}-private-only", bytes([i, 0]) + rec("priv", 1, f["priv"]))
    f, _ = text_fields(genkey(tmp, "ffdhe2048", "DH", "group:ffdhe2048"))
    seed("import", "dh-ffdhe2048-keypair", bytes([3, 0]) + rec("group", 3, "ffdhe2048")
         + rec("priv", 0, f["private-key"]) + rec("pub", 0, f["public-key"]))
    seed("import", "dh-ffdhe2048-public", bytes([3, 1]) + rec("group", 3, "ffdhe2048") + rec("pub", 0, f["public-key"]))
    f, _ = text_fields(genkey(tmp, "dh224", "DH", "group:dh_2048_224"))
    seed("import", "dh-2048-224-keypair", bytes([3, 0]) + rec("group", 3, "dh_2048_224")
         + rec("priv", 0, f["private-key"]) + rec("pub", 0, f["public-key"]))
    # explicit p, g (a safe prime of no named group, as a TLS 1.2 server may send), public 2
    seed("import", "dh-explicit-public", bytes([3, 3]) + rec("p", 0, bytes.fromhex(kxutil.EXPLICIT_DH_P))
         + rec("g", 0, bytes.fromhex(kxutil.EXPLICIT_DH_G)) + rec("pub", 0, b"\x02"))
    f, _ = text_fields(genkey(tmp, "rsa", "RSA", "rsa_keygen_bits:1024"))
    n, e = rec("n", 0, f["modulus"]), rec("e", 0, f["publicExponent"])
    seed("import", "rsa-1024-keypair", bytes([4, 0]) + n + e + rec("d", 0, f["privateExponent"])
         + rec("rsa-factor1", 0, f["prime1"]) + rec("rsa-factor2", 0, f["prime2"])
         + rec("rsa-exponent1", 0, f["exponent1"]) + rec("rsa-exponent2", 0, f["exponent2"])
         + rec("rsa-coefficient1", 0, f["coefficient"]))
    seed("import", "rsa-1024-no-crt", bytes([4, 0]) + n + e + rec("d", 0, f["privateExponent"]))
    seed("import", "rsa-1024-public", bytes([4, 1]) + n + e)
    seed("import", "ec-P-256-to-tpm", bytes([0, 0]) + rec("group", 3, "P-256") + rec("priv", 0, b"\x01" * 32)
         + rec("keyx-backend", 3, "tpm"))


# ---- pubkey: group byte + encoded public key ------------------------------------------------------

PUB_GROUPS = ["P-256", "P-384", "P-521", "X25519", "X448", "ffdhe2048", "dh_2048_224"]


def make_pubkey(tmp):
    for i, g in enumerate(PUB_GROUPS):
        if g.startswith("P-"):
            f, _ = text_fields(genkey(tmp, f"p-{g}", "EC", f"group:{g}"))
            pub = f["pub"]
            half = (len(pub) - 1) // 2
            seed("pubkey", f"{g}-uncompressed", bytes([i]) + pub)
            seed("pubkey", f"{g}-compressed", bytes([i, 2 + (pub[-1] & 1)]) + pub[1:1 + half])
        elif g.startswith("X"):
            f, _ = text_fields(genkey(tmp, f"p-{g}", g))
            seed("pubkey", g, bytes([i]) + f["pub"])
        else:
            f, _ = text_fields(genkey(tmp, f"p-{g}", "DH", f"group:{g}"))
            seed("pubkey", g, bytes([i]) + f["public-key"].rjust(256, b"\x00"))
    # Wycheproof: a few accepted and rejected points of each curve
    for i, (name, curve) in enumerate((("ecdh_secp256r1_ecpoint_test.json", "P-256"),
                                       ("ecdh_secp384r1_ecpoint_test.json", "P-384"),
                                       ("ecdh_secp521r1_ecpoint_test.json", "P-521"))):
        tests = [t for grp in json.loads((WYCHEPROOF / name).read_text())["testGroups"] for t in grp["tests"]]
        for t in tests[:: max(1, len(tests) // 8)]:
            seed("pubkey", f"wycheproof-{curve}-{t['tcId']}-{t['result']}", bytes([i]) + bytes.fromhex(t["public"]))
    for i, name in ((3, "x25519_test.json"), (4, "x448_test.json")):
        tests = [t for grp in json.loads((WYCHEPROOF / name).read_text())["testGroups"] for t in grp["tests"]]
        small = [t for t in tests if "ZeroSharedSecret" in t.get("flags", []) or "SmallPublicKey" in t.get("flags", [])]
        for t in small[:4] + tests[:: max(1, len(tests) // 6)]:
            seed("pubkey", f"wycheproof-{PUB_GROUPS[i]}-{t['tcId']}-{t['result']}", bytes([i]) + bytes.fromhex(t["public"]))


# ---- uri, config ------------------------------------------------------------------------------------

URIS = [
    "pkcs11:token=keyx;object=srv;type=private",
    "pkcs11:token=keyx",
    "keyx:pkcs11:token=keyx;object=srv-rsa;type=private",
    "pkcs11:token=keyx-a;id=%a0%01;type=private",
    "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;serial=0123456789abcdef;token=keyx;"
    "id=%52;object=srv-rsa;type=private",
    "pkcs11:token=keyx;object=srv;type=private?pin-value=1234",
    "pkcs11:object=srv;type=public",
    "pkcs11:token=keyx;object=cert;type=cert",
    "keyx:tpm:handle=0x81000002",
    "keyx:tpm:handle=0x81000010",
    "KEYX:TPM:handle=0x81FFFFFF",
    "keyx:tpm:handle=0x80000000",
    "keyx:tpm:0x81000002",
]

CONFIG = [
    ("backends", "tpm, pkcs11, software"),
    ("backends", "software"),
    ("tpm-tcti", "swtpm:host=127.0.0.1,port=2321"),
    ("tpm-parent", "0x81000001"),
    ("pkcs11-module", "/usr/lib/softhsm/libsofthsm2.so"),
    ("pkcs11-token", "pkcs11:token=keyx pkcs11:token=keyx-b"),
    ("pkcs11-pin", "file:/etc/keyx/pin"),
    ("pkcs11-pin", "env:KEYX_PIN"),
    ("pkcs11-raw-rsa", "1"),
    ("tpm-encrypt-sessions", "off"),
    ("tpm-pool", "8"),
    ("pkcs11-pool", "1024"),
    ("audit-log", "/var/log/keyx/audit.jsonl"),
    ("ephemeral-max-uses", "9223372036854775807"),
    ("debug", "yes"),
]
CONFIG_KEYS = list(kxutil.CONFIG_KEYS)


def make_uri_config():
    for i, u in enumerate(URIS):
        seed("uri", f"uri-{i:02d}", u)
    for i, (k, v) in enumerate(CONFIG):
        seed("config", f"{k}-{i:02d}", bytes([CONFIG_KEYS.index(k)]) + v.encode())
    seed("config", "all", b"".join(bytes([CONFIG_KEYS.index(k)]) + v.encode() + b"\0" for k, v in CONFIG))


# ---- keyref: files keyx writes, on a swtpm and a SoftHSM token -----------------------------------------


def pem_der(pem_text):
    body = "".join(l for l in pem_text.splitlines() if l and not l.startswith("-----"))
    import base64
    return base64.b64decode(body)


@pytest.fixture(scope="module")
def tpm(tmp_path_factory):
    t = Swtpm(tmp_path_factory.mktemp("tpm-corpus")).start()
    yield t
    t.kill()


@pytest.fixture(scope="module")
def hsm(tmp_path_factory, build):
    return SoftHSM(tmp_path_factory.mktemp("hsm-corpus")).setup()


def test_make_corpus(tmp_path, tpm, hsm, build):
    for d in ("uri", "config", "import", "pubkey", "keyref"):
        shutil.rmtree(CORPUS / d, ignore_errors=True)
    make_uri_config()
    make_import(tmp_path)
    make_pubkey(tmp_path)

    tenv = kxutil.base_env(OPENSSL_CONF=tpm_cnf(tmp_path / "tpm.cnf", tpm))
    henv = hsm.env(OPENSSL_CONF=kxutil.write_cnf(tmp_path / "hsm.cnf", keyx=hsm.keyx_settings()))
    made = [
        ("tpm-ec", tenv, "EC", ["group:P-256", "keyx-backend:tpm", "keyx-persist:0x81000123"]),
        ("tpm-rsa", tenv, "RSA", ["rsa_keygen_bits:2048", "keyx-backend:tpm", "keyx-persist:0x81000124"]),
        ("pkcs11-ec", henv, "EC", ["group:P-384", "keyx-backend:pkcs11", "keyx-label:corpus-ec", "keyx-id:c0"]),
        ("pkcs11-dh", henv, "DH", ["group:ffdhe2048", "keyx-backend:pkcs11", "keyx-label:corpus-dh", "keyx-id:c1"]),
    ]
    for name, env, alg, opts in made:
        out = tmp_path / f"{name}.pem"
        args = ["genpkey", "-algorithm", alg]
        for o in opts:
            args += ["-pkeyopt", o]
        openssl(*args, "-out", out, env=env).ok(f"genpkey {name}")
        text = out.read_text()
        assert "-----BEGIN KEYX KEY-----" in text, text
        seed("keyref", f"{name}.pem", text)
        seed("keyref", f"{name}.der", pem_der(text))  # DER starts with 0x30 = '0'
        seed("keyref", f"{name}.wrapped", b"\x01" + pem_der(text))
    # a TSS2 PRIVATE KEY made by tpm2-openssl (the independent writer of that format)
    tpm.flush_transient()
    out = tmp_path / "tss2.pem"
    openssl("genpkey", "-provider", "tpm2", "-provider", "base", "-algorithm", "EC", "-pkeyopt",
            "group:P-256", "-out", out,
            env=kxutil.base_env(TPM2OPENSSL_TCTI=tpm.tcti, LD_PRELOAD=None)).ok("tpm2-openssl genpkey")
    text = out.read_text()
    assert "-----BEGIN TSS2 PRIVATE KEY-----" in text, text
    seed("keyref", "tss2-ec.pem", text)
    seed("keyref", "tss2-ec.der", pem_der(text))
    seed("keyref", "tss2-ec.wrapped", b"\x02" + pem_der(text))
    # locators keyx wrote, as URIs
    for name, *_ in made:
        _, backend, locator = der_strings(pem_der((CORPUS / "keyref" / f"{name}.pem").read_text()))
        seed("uri", f"locator-{name}", locator if backend == "pkcs11" else f"keyx:tpm:{locator}")


def der_strings(der):
    """version, backend, locator of a KeyxKeyReference (encode/keyref.h)."""
    def tlv(b, i):
        tag, n, i = b[i], b[i + 1], i + 2
        if n & 0x80:
            k, n = n & 0x7F, int.from_bytes(b[i:i + (n & 0x7F)], "big")
            i += k
        return tag, b[i:i + n], i + n
    _, body, _ = tlv(der, 0)
    out, i = [], 0
    for _ in range(3):
        _, v, i = tlv(body, i)
        out.append(v)
    return int.from_bytes(out[0], "big"), out[1].decode(), out[2].decode()
