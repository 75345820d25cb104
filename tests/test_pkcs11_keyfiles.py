"""Token keys made by keyx (openssl genpkey -pkeyopt keyx-label:/keyx-id:), their locators and
the listing of a token's keys (PKCS#11 side).

Everything runs on a SoftHSM2 token of this module's own ("keyx-kf", in its own token
directory), so the session fixture's tokens keyx-a/keyx-b, whose objects other tests count, are
never touched. Secrets are cross-checked against the default provider (peer side, with the public
key pkcs11-tool reads from the token) and, for EC, against libp11's engine on the same token key;
object attributes against pkcs11-tool's listing.
"""

import base64
import re
import shutil
from pathlib import Path

import pytest

import kxutil
from fixture_softhsm import MODULE, PIN, SoftHSM

TOKEN = "keyx-kf"
# libp11 0.4.12 cannot enumerate the private keys of a token that holds a DH key ("Unable to
# enumerate private keys", then a crash): its cross-check runs on a token of EC keys only.
EC_TOKEN = "keyx-kf-ec"
EMPTY_TOKEN = "keyx-kf-empty"  # never gets a key: listing it finds nothing


class OwnToken(SoftHSM):
    """A SoftHSM2 token directory with the tokens keyx-kf, keyx-kf-ec and keyx-kf-empty, empty."""

    def setup(self):
        return self.init_tokens(TOKEN, EC_TOKEN, EMPTY_TOKEN)

    def serial(self, token=TOKEN):
        r = kxutil.run(["softhsm2-util", "--show-slots"], env=self.tool_env()).ok("show slots")
        block = next(b for b in r.out.split("\nSlot ") if re.search(rf"Label:[ \t]+{token}[ \t]*$", b, re.M))
        return re.search(r"Serial number:[ \t]+(\S+)", block).group(1)


@pytest.fixture(scope="module")
def hsm(tmp_path_factory, build):
    for tool in ("softhsm2-util", "pkcs11-tool"):
        assert shutil.which(tool), f"{tool} not found: install softhsm2 and opensc (scripts/test.sh does)"
    assert MODULE.exists(), f"SoftHSM2 module {MODULE} not found: install softhsm2"
    return OwnToken(tmp_path_factory.mktemp("softhsm-kf")).setup()


def keyx_env(hsm, cnf, tmp, token=TOKEN):
    log = tmp / "audit.jsonl"
    settings = hsm.keyx_settings(tokens=(token,), **{"audit-log": log})
    return hsm.env(OPENSSL_CONF=cnf(keyx=settings)), log


def objects(hsm, token=TOKEN):
    """pkcs11-tool --list-objects, parsed: one dict per object (kind, label, id, usage, access)."""
    r = hsm.tool(token, "--list-objects").ok("list objects")
    out = []
    for block in re.split(r"\n(?=\S)", r.out):
        m = re.match(r"(Private Key|Public Key|Secret Key|Data|Certificate) Object", block)
        if not m:
            continue
        head = block.split("\n")[0]
        # pkcs11-tool 0.23 calls DH "unknown key algorithm 2" (CKK_DH)
        o = {"kind": m.group(1), "type": "DH" if "key algorithm 2" in head else head.split(";")[-1].split()[0]}
        for key in ("label", "ID", "Usage", "Access", "EC_POINT"):
            mm = re.search(rf"^[ \t]+{key}:[ \t]*(.*)$", block, re.M)
            o[key.lower()] = mm.group(1).strip() if mm else ""
        out.append(o)
    return out


def check_error(r, *needles):
    text = r.out + r.err
    assert r.rc not in (0, -11, -6) and r.rc > 0, f"expected a clean failure:\n{r!r}"
    for n in needles:
        assert n in text, f"error does not say {n!r}:\n{r!r}"
    assert PIN not in text, f"the PIN appears in the output:\n{r!r}"


