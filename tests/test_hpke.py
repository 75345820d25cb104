"""HPKE (RFC 9180) with keyx's DHKEM, through OpenSSL's own OSSL_HPKE_* (OpenSSL >= 3.2).

- Every RFC 9180 DHKEM vector (P-256, P-521, X25519, X448; base, psk, auth, auth_psk) through
  OSSL_HPKE_* with keyx preferred on the software backend (keyx-test-hpke): the recipient's and
  sender's public keys, enc, the first ciphertext, the opened plaintext and the first export equal
  the vector's, and the audit log shows keyx generating the keys and doing the encapsulation and
  decapsulation in software.
- Round trips with examples/hpke.c (`keyx-hpke-example`) against a peer that loads the default
  provider only, both directions and in the authenticated mode, with keys in software (all five
  KEMs), in the TPM (P-256, P-384, key reference files) and on the token (P-256, P-384, P-521, by
  URI): each DH with a private key runs in the backend that holds it (audit events), and the
  ephemeral key of an encapsulation is made in the first configured backend.
- A tampered enc or ciphertext never opens; an enc that is not a valid public key (off the curve,
  the identity, an all-zero X25519/X448 key, the wrong length) is refused with keyx's reason.
- A seeded (deterministic) key is refused in hardware with its own reason.

OpenSSL 3.0 has neither OSSL_HPKE_* nor DHKEM: there, test_kem_names checks that keyx registers no
DHKEM, and the rest is skipped with that reason.
"""

import json

import pytest

import kxutil
from test_cms import TOKEN, hsm, keyx_env, tpm  # noqa: F401  (module fixtures of their own)
from kxutil import base_env, openssl

HPKE = kxutil.openssl_version() >= (3, 2)
needs_hpke = pytest.mark.skipif(not HPKE, reason="OSSL_HPKE_* and DHKEM exist from OpenSSL 3.2 "
                                "(Debian 13's 3.5); Debian 12's OpenSSL 3.0 has neither")
VECTORS = json.loads((kxutil.REPO / "tests" / "vectors" / "hpke" / "rfc9180-dhkem.json").read_text())
KEMS = {0x10: "P-256", 0x11: "P-384", 0x12: "P-521", 0x20: "X25519", 0x21: "X448"}
EXPORT_ONLY = 0xFFFF


def hpke_bin():
    return kxutil.build_dir() / "tests" / "keyx-test-hpke"


def example_bin():
    return kxutil.build_dir() / "examples" / "keyx-hpke-example"


def events(log):
    evs = kxutil.read_audit(log) if log.exists() else []
    kxutil.check_audit_schema(evs)
    return evs


def kem_events(log, event):
    return [(e["backend"], e["ok"]) for e in events(log) if e["event"] == event]


def test_kem_names(tmp):
    """keyx's KEMs: RSA (RSASVE) everywhere; EC, X25519 and X448 (DHKEM) from OpenSSL 3.2."""
    env = keyx_env(tmp, tmp / "audit.jsonl")
    out = openssl("list", "-kem-algorithms", env=env).ok("list").out
    names = set()
    for line in out.splitlines():
        if line.strip().endswith("@ keyx"):
            names |= {n.strip() for n in line.split("@")[0].strip().strip("{}").split(",")}
    assert "RSA" in names, out
    for kem in ("EC", "X25519", "X448"):
        assert (kem in names) == HPKE, out


# ---- RFC 9180 vectors -----------------------------------------------------------------------------


def vector_id(v):
    return (f"{KEMS[v['kem_id']]}-mode{v['mode']}-kdf{v['kdf_id']}-aead{v['aead_id']}"
            f"-{v['rfc9180_section'] or v['info'][-6:] + v['ikmE'][:6]}")


def hx(s):
    return s if s else "-"


