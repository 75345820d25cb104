"""The openssl command line: PEM keys made by the default provider, derived through keyx."""

import re

import pytest

import kxutil
from kxutil import base_env, openssl

ALGS = {
    "EC-P-256": (["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"], "EC", "P-256"),
    "EC-P-384": (["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"], "EC", "P-384"),
    "X25519": (["-algorithm", "X25519"], "X25519", "X25519"),
    "X448": (["-algorithm", "X448"], "X448", "X448"),
    "DH-ffdhe2048": (["-algorithm", "DH", "-pkeyopt", "group:ffdhe2048"], "DH", "ffdhe2048"),
}


def der_tlv(b, i):
    tag, n = b[i], b[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(b[i : i + k], "big")
        i += k
    return tag, b[i : i + n], i + n


def encoded_public(spki, alg, dh_size=256):
    """The encoded public key keyx hashes for its key id, from a DER SubjectPublicKeyInfo."""
    _, body, _ = der_tlv(spki, 0)
    _, _, j = der_tlv(body, 0)  # AlgorithmIdentifier
    _, bits, _ = der_tlv(body, j)  # BIT STRING
    key = bits[1:]
    if alg == "DH":
        _, y, _ = der_tlv(key, 0)  # INTEGER
        return y.lstrip(b"\0").rjust(dh_size, b"\0")
    return key


def private_hex(pem, env):
    """The private key's hex digits as `openssl pkey -text` prints them (leading zeros off)."""
    text = openssl("pkey", "-in", pem, "-text", "-noout", env=env).ok("pkey -text").out
    m = re.search(r"^(?:priv|private-key):\s*\n((?:\s+[0-9a-f:]+\n)+)", text, re.M)
    assert m, f"no private key in:\n{text}"
    h = re.sub(r"[^0-9a-f]", "", m.group(1))
    while h.startswith("00"):
        h = h[2:]
    return h


@pytest.fixture
def keys(tmp, build):
    """keys(name) -> paths and facts of two default-provider key pairs a, b."""

    def make(name):
        args, alg, group = ALGS[name]
        env = base_env()
        out = {}
        for who in ("a", "b"):
            pem, pub = tmp / f"{who}.pem", tmp / f"{who}.pub.pem"
            openssl("genpkey", *args, "-out", pem, env=env).ok("genpkey")
            openssl("pkey", "-in", pem, "-pubout", "-out", pub, env=env).ok("pkey -pubout")
            der = openssl("pkey", "-in", pem, "-pubout", "-outform", "DER", env=env, text=False).ok().out
            out[who] = {"pem": pem, "pub": pub, "id": kxutil.key_id(encoded_public(der, alg).hex()),
                        "priv": private_hex(pem, env)}
        ref = tmp / "ref.bin"
        openssl("pkeyutl", "-derive", "-inkey", out["a"]["pem"], "-peerkey", out["b"]["pub"], "-out", ref,
                env=env).ok("default provider pkeyutl -derive")
        out["secret"] = ref.read_bytes()
        assert out["secret"], "empty reference secret"
        return out

    return make


KEYX_ARGS = ["-propquery", "?provider=keyx"]


@pytest.mark.parametrize("name", sorted(ALGS))
def test_pkeyutl_derive_through_keyx(keys, tmp, module_dir, name):
    _, alg, group = ALGS[name]
    k = keys(name)
    log = tmp / "audit.jsonl"
    env = base_env(KEYX_AUDIT_LOG=log)
    for me, peer in (("a", "b"), ("b", "a")):
        out = tmp / f"keyx-{me}.bin"
        r = openssl("pkeyutl", "-provider-path", module_dir, "-provider", "keyx", "-provider", "default",
                    *KEYX_ARGS, "-derive", "-inkey", k[me]["pem"], "-peerkey", k[peer]["pub"], "-out", out,
                    env=env)
        r.ok(f"pkeyutl -derive through keyx ({me} with {peer}'s public key)")
        assert out.read_bytes() == k["secret"], (
            f"keyx secret {out.read_bytes().hex()} != default provider's {k['secret'].hex()}"
        )
        events = [e for e in kxutil.read_audit(log) if e["pid"] == r.pid]
        derives = [e for e in events if e["event"] == "derive"]
        assert len(derives) == 1, f"want one derive event from pkeyutl (pid {r.pid}), got {events}"
        d = derives[0]
        assert d["ok"] and d.get("backend") == "software" and d.get("alg") == alg and d.get("group") == group, d
        assert d.get("key") == k[me]["id"], f"derive by key {d.get('key')}, expected {me}'s {k[me]['id']}"
        assert any(e["event"] == "load" and e.get("key") == k[me]["id"] for e in events), (
            f"no load event for the PEM private key imported into keyx: {events}"
        )
    kxutil.check_audit_schema(kxutil.read_audit(log))
    text = log.read_text()
    kxutil.assert_no_secrets(text, [k["secret"].hex(), k["a"]["priv"], k["b"]["priv"]], "audit log")


@pytest.mark.parametrize("name", ["EC-P-256", "X25519", "DH-ffdhe2048"])
def test_pkeyutl_derive_with_keyx_preferred_in_openssl_cnf(keys, tmp, cnf, name):
    """No command-line flags: openssl.cnf alone sends the derive to keyx."""
    k = keys(name)
    log = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=cnf(keyx={"audit-log": log}))
    out = tmp / "keyx.bin"
    r = openssl("pkeyutl", "-derive", "-inkey", k["a"]["pem"], "-peerkey", k["b"]["pub"], "-out", out, env=env)
    r.ok("pkeyutl -derive with keyx preferred")
    assert out.read_bytes() == k["secret"]
    derives = [e for e in kxutil.read_audit(log) if e["pid"] == r.pid and e["event"] == "derive"]
    assert derives and derives[0]["ok"] and derives[0].get("key") == k["a"]["id"], derives
    kxutil.assert_no_secrets(log.read_text(), [k["secret"].hex(), k["a"]["priv"]], "audit log")