def genkey(env, tmp, name, alg, *opts, label=None, key_id=None):
    """openssl genpkey through keyx onto the token: -out writes a KEYX KEY reference file."""
    args = ["genpkey", "-algorithm", alg]
    for o in opts:
        args += ["-pkeyopt", o]
    if label is not None:
        args += ["-pkeyopt", f"keyx-label:{label}"]
    if key_id is not None:
        args += ["-pkeyopt", f"keyx-id:{key_id}"]
    return kxutil.openssl(*args, "-out", tmp / f"{name}.pem", env=env)


def pct(hexid):
    return "".join(f"%{hexid[i:i + 2]}" for i in range(0, len(hexid), 2))


def by_label(hsm, label, token=TOKEN):
    """The objects pkcs11-tool lists with that label: {kind: object}."""
    found = {o["kind"]: o for o in objects(hsm, token) if o["label"] == label}
    assert set(found) == {"Private Key", "Public Key"}, f"{label}: {objects(hsm, token)}"
    return found


def read_pub(hsm, tmp, key_id, name, token=TOKEN):
    der = tmp / f"{name}-tok.der"
    hsm.tool(token, "--read-object", "--type", "pubkey", "--id", key_id, "-o", der).ok("read pubkey")
    return der


def ec_peer_secret(tmp, tokpub, curve="P-256"):
    """A default-provider peer on the curve: its public key and the secret it derives with the
    token key's public key."""
    env = kxutil.base_env()
    key, pub, sec = tmp / "peer.pem", tmp / "peer.pub", tmp / "peer.bin"
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", f"group:{curve}", "-out", key, env=env).ok("peer")
    kxutil.openssl("pkey", "-in", key, "-pubout", "-out", pub, env=env).ok("peer pub")
    kxutil.openssl("pkeyutl", "-derive", "-inkey", key, "-peerkey", tokpub, "-peerform", "DER", "-out", sec,
                   env=env).ok("peer derive")
    return pub, sec.read_bytes()


def keyx_derive(env, tmp, inkey, peer_pub, name="keyx.bin"):
    out = tmp / name
    kxutil.openssl("pkeyutl", "-derive", "-inkey", inkey, "-peerkey", peer_pub, "-out", out, env=env).ok("keyx derive")
    return out.read_bytes()


# ---- token keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("alg,opts,label,key_id,priv_usage,pub_usage", [
    ("EC", ["group:P-256"], "kf-ec256", "c1", "sign, derive", "verify"),
    ("EC", ["group:P-384"], "kf-ec384", "c2", "sign, derive", "verify"),
    ("EC", ["group:P-521"], "kf-ec521", "c3", "sign, derive", "verify"),
    ("RSA", ["bits:2048"], "kf-rsa", "c4", "decrypt, sign", "encrypt, verify"),
    ("DH", ["group:ffdhe2048"], "kf-dh", "c5", "derive", "none"),
])
def test_genpkey_makes_a_token_key_pair(hsm, cnf, tmp, alg, opts, label, key_id, priv_usage, pub_usage):
    env, log = keyx_env(hsm, cnf, tmp)
    genkey(env, tmp, label, alg, *opts, label=label, key_id=key_id).ok("genpkey")
    objs = by_label(hsm, label)
    priv, pub = objs["Private Key"], objs["Public Key"]
    assert priv["id"] == pub["id"] == key_id, objs
    access = [a.strip() for a in priv["access"].split(",")]
    assert "sensitive" in access and "never extractable" in access, priv
    assert priv["usage"] == priv_usage and pub["usage"] == pub_usage, objs
    # CKA_PRIVATE: without a login only the public half is visible
    r = hsm.tool(TOKEN, "--list-objects", login=False).ok("list without login")
    assert re.search(rf"Public Key Object.*\n(?:\s+.*\n)*?\s+label:\s+{label}\n", r.out), r.out
    assert not re.search(rf"Private Key Object.*\n(?:\s+.*\n)*?\s+label:\s+{label}\n", r.out), r.out
    events = [e for e in kxutil.read_audit(log) if e["event"] == "keygen"]
    assert [(e["backend"], e["ephemeral"], e["ok"]) for e in events] == [("pkcs11", False, True)], events
    # the reference file holds no private key, and keyx freed the key without deleting it
    assert "PRIVATE KEY-----" not in (tmp / f"{label}.pem").read_text()
    assert set(by_label(hsm, label)) == {"Private Key", "Public Key"}