def run_vector(v, env, ikmr=None):
    enc0, exp0 = v.get("encryption0"), v["export0"]
    args = [v["mode"], v["kem_id"], v["kdf_id"], v["aead_id"], v["ikmE"], ikmr or v["ikmR"], hx(v.get("ikmS")),
            hx(v["info"]), hx(v.get("psk")), hx(v.get("psk_id")), hx(enc0["aad"] if enc0 else ""),
            hx(enc0["pt"] if enc0 else ""), hx(exp0["exporter_context"]), exp0["L"]]
    r = kxutil.run([hpke_bin(), *args], env=env)
    return r, dict(line.split(" ", 1) for line in r.out.splitlines() if " " in line)


@needs_hpke
@pytest.mark.parametrize("v", VECTORS, ids=vector_id)
def test_rfc9180_vector_through_keyx(v, tmp):
    log = tmp / "audit.jsonl"
    r, got = run_vector(v, keyx_env(tmp, log))
    assert r.rc == 0 and "err" not in got, r
    assert got["pkR"] == v["pkRm"]
    if v["mode"] in (2, 3):
        assert got["pkS"] == v["pkSm"]
    assert got["enc"] == v["enc"]
    if v["aead_id"] != EXPORT_ONLY:
        assert got["ct"] == v["encryption0"]["ct"]
        assert got["pt"] == v["encryption0"]["pt"]
    assert got["export-sender"] == got["export-receiver"] == v["export0"]["exported_value"]
    # keyx made the recipient's, the sender's and the ephemeral key, and did both KEM sides
    auth = v["mode"] in (2, 3)
    keygens = [e for e in events(log) if e["event"] == "keygen"]
    assert len(keygens) == (3 if auth else 2) and all(e["backend"] == "software" and e["ok"] for e in keygens)
    assert kem_events(log, "encapsulate") == [("software", True)] * (2 if auth else 1)
    assert kem_events(log, "decapsulate") == [("software", True)] * (2 if auth else 1)


@needs_hpke
@pytest.mark.parametrize("seed", ("ikmR", "ikmE"))
def test_seeded_keys_are_software_only(tpm, tmp, seed):
    """A vector's keys come from seeds (OSSL_HPKE_keygen's ikm, the ephemeral key's ikmE): with
    backends = tpm keyx refuses them with its own reason instead of making an unrelated random
    TPM key. ikmE: the recipient's key is a random TPM key (no seed), the encapsulation's
    seeded ephemeral key is refused."""
    v = next(x for x in VECTORS if x["kem_id"] == 0x10 and x["mode"] == 0)
    log = tmp / "audit.jsonl"
    r, got = run_vector(v, keyx_env(tmp, log, backends="tpm", tpm=tpm), ikmr="-" if seed == "ikmE" else None)
    stage = "keygen recipient" if seed == "ikmR" else "encap"
    assert r.rc != 0 and f"err {stage}:" in r.out, r
    assert "a key derived from a seed is made in software only" in r.out, r
    assert "the backend tpm would make this one" in r.out, r
    made = [e["backend"] for e in events(log) if e["event"] == "keygen" and e["ok"]]
    assert made == ([] if seed == "ikmR" else ["tpm"]), made
    assert not kem_events(log, "encapsulate")


# ---- round trips with keyx-hpke-example ------------------------------------------------------------


SW_GROUPS = ("P-256", "P-384", "P-521", "X25519", "X448")
TPM_GROUPS = ("P-256", "P-384")
TOKEN_GROUPS = ("P-256", "P-384", "P-521")


def genkey(d, name, group, env):
    key, pub = d / f"{name}.key", d / f"{name}.pub"
    opts = ["-algorithm", group] if group.startswith("X") else ["-algorithm", "EC", "-pkeyopt", f"group:{group}"]
    openssl("genpkey", *opts, "-out", key, env=env).ok(f"key {name}")
    openssl("pkey", "-in", key, "-pubout", "-out", pub, env=env).ok(f"public key {name}")
    return key, pub


