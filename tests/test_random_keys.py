"""Random key pairs: keyx's shared secrets equal the default provider's for the same keys.

Keys are made by the default provider; each party's private key is imported into keyx and
derived against the other's public key, given raw (built by keyx, or by the default provider)
and as a SubjectPublicKeyInfo decoded by the default provider. The default provider run on the
same vectors is the independent reference.
"""

import pytest

import kxutil

PAIRS = 3
GROUPS = [
    ("EC", "P-256"),
    ("EC", "P-384"),
    ("EC", "P-521"),
    ("X25519", "X25519"),
    ("X448", "X448"),
    ("DH", "ffdhe2048"),
    ("DH", kxutil.EXPLICIT_DH),
]
# Groups where one more pair is searched whose secret starts with a zero byte: the secret must
# keep its full length (EC x-coordinate, X25519 u, padded DH) or be stripped (DH, pad 0).
ZERO_PAIR = {("EC", "P-256"), ("EC", "P-521"), ("X25519", "X25519"), ("DH", "ffdhe2048")}


def gid(alg, group):
    return f"{alg}-{'explicit' if group.startswith('explicit:') else group}"


def make_pairs(alg, group):
    pairs = [kxutil.pair(alg, group) for _ in range(PAIRS)]
    if (alg, group) in ZERO_PAIR:
        z = kxutil.pair(alg, group, zero=True)
        assert z["S"].startswith("00"), "zero search gave no leading zero byte"
        pairs.append(z)
    return pairs


def vectors_for(alg, group, pairs):
    vectors, owner = [], {}
    for i, k in enumerate(pairs):
        for me, peer in (("A", "B"), ("B", "A")):
            for form in ("raw", "spki"):
                vid = f"{i}{me}{peer}-{form}"
                vectors.append((vid, alg, group, k[me]["priv"], form, k[peer][form if form == "spki" else "pub"]))
                owner[vid] = (i, me)
    return vectors, owner