def test_ec_token_key_derives_what_libp11_and_the_peer_derive(hsm, cnf, tmp):
    """A key without keyx-id gets a fresh 8-byte id; used by URI in later processes (it survived
    the one that made it), keyx's secret equals the default provider's peer side and libp11's."""
    env, log = keyx_env(hsm, cnf, tmp, EC_TOKEN)
    genkey(env, tmp, "ec", "EC", "group:P-256", label="kf-ec-derive").ok("genpkey")
    priv = by_label(hsm, "kf-ec-derive", EC_TOKEN)["Private Key"]
    assert re.fullmatch(r"[0-9a-f]{16}", priv["id"]), priv
    uri = f"pkcs11:token={EC_TOKEN};object=kf-ec-derive;type=private"
    peer_pub, expected = ec_peer_secret(tmp, read_pub(hsm, tmp, priv["id"], "ec", EC_TOKEN))
    ours = keyx_derive(env, tmp, uri, peer_pub)
    assert len(ours) == 32 and ours == expected, "keyx's secret differs from the peer's"
    theirs = tmp / "libp11.bin"
    kxutil.openssl("pkeyutl", "-derive", "-engine", "pkcs11", "-keyform", "engine",
                   "-inkey", f"pkcs11:token={EC_TOKEN};id={pct(priv['id'])};type=private;pin-value={PIN}",
                   "-peerkey", peer_pub, "-out", theirs,
                   env=hsm.env(PKCS11_MODULE_PATH=hsm.module)).ok("libp11 derive")
    assert theirs.read_bytes() == ours, "keyx and libp11 derived different secrets"
    assert ours.hex() not in log.read_text()


def test_dh_token_key_derives_what_the_peer_derives(hsm, cnf, tmp):
    """pkcs11-tool cannot read DH public keys: the peer uses the one keyx exports. The secret
    the default provider computes from it and the peer's private key can only equal keyx's
    (computed in the token from the token's private key) if that public key is the token's."""
    env, _ = keyx_env(hsm, cnf, tmp)
    genkey(env, tmp, "dh", "DH", "group:ffdhe2048", label="kf-dh-derive", key_id="d1").ok("genpkey")
    uri = f"pkcs11:token={TOKEN};id=%d1;type=private"
    plain = kxutil.base_env()
    tokpub, key, pub, sec = (tmp / x for x in ("tok.pub", "peer.pem", "peer.pub", "peer.bin"))
    kxutil.openssl("pkey", "-in", uri, "-pubout", "-out", tokpub, env=env).ok("pubout")
    kxutil.openssl("genpkey", "-algorithm", "DH", "-pkeyopt", "group:ffdhe2048", "-out", key, env=plain).ok("peer")
    kxutil.openssl("pkey", "-in", key, "-pubout", "-out", pub, env=plain).ok("peer pub")
    kxutil.openssl("pkeyutl", "-derive", "-inkey", key, "-peerkey", tokpub, "-out", sec, env=plain).ok("peer")
    ours = keyx_derive(env, tmp, uri, pub)
    assert len(ours) == 256 and ours == sec.read_bytes()


def test_rsa_token_key_decrypts_what_the_default_provider_encrypted(hsm, cnf, tmp):
    env, _ = keyx_env(hsm, cnf, tmp)
    genkey(env, tmp, "rsa", "RSA", "bits:2048", label="kf-rsa-oaep", key_id="e1").ok("genpkey")
    tokpub = read_pub(hsm, tmp, "e1", "rsa")
    msg, ct, back = tmp / "msg", tmp / "ct", tmp / "back"
    msg.write_bytes(b"keyx token key \x00\x01 wrapped")
    kxutil.openssl("pkeyutl", "-encrypt", "-pubin", "-keyform", "DER", "-inkey", tokpub, "-in", msg, "-out", ct,
                   "-pkeyopt", "rsa_padding_mode:oaep", env=kxutil.base_env()).ok("encrypt")
    kxutil.openssl("pkeyutl", "-decrypt", "-inkey", f"pkcs11:token={TOKEN};object=kf-rsa-oaep;type=private",
                   "-in", ct, "-out", back, "-pkeyopt", "rsa_padding_mode:oaep", env=env).ok("decrypt")
    assert back.read_bytes() == msg.read_bytes()