@pytest.fixture(scope="module")
def plain_keys(tmp_path_factory):
    """Default-provider key pairs (the other side), two per group: recipient and sender."""
    d = tmp_path_factory.mktemp("hpke-plain")
    return {(g, role): genkey(d, f"{role}-{g}", g, base_env()) for g in SW_GROUPS for role in ("r", "s")}


@pytest.fixture(scope="module")
def tpm_keys(tpm, tmp_path_factory):
    """Persistent TPM keys (genpkey keyx-persist): key reference file and public key."""
    d = tmp_path_factory.mktemp("hpke-tpm")
    env = keyx_env(d, d / "audit.jsonl", backends="tpm", tpm=tpm)
    out = {}
    for i, g in enumerate(TPM_GROUPS):
        ref, pub = d / f"tpm-{g}.pem", d / f"tpm-{g}.pub"
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", f"group:{g}", "-pkeyopt",
                f"keyx-persist:0x{0x81000078 + i:08x}", "-out", ref, env=env).ok("TPM key")
        openssl("pkey", "-in", ref, "-pubout", "-out", pub, env=env).ok("TPM public key")
        out[g] = (ref, pub)
    return out


@pytest.fixture(scope="module")
def token_keys(hsm, tmp_path_factory):
    """Token key pairs (genpkey keyx-label), named by URI: (URI, public key)."""
    d = tmp_path_factory.mktemp("hpke-token")
    env = keyx_env(d, d / "audit.jsonl", backends="pkcs11", hsm=hsm)
    out = {}
    for g in TOKEN_GROUPS:
        pub = d / f"tok-{g}.pub"
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", f"group:{g}", "-pkeyopt", f"keyx-label:hpke-{g}",
                "-out", d / f"tok-{g}.ref", env=env).ok("token key")
        openssl("pkey", "-in", d / f"tok-{g}.ref", "-pubout", "-out", pub, env=env).ok("token public key")
        out[g] = (f"pkcs11:token={TOKEN};object=hpke-{g};type=private", pub)
    return out


def example(env, *args, data):
    return kxutil.run([example_bin(), *args], env=env, input=data, text=False)


def seal(env, recipient_pub, msg, sender=None):
    r = example(env, "seal", recipient_pub, *([sender] if sender else []), data=msg)
    assert r.rc == 0, r
    return r.out


def open_(env, recipient, sealed, sender_pub=None):
    return example(env, "open", recipient, *([sender_pub] if sender_pub else []), data=sealed)


CASES = ([("software", g) for g in SW_GROUPS] + [("tpm", g) for g in TPM_GROUPS]
         + [("pkcs11", g) for g in TOKEN_GROUPS])


@pytest.fixture
def keyx_side(request, tmp, plain_keys):
    """(env, log, recipient/sender private key, its public key) for the case's backend."""
    backend, group = request.param
    log = tmp / "audit.jsonl"
    if backend == "software":
        env = keyx_env(tmp, log)
        key, pub = plain_keys[(group, "r")]  # a PEM key, read into keyx's software backend
    elif backend == "tpm":
        env = keyx_env(tmp, log, backends="tpm", tpm=request.getfixturevalue("tpm"))
        key, pub = request.getfixturevalue("tpm_keys")[group]
    else:
        env = keyx_env(tmp, log, backends="pkcs11", hsm=request.getfixturevalue("hsm"))
        key, pub = request.getfixturevalue("token_keys")[group]
    return backend, group, env, log, key, pub


@needs_hpke
@pytest.mark.parametrize("keyx_side", CASES, indirect=True, ids=[f"{b}-{g}" for b, g in CASES])
@pytest.mark.parametrize("auth", (False, True), ids=("base", "auth"))
def test_default_seals_keyx_opens(keyx_side, auth, plain_keys, tmp):
    """The recipient's key is keyx's: DH(skR, pkE) (and DH(skR, pkS)) in its backend."""
    backend, group, env, log, key, _ = keyx_side
    skey, spub = plain_keys[(group, "s")]
    msg = b"keyx HPKE test " + bytes(range(256)) * 3
    sealed = seal(base_env(), keyx_side[5], msg, sender=skey if auth else None)
    r = open_(env, key, sealed, sender_pub=spub if auth else None)
    assert r.rc == 0 and r.out == msg, r
    assert kem_events(log, "decapsulate") == [(backend, True)] * (2 if auth else 1)
    assert not kem_events(log, "derive")