@pytest.mark.parametrize("alg,group", [pytest.param(a, g, id=gid(a, g)) for a, g in GROUPS])
def test_same_secret_as_default_provider(build, tmp, alg, group):
    pairs = make_pairs(alg, group)
    vectors, owner = vectors_for(alg, group, pairs)
    pads = (None, 0, 1) if alg == "DH" else (None,)

    for pad in pads:
        ref, _ = kxutil.derive(vectors, provider="default", dh_pad=pad)
        for vid, out in ref.items():
            i, _ = owner[vid]
            assert out.ok, f"default provider failed {vid}: {out}"
            full = pairs[i]["S"]
            want = full if alg != "DH" or pad == 1 else full[2 * ((len(full) - len(full.lstrip('0'))) // 2):]
            assert out.secret == want, f"default provider, pad {pad}, {vid}: {out.secret} != {want}"

        for peer_provider in (None, "default"):
            log = tmp / f"audit-{pad}-{peer_provider}.jsonl"
            env = kxutil.base_env(KEYX_AUDIT_LOG=log)
            got, res = kxutil.derive(vectors, provider="keyx", peer_provider=peer_provider, dh_pad=pad, env=env)
            wrong = [
                f"  {vid}: keyx {got[vid]} / default {ref[vid].secret}"
                for vid in ref
                if not got[vid].ok or got[vid].secret != ref[vid].secret
            ]
            assert not wrong, (
                f"{gid(alg, group)} pad={pad} peers by {peer_provider or 'keyx'}: keyx differs from "
                f"the default provider on {len(wrong)} of {len(ref)} derives:\n" + "\n".join(wrong)
            )

            events = kxutil.read_audit(log)
            kxutil.check_audit_schema(events)
            derives = [e for e in events if e["event"] == "derive" and e["pid"] == res.pid]
            assert len(derives) == len(vectors), f"{len(derives)} derive events for {len(vectors)} derives"
            want_ids = sorted(kxutil.key_id(pairs[owner[v[0]][0]][owner[v[0]][1]]["pub"]) for v in vectors)
            assert sorted(e.get("key") for e in derives) == want_ids, (
                "audit key ids are not SHA-256 of the encoded public keys:\n"
                f"  got  {sorted(e.get('key') for e in derives)}\n  want {want_ids}"
            )
            for e in derives:
                assert e["ok"] and e.get("backend") == "software" and e.get("alg") == alg, f"derive event {e}"
                if group.startswith("explicit:"):
                    assert "group" not in e, f"explicit DH parameters got a group name: {e}"
                else:
                    assert e.get("group") == group, f"derive event without group {group}: {e}"
            loads = [e for e in events if e["event"] == "load" and e["pid"] == res.pid]
            assert loads, "importing private keys into keyx wrote no load event"
            text = log.read_text()
            kxutil.assert_no_secrets(text, [k["S"] for k in pairs], "audit log")
            kxutil.assert_no_secrets(text, [k[p]["priv"] for k in pairs for p in "AB"], "audit log")


# X9.42 DH ("DHX", CMS's kind): the default provider makes pairs on the given parameters until
# their padded secret starts with a zero byte; keyx (the private key imported into it) must give
# the same full-length secret. Prints "default HEX" and "keyx HEX" (or "keyx failed").
DHX_ZERO_APP = kxutil.LIBCRYPTO_CTYPES + r"""
set_pad = fn("EVP_PKEY_CTX_set_dh_pad", c_int, c_void_p, c_int)
read_params = fn("PEM_read_bio_Parameters_ex", c_void_p, c_void_p, c_void_p, c_void_p, c_char_p)
kg_ctx = fn("EVP_PKEY_CTX_new_from_pkey", c_void_p, c_void_p, c_void_p, c_char_p)
ctx = LIB_new()
assert LIB_load(ctx, sys.argv[1].encode()) == 1
b = bio_file(sys.argv[2].encode(), b"r")
params = read_params(b, None, ctx, b"provider=default")
bio_free(b)
assert params

def keypair():
    c = kg_ctx(ctx, params, b"provider=default")
    k = c_void_p()
    assert kg_init(c) == 1 and generate(c, byref(k)) == 1
    CTX_free(c)
    return k

def derive(key, peer, propq):
    c = CTX_pkey(ctx, key, propq)
    n = c_size_t(512)
    buf = ctypes.create_string_buffer(512)
    ok = c and d_init(c) == 1 and set_pad(c, 1) == 1 and d_peer(c, peer) == 1 and d_derive(c, buf, byref(n)) == 1
    CTX_free(c)
    return buf.raw[:n.value].hex() if ok else None

for _ in range(4000):
    a, b = keypair(), keypair()
    z = derive(a, b, b"provider=default")
    if z.startswith("00"):
        print("default", z)
        print("keyx", derive(a, b, b"provider=keyx") or "failed", flush=True)
        break
    pkey_free(a)
    pkey_free(b)
"""


@pytest.mark.parametrize("kind", ["ffdhe2048", "explicit"])
def test_dhx_secret_with_a_leading_zero_byte(tmp, kind):
    """X9.42 DH keys (CMS's) keep Z at the length of p when it starts with a zero byte, as
    the default provider does (about one pair in 256); keyx once returned it one byte short and
    failed the derive (a CMS message to a software DHX recipient, now and then)."""
    params = tmp / "dhx.param"
    opts = (("dh_paramgen_type:2", "group:ffdhe2048") if kind == "ffdhe2048"
            else ("dh_paramgen_prime_len:2048", "dh_paramgen_subprime_len:224"))
    kxutil.openssl("genpkey", "-genparam", "-algorithm", "DHX", *[a for o in opts for a in ("-pkeyopt", o)],
                   "-out", params, env=kxutil.base_env()).ok("DHX parameters")
    cnf = kxutil.write_cnf(tmp / "openssl.cnf", keyx={"backends": "software"})
    app = tmp / "app.py"
    app.write_text(DHX_ZERO_APP)
    r = kxutil.run(["/usr/bin/python3", app, cnf, params], env=kxutil.base_env(), timeout=300)
    assert r.rc == 0, r
    got = dict(line.split(" ", 1) for line in r.out.splitlines() if " " in line)
    assert got.get("default", "").startswith("00") and len(got["default"]) == 512, r
    assert got.get("keyx") == got["default"], r