@pytest.mark.parametrize("second,needles", [
    (dict(label="kf-dup", key_id="f2"), ["a key labelled 'kf-dup' already exists on token 'keyx-kf'",
                                        "choose another keyx-label"]),
    (dict(label="kf-other", key_id="f1"), ["a key with id f1 already exists on token 'keyx-kf'",
                                          "choose another keyx-id"]),
    (dict(key_id="f1"), ["a key with id f1 already exists on token 'keyx-kf'"]),
])
def test_a_second_key_of_the_same_label_or_id_is_refused(hsm, cnf, tmp, second, needles):
    env, log = keyx_env(hsm, cnf, tmp)
    if not any(o["label"] == "kf-dup" for o in objects(hsm)):
        genkey(env, tmp, "first", "EC", "group:P-256", label="kf-dup", key_id="f1").ok("first key")
    before = objects(hsm)
    r = genkey(env, tmp, "second", "EC", "group:P-256", **second)
    check_error(r, *needles)
    assert objects(hsm) == before, "a refused key left objects on the token"
    fails = [e for e in kxutil.read_audit(log) if e["event"] == "keygen" and not e["ok"]]
    assert fails and fails[-1]["ephemeral"] is False, fails


@pytest.mark.parametrize("opt,needles", [
    ("keyx-id:zz", ["keyx-id:zz: expected hex digits"]),
    ("keyx-id:0", ["keyx-id:0: expected hex digits"]),
    ("keyx-persist:0x81000010", ["keyx-persist and keyx-label cannot be combined"]),
])
def test_bad_names_are_refused(hsm, cnf, tmp, opt, needles):
    env, _ = keyx_env(hsm, cnf, tmp)
    before = objects(hsm)
    r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt", "keyx-label:kf-bad",
                       "-pkeyopt", opt, "-out", tmp / "bad.pem", env=env)
    check_error(r, *needles)
    assert objects(hsm) == before


def test_x25519_cannot_be_a_token_key(hsm, cnf, tmp):
    env, _ = keyx_env(hsm, cnf, tmp)
    r = genkey(env, tmp, "x", "X25519", label="kf-x25519")
    check_error(r, "the pkcs11 backend cannot generate X25519 keys")


# ---- listing ---------------------------------------------------------------------------------


def ec_point(der):
    """The uncompressed point in CKA_EC_POINT: a DER OCTET STRING (short or 0x81 long form) as
    PKCS#11 says, or the raw point some modules give. Parsed, not guessed from the tail: a guess
    by length can match inside a longer point's coordinates."""
    if der[:1] == b"\x04" and len(der) >= 2:
        n, body = (der[1], der[2:]) if der[1] < 0x80 else (der[2], der[3:]) if der[1] == 0x81 else (-1, b"")
        if n == len(body) and body[:1] == b"\x04" and len(body) in (65, 97, 133):
            return body
    if der[:1] == b"\x04" and len(der) in (65, 97, 133):
        return der
    raise AssertionError(f"no EC point in {der.hex()}")


def found(r):
    """How many objects storeutl listed. OpenSSL 3.0 always ends with 'Total found: N'; 3.5
    prints that line only when it found something."""
    listed = len(re.findall(r"^\d+: ", r.out, re.M))
    m = re.search(r"^Total found: (\d+)$", r.out, re.M)
    assert (m and int(m.group(1)) == listed) or (not m and listed == 0), r
    return listed


def storeutl(env, uri, *opts):
    r = kxutil.openssl("storeutl", "-keys", *opts, uri, env=env).ok("storeutl")
    return r, found(r)