@needs_hpke
@pytest.mark.parametrize("keyx_side", CASES, indirect=True, ids=[f"{b}-{g}" for b, g in CASES])
@pytest.mark.parametrize("auth", (False, True), ids=("base", "auth"))
def test_keyx_seals_default_opens(keyx_side, auth, plain_keys, tmp):
    """keyx seals to a default-provider recipient: the ephemeral key is made in the configured
    backend and DH(skE, pkR) runs there; in the auth mode DH(skS, pkR) runs in the sender key's."""
    backend, group, env, log, key, pub = keyx_side
    rkey, rpub = plain_keys[(group, "r" if backend != "software" else "s")]
    msg = b"sealed by keyx"
    sealed = seal(env, rpub, msg, sender=key if auth else None)
    r = open_(base_env(), rkey, sealed, sender_pub=pub if auth else None)
    assert r.rc == 0 and r.out == msg, r
    eph = [e for e in events(log) if e["event"] == "keygen"]
    assert [(e["backend"], e["ok"], e["ephemeral"]) for e in eph] == [(backend, True, True)], eph
    assert kem_events(log, "encapsulate") == [(backend, True)] * (2 if auth else 1)


# ---- tampering and invalid enc ------------------------------------------------------------------


@needs_hpke
@pytest.mark.parametrize("keyx_side", [("software", "P-256"), ("software", "X25519"), ("tpm", "P-256"),
                                       ("pkcs11", "P-384")], indirect=True,
                         ids=("software-P-256", "software-X25519", "tpm-P-256", "pkcs11-P-384"))
def test_tampered_never_opens(keyx_side, plain_keys, tmp):
    backend, group, env, log, key, pub = keyx_side
    msg = b"do not tamper"
    sealed = seal(base_env(), pub, msg)
    assert open_(env, key, sealed).out == msg
    npk = {"P-256": 65, "P-384": 97, "X25519": 32}[group]
    for pos in (1, npk // 2, npk - 1, npk, len(sealed) - 1):  # inside enc, then the ciphertext
        bad = bytearray(sealed)
        bad[pos] ^= 0x01
        r = open_(env, key, bytes(bad))
        assert r.rc != 0 and r.out == b"", f"byte {pos} flipped: {r!r}"


def invalid_encs(group):
    npk = {"P-256": 65, "P-384": 97, "P-521": 133, "X25519": 32, "X448": 56}[group]
    if group.startswith("X"):
        # all-zero and other small-order keys: the DH result would be all zero
        return {"zero": bytes(npk), "one": b"\x01" + bytes(npk - 1)}
    field = (npk - 1) // 2
    return {"off-curve": b"\x04" + b"\x01" * (2 * field), "identity": b"\x04" + bytes(2 * field),
            "compressed": b"\x02" + b"\x01" * field + bytes(field)}


@needs_hpke
@pytest.mark.parametrize("keyx_side", [("software", g) for g in SW_GROUPS] + [("tpm", "P-256"), ("pkcs11", "P-521")],
                         indirect=True, ids=[f"software-{g}" for g in SW_GROUPS] + ["tpm-P-256", "pkcs11-P-521"])
def test_invalid_enc_is_refused(keyx_side, tmp):
    backend, group, env, log, key, pub = keyx_side
    for name, enc in invalid_encs(group).items():
        r = open_(env, key, enc + bytes(32))
        assert r.rc != 0 and r.out == b"", f"{name}: {r!r}"
        assert b"invalid peer public key" in r.err, f"{name}: {r!r}"
    refused = kem_events(log, "decapsulate")
    assert len(refused) == len(invalid_encs(group)) and not any(ok for _, ok in refused), refused