def test_storeutl_lists_exactly_the_tokens_keys(hsm, cnf, tmp):
    env, log = keyx_env(hsm, cnf, tmp)
    for alg, opt, label in (("EC", "group:P-256", "kf-list-ec"), ("RSA", "bits:2048", "kf-list-rsa"),
                            ("DH", "group:ffdhe2048", "kf-list-dh")):
        if not any(o["label"] == label for o in objects(hsm)):
            genkey(env, tmp, label, alg, opt, label=label).ok("genpkey")
    privs = [o for o in objects(hsm) if o["kind"] == "Private Key"]
    assert len(privs) >= 3
    r, n = storeutl(env, f"pkcs11:token={TOKEN}")
    assert n == len(privs), f"storeutl found {n} keys, pkcs11-tool lists {len(privs)}:\n{r.out}"
    assert re.findall(r"^\d+: (\S+)", r.out, re.M) == ["Pkey"] * n, r.out
    # each listed key was loaded by reference once: its audit key id is the token's public key
    loads = [e for e in kxutil.read_audit(log) if e["event"] == "load"]
    assert len(loads) == n and all(e["ok"] and e["backend"] == "pkcs11" and e["ephemeral"] is False
                                   for e in loads), loads
    assert sorted(e["alg"] for e in loads) == sorted(o["type"] for o in privs), (loads, privs)
    pubs = {o["id"]: o for o in objects(hsm) if o["kind"] == "Public Key"}
    want = {kxutil.key_id(ec_point(bytes.fromhex(pubs[o["id"]]["ec_point"])).hex()): o["label"]
            for o in privs if o["type"] == "EC"}
    assert len(want) == sum(o["type"] == "EC" for o in privs)
    got = {e["key"] for e in loads if e["alg"] == "EC"}
    assert got == set(want), (f"keys whose audit id is not their token public key: "
                              f"{[l for i, l in want.items() if i not in got]}", loads)


def test_storeutl_on_a_token_without_keys_finds_none(hsm, cnf, tmp):
    env, _ = keyx_env(hsm, cnf, tmp)
    r, n = storeutl(env, f"pkcs11:token={EMPTY_TOKEN}")
    assert n == 0 and "error" not in r.err.lower(), r


def test_storeutl_of_one_key_lists_it(hsm, cnf, tmp):
    env, _ = keyx_env(hsm, cnf, tmp)
    if not any(o["label"] == "kf-list-ec" for o in objects(hsm)):
        genkey(env, tmp, "one", "EC", "group:P-256", label="kf-list-ec").ok("genpkey")
    r, n = storeutl(env, f"pkcs11:token={TOKEN};object=kf-list-ec;type=private")
    assert n == 1, r


@pytest.mark.parametrize("uri,needles", [
    ("pkcs11:token=no-such-token", ["no key matches 'pkcs11:token=no-such-token'", "searched 0 tokens"]),
    (f"pkcs11:token={TOKEN};object=kf-nothing", ["no key matches", "kf-nothing"]),
    (f"pkcs11:token={TOKEN};object=%zz", ["invalid PKCS#11 URI"]),
    (f"pkcs11:token={TOKEN};type=public", ["names a public key object", "type=private"]),
])
def test_storeutl_errors_are_todays(hsm, cnf, tmp, uri, needles):
    env, _ = keyx_env(hsm, cnf, tmp)
    r = kxutil.openssl("storeutl", "-keys", uri, env=env)
    text = r.out + r.err
    assert r.rc != 0 or found(r) == 0, r
    for n in needles:
        assert n in text, f"error does not say {n!r}:\n{r!r}"


# pkcs11-tool 0.23 reads P-256 public keys only ("cannot create EVP_PKEY" for P-384 with OpenSSL 3)
@pytest.mark.parametrize("alg,opt,label", [("EC", "group:P-256", "kf-pub-ec"), ("RSA", "bits:2048", "kf-pub-rsa")])
def test_pubout_and_text_pub_of_a_token_key(hsm, cnf, tmp, alg, opt, label):
    env, _ = keyx_env(hsm, cnf, tmp)
    genkey(env, tmp, label, alg, opt, label=label).ok("genpkey")
    key_id = by_label(hsm, label)["Private Key"]["id"]
    uri = f"pkcs11:token={TOKEN};object={label};type=private"
    kxutil.openssl("pkey", "-in", uri, "-pubout", "-outform", "DER", "-out", tmp / "keyx.der", env=env).ok("pubout")
    assert (tmp / "keyx.der").read_bytes() == read_pub(hsm, tmp, key_id, label).read_bytes()
    ours = kxutil.openssl("pkey", "-in", uri, "-text_pub", "-noout", env=env).ok("text_pub").out
    theirs = kxutil.openssl("pkey", "-pubin", "-inform", "DER", "-in", tmp / f"{label}-tok.der", "-text_pub",
                            "-noout", env=kxutil.base_env()).ok("text_pub").out
    assert ours == theirs and ("Public-Key: (256 bit)" in ours or "Public-Key: (2048 bit)" in ours), ours


def test_first_token_missing_the_key_is_made_on_the_next(hsm, cnf, tmp):
    """pkcs11-token names a token that is not there, then keyx-kf-ec: the key is made once, on
    keyx-kf-ec, and a failover event says so."""
    log = tmp / "audit.jsonl"
    settings = hsm.keyx_settings(tokens=("keyx-kf-gone", EC_TOKEN), **{"audit-log": log})
    env = hsm.env(OPENSSL_CONF=cnf(keyx=settings))
    genkey(env, tmp, "fo", "EC", "group:P-256", label="kf-failover").ok("genpkey")
    priv = by_label(hsm, "kf-failover", EC_TOKEN)["Private Key"]
    assert not any(o["label"] == "kf-failover" for o in objects(hsm))
    [(_, locator, _)] = references((tmp / "fo.pem").read_text())
    assert locator == expected_locator(hsm, EC_TOKEN, priv["id"], "kf-failover"), locator
    events = kxutil.read_audit(log)
    assert any(e["event"] == "failover" for e in events), events
    assert [e["ok"] for e in events if e["event"] == "keygen"] == [True], events



# ---- locators: what a reference file records ---------------------------------------------------


def references(text):
    """(backend, locator, SPKI DER) of every KEYX KEY PEM block in text, read with a DER reader
    of the test's own: SEQUENCE { INTEGER 1, UTF8String, UTF8String, SEQUENCE }."""
    out = []
    for body in re.findall(r"-----BEGIN KEYX KEY-----\n(.*?)-----END KEYX KEY-----", text, re.S):
        der = base64.b64decode("".join(body.split()))

        def tlv(data, i):
            tag, n, j = data[i], data[i + 1], i + 2
            if n & 0x80:
                k = n & 0x7F
                n, j = int.from_bytes(data[j:j + k], "big"), j + k
            return tag, data[j:j + n], data[i:j + n], j + n

        tag, seq, _, _ = tlv(der, 0)
        assert tag == 0x30
        items, i = [], 0
        while i < len(seq):
            t, content, whole, i = tlv(seq, i)
            items.append((t, content, whole))
        assert [t for t, _, _ in items] == [0x02, 0x0C, 0x0C, 0x30] and items[0][1] == b"\x01", items
        out.append((items[1][1].decode(), items[2][1].decode(), items[3][2]))
    return out


def expected_locator(hsm, token, key_id, label):
    """The canonical URI as RFC 7512 and the brief spell it, built here from softhsm2-util's
    serial and pkcs11-tool's id and label (p11-kit writes %XX in upper case)."""
    return (f"pkcs11:serial={hsm.serial(token)};token={token};id={pct(key_id).upper()};"
            f"object={label};type=private")


def test_reference_file_names_the_token_key(hsm, cnf, tmp):
    env, _ = keyx_env(hsm, cnf, tmp)
    genkey(env, tmp, "ref", "EC", "group:P-256", label="kf-ref", key_id="0a0b").ok("genpkey")
    text = (tmp / "ref.pem").read_text()
    [(backend, locator, spki)] = references(text)
    assert backend == "pkcs11"
    assert locator == expected_locator(hsm, TOKEN, "0a0b", "kf-ref"), locator
    assert "pin" not in locator and "module" not in locator and PIN not in text
    assert spki == read_pub(hsm, tmp, "0a0b", "ref").read_bytes()
    # the locator and the reference (its DER form) load the same key: one secret, the peer's
    peer_pub, expected = ec_peer_secret(tmp, tmp / "ref-tok.der")
    assert keyx_derive(env, tmp, locator, peer_pub, "by-locator.bin") == expected
    der = tmp / "ref.der"
    der.write_bytes(base64.b64decode("".join(text.splitlines()[1:-1])))
    out = tmp / "by-ref.bin"
    kxutil.openssl("pkeyutl", "-derive", "-keyform", "DER", "-inkey", der, "-peerkey", peer_pub, "-out", out,
                   env=env).ok("derive by reference")
    assert out.read_bytes() == expected


@pytest.mark.parametrize("uri", [f"pkcs11:token={TOKEN};id=%0a%0b", f"pkcs11:object=kf-ref;type=private"])
def test_a_key_loaded_by_any_uri_gets_the_canonical_locator(hsm, cnf, tmp, uri):
    env, _ = keyx_env(hsm, cnf, tmp)
    if not any(o["label"] == "kf-ref" for o in objects(hsm)):
        genkey(env, tmp, "ref", "EC", "group:P-256", label="kf-ref", key_id="0a0b").ok("genpkey")
    r = kxutil.openssl("pkey", "-in", uri, env=env).ok("write reference")
    [(_, locator, _)] = references(r.out)
    assert locator == expected_locator(hsm, TOKEN, "0a0b", "kf-ref")


def test_a_token_key_without_label_is_named_by_its_id(hsm, cnf, tmp):
    env, _ = keyx_env(hsm, cnf, tmp)
    genkey(env, tmp, "nolabel", "EC", "group:P-256", key_id="0c0d").ok("genpkey")
    [(_, locator, _)] = references((tmp / "nolabel.pem").read_text())
    assert locator == f"pkcs11:serial={hsm.serial(TOKEN)};token={TOKEN};id=%0C%0D;type=private"
    kxutil.openssl("pkey", "-in", locator, "-pubout", env=env).ok("load by locator")


def test_an_ephemeral_token_key_has_no_locator(hsm, cnf, tmp):
    env, _ = keyx_env(hsm, cnf, tmp)
    before = objects(hsm)
    r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", tmp / "eph.pem", env=env)
    check_error(r, "an ephemeral pkcs11 key has no locator; generate it with keyx-label/keyx-id to keep it "
                   "on the token")
    assert objects(hsm) == before


def test_storeutl_writes_a_reference_and_text_per_key(hsm, cnf, tmp):
    env, _ = keyx_env(hsm, cnf, tmp)
    if not any(o["label"] == "kf-list-ec" for o in objects(hsm)):
        genkey(env, tmp, "one", "EC", "group:P-256", label="kf-list-ec").ok("genpkey")
    privs = [o for o in objects(hsm) if o["kind"] == "Private Key"]
    r, n = storeutl(env, f"pkcs11:token={TOKEN}")
    refs = references(r.out)
    assert len(refs) == n == len(privs)
    assert sorted(loc for _, loc, _ in refs) == sorted(
        expected_locator(hsm, TOKEN, o["id"], o["label"]) if o["label"] else
        f"pkcs11:serial={hsm.serial(TOKEN)};token={TOKEN};id={pct(o['id']).upper()};type=private"
        for o in privs)
    # -text: each key's public part and where its private part is; then -pubout by its locator
    r, _ = storeutl(env, f"pkcs11:token={TOKEN}", "-text", "-noout")
    for _, loc, spki in refs:
        assert f"private key: in the pkcs11 backend, {loc}" in r.out, r.out
        der = kxutil.openssl("pkey", "-in", loc, "-pubout", "-outform", "DER", env=env, text=False).ok("pubout").out
        assert der == spki
    assert "PRIVATE KEY-----" not in r.out and "priv:" not in r.out


def test_labels_are_percent_encoded_in_the_locator(hsm, cnf, tmp):
    """RFC 7512: a label with a space, ';', '/' and non-ASCII is percent-encoded; the locator
    loads the key back."""
    env, _ = keyx_env(hsm, cnf, tmp)
    label = "kf srv;1/\u00e9"
    genkey(env, tmp, "enc", "EC", "group:P-256", label=label, key_id="0e").ok("genpkey")
    [(_, locator, spki)] = references((tmp / "enc.pem").read_text())
    assert locator == (f"pkcs11:serial={hsm.serial(TOKEN)};token={TOKEN};id=%0E;"
                       "object=kf%20srv%3B1%2F%C3%A9;type=private"), locator
    der = kxutil.openssl("pkey", "-in", locator, "-pubout", "-outform", "DER", env=env, text=False).ok("load").out
    assert der == spki == read_pub(hsm, tmp, "0e", "enc").read_bytes()


# 2048-bit safe-prime DH parameters generated once with `openssl genpkey -genparam -algorithm DH`
# (no named group: keyx hands the token explicit p and g)
EXPLICIT_DH = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEAzHmvTeIUYTWD+vR6cF3axiFg/WL4fdT//0+YrMjrVZbhF1Tl3uoX
IqhmK7l0drclOFmUX4VqD/RJ7MaH2sNbnlRvNBwJECNzn0q9PUwBgDWRlw5tsL88
bsExiwK6pZA3+9lOXZwRmUQiIk1ZXQvbi2f1uBfH7QOUKsU4kRmijTFcV3xXfEBj
/eB6F6x8MznAbWDCdDh7m89kuspXfgIJpp5kL/dgRV9skGcPDy0b+ZLBXHu3a00N
KEY5qXI8YT9lzzEHdBVRlkK/o4pTQPl9JtXalPtIwj3/qWFVje+pJViO6jZmL1/T
vv59ozhxIvynsmuwb/qqDhkblZSNDz9tNwIBAg==
-----END DH PARAMETERS-----
"""


def test_dh_token_key_on_explicit_parameters(hsm, cnf, tmp):
    env, _ = keyx_env(hsm, cnf, tmp)
    params = tmp / "dh.params"
    params.write_text(EXPLICIT_DH)
    tokpub = tmp / "tok.pub"
    r = kxutil.run(["/usr/bin/python3", "-c", kxutil.KEY_ON_PARAMS_APP, "DH", params, "kf-dh-explicit",
                    tmp / "tok.ref", tokpub], env=env)
    assert r.rc == 0 and "generated" in r.out, r
    assert (tmp / "tok.ref").read_text().startswith("-----BEGIN KEYX KEY-----")
    assert by_label(hsm, "kf-dh-explicit")["Private Key"]["type"] == "DH"
    plain = kxutil.base_env()
    key, pub, sec = (tmp / x for x in ("peer.pem", "peer.pub", "peer.bin"))
    kxutil.openssl("genpkey", "-paramfile", params, "-out", key, env=plain).ok("peer")
    kxutil.openssl("pkey", "-in", key, "-pubout", "-out", pub, env=plain).ok("peer pub")
    kxutil.openssl("pkeyutl", "-derive", "-inkey", key, "-peerkey", tokpub, "-out", sec, env=plain).ok("peer derive")
    uri = f"pkcs11:token={TOKEN};object=kf-dh-explicit;type=private"
    ours = keyx_derive(env, tmp, uri, pub)
    assert len(ours) == 256 and ours == sec.read_bytes()


def test_storeutl_takes_the_keyx_prefix(hsm, cnf, tmp):
    env, _ = keyx_env(hsm, cnf, tmp)
    privs = [o for o in objects(hsm) if o["kind"] == "Private Key"]
    _, n = storeutl(env, f"keyx:pkcs11:token={TOKEN}")
    assert n == len(privs) > 1
