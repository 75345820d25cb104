"""Invalid peer public keys are rejected with a clear error.

Each bad peer is given raw, built once by keyx's own keymgmt and once by the default provider
(whose import accepts some of them, e.g. X25519 small-order points and DH values, so that the
check must happen in keyx's exchange). The default provider on the same inputs is the check
that the inputs are really invalid.
"""

import pytest

import kxutil

X25519_P = 2**255 - 19
X448_P = 2**448 - 2**224 - 1


def le(n, size):
    return (n % 2 ** (8 * size)).to_bytes(size, "little").hex()


def x25519_bad():
    return {
        "zero": le(0, 32),
        "one": le(1, 32),
        # the two points of order 8 (libsodium's blocklist)
        "order8-a": le(325606250916557431795983626356110631294008115727848805560023387167927233504, 32),
        "order8-b": le(39382357235489614581723060781553021112529911719440698176882885853963445705823, 32),
        "p-1": le(X25519_P - 1, 32),
        "p": le(X25519_P, 32),
        "p+1": le(X25519_P + 1, 32),
    }


def x448_bad():
    return {
        "zero": le(0, 56),
        "one": le(1, 56),
        "p-1": le(X448_P - 1, 56),
        "p": le(X448_P, 56),
        "p+1": le(X448_P + 1, 56),
    }


def ec_bad(pub):
    """Bad points on the curve of pub (an uncompressed valid point, hex)."""
    raw = bytes.fromhex(pub)
    size = (len(raw) - 1) // 2
    flipped = raw[:-1] + bytes([raw[-1] ^ 1])  # same x, y off by one bit: not on the curve
    x_too_big = b"\x04" + b"\xff" * size + raw[1 + size :]
    return {
        "not-on-curve": flipped.hex(),
        "infinity": "00",
        "x-out-of-range": x_too_big.hex(),
        "truncated": raw[:-1].hex(),
        "zero-point": ("04" + "00" * 2 * size),
    }


def dh_bad(p, q=None):
    size = (p.bit_length() + 7) // 8
    bad = {
        "zero": 0,
        "one": 1,
        "p-1": p - 1,
        "p": p,
        "p+1": p + 1,
    }
    if q is not None:
        x = next(x for x in range(3, 1000) if pow(x, q, p) != 1)
        bad["outside-q-subgroup"] = x
    return {k: format(v, "x").rjust(2 * size, "0") if v else "00" for k, v in bad.items()}


def cases(build):
    """(id, alg, group, private key hex, bad peers {name: raw hex})"""
    out = []
    for group in ("P-256", "P-384", "P-521"):
        k = kxutil.pair("EC", group)
        out.append(("EC", group, k["A"]["priv"], ec_bad(k["B"]["pub"])))
    k = kxutil.pair("X25519", "X25519")
    out.append(("X25519", "X25519", k["A"]["priv"], x25519_bad()))
    k = kxutil.pair("X448", "X448")
    out.append(("X448", "X448", k["A"]["priv"], x448_bad()))
    p, q, _ = kxutil.dh_params("ffdhe2048")
    k = kxutil.pair("DH", "ffdhe2048")
    out.append(("DH", "ffdhe2048", k["A"]["priv"], dh_bad(p, q)))
    k = kxutil.pair("DH", kxutil.EXPLICIT_DH)
    out.append(("DH", kxutil.EXPLICIT_DH, k["A"]["priv"], dh_bad(int(kxutil.EXPLICIT_DH_P, 16))))
    return out


@pytest.fixture(scope="module")
def bad_vectors(build):
    vectors = []
    for alg, group, priv, bad in cases(build):
        gname = "explicit" if group.startswith("explicit:") else group
        for name, peer in bad.items():
            vectors.append((f"{alg}/{gname}/{name}", alg, group, priv, "raw", peer))
    return vectors


# Measured: OpenSSL 3.5's default provider derives with a DH peer outside the q-order subgroup
# (3.0 refuses it); keyx refuses it on both (test_invalid_peer_rejected_by_keyx).
DEFAULT_ACCEPTS_ON_35 = {"DH/ffdhe2048/outside-q-subgroup"}


def test_bad_inputs_are_bad_for_the_default_provider_too(bad_vectors):
    got, _ = kxutil.derive(bad_vectors, provider="default")
    known = DEFAULT_ACCEPTS_ON_35 if kxutil.openssl_version() >= (3, 5) else set()
    accepted = [f"  {vid}: {o}" for vid, o in got.items() if o.ok and vid not in known]
    assert not accepted, "the default provider accepts these 'invalid' peers (test data wrong):\n" + "\n".join(accepted)


@pytest.mark.parametrize("peer_provider", ["keyx", "default"])
def test_invalid_peer_rejected_by_keyx(bad_vectors, tmp, peer_provider):
    log = tmp / "audit.jsonl"
    got, res = kxutil.derive(bad_vectors, provider="keyx", peer_provider=peer_provider,
                             env=kxutil.base_env(KEYX_AUDIT_LOG=log))
    # OpenSSL's own peer check runs in the peer's provider before keyx is called; in 3.5 the
    # default provider's DH check refuses without an error: allowed where it does so alone too
    ref, _ = kxutil.derive(bad_vectors, provider="default") if peer_provider == "default" else ({}, None)
    problems = []
    for vid, o in got.items():
        silent = not o.error or "no error recorded" in o.error
        r = ref.get(vid)
        if o.ok:
            problems.append(f"  {vid}: ACCEPTED, secret {o.secret}")
        elif silent and r is not None and r.stage == o.stage == "set_peer" and (
                not r.error or "no error recorded" in r.error):
            continue
        elif silent:
            problems.append(f"  {vid}: rejected at {o.stage} without an error")
        elif peer_provider == "keyx" and not o.by_keyx:
            # keyx built the peer: keyx itself must refuse it, whatever OpenSSL checks later
            problems.append(f"  {vid}: rejected at {o.stage} but not by a keyx error: {o.error}")
        elif peer_provider == "default" and o.stage in ("size", "derive") and not o.by_keyx:
            problems.append(f"  {vid}: reached keyx's derive, refused without a keyx error: {o.error}")
        elif o.by_keyx and o.stage != "peer" and "invalid peer public key" not in o.error:
            # keyx knows it is looking at a peer: the reason must say so ("backend operation
            # failed" would blame, and with failover mark down, a healthy backend)
            problems.append(f"  {vid}: refused at {o.stage} without the reason 'invalid peer public key': {o.error}")
    assert not problems, f"invalid peers built by {peer_provider}:\n" + "\n".join(problems)
    # OpenSSL's set_peer check runs in the peer's provider and catches bad EC points and DH
    # values from the default provider first; X25519/X448 values it does not check, so keyx
    # must be the one that refuses them.
    if peer_provider == "default":
        for vid, o in got.items():
            if vid.startswith(("X25519/", "X448/")):
                assert o.by_keyx, f"{vid}: not refused by keyx: {o}"
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    assert not [e for e in events if e["event"] == "derive" and e["ok"]], "a derive succeeded"


def test_peer_from_another_group_rejected(build):
    """Own key and peer on different groups: 'peer key does not match' (or OpenSSL's own check)."""
    ec256, ec384 = kxutil.pair("EC", "P-256"), kxutil.pair("EC", "P-384")
    x25519, x448 = kxutil.pair("X25519", "X25519"), kxutil.pair("X448", "X448")
    dh2048, dh3072 = kxutil.pair("DH", "ffdhe2048"), kxutil.pair("DH", "ffdhe3072")
    dhx = kxutil.pair("DH", kxutil.EXPLICIT_DH)
    vectors = [
        ("p256-vs-p384", "EC", "P-256", ec256["A"]["priv"], "spki", ec384["B"]["spki"]),
        ("p384-vs-p256", "EC", "P-384", ec384["A"]["priv"], "spki", ec256["B"]["spki"]),
        ("x25519-vs-x448", "X25519", "X25519", x25519["A"]["priv"], "spki", x448["B"]["spki"]),
        ("x448-vs-x25519", "X448", "X448", x448["A"]["priv"], "spki", x25519["B"]["spki"]),
        ("ffdhe2048-vs-3072", "DH", "ffdhe2048", dh2048["A"]["priv"], "spki", dh3072["B"]["spki"]),
        ("ffdhe2048-vs-explicit", "DH", "ffdhe2048", dh2048["A"]["priv"], "spki", dhx["B"]["spki"]),
        ("explicit-vs-ffdhe2048", "DH", kxutil.EXPLICIT_DH, dhx["A"]["priv"], "spki", dh2048["B"]["spki"]),
    ]
    got, _ = kxutil.derive(vectors, provider="keyx")
    bad = [f"  {vid}: {o}" for vid, o in got.items() if o.ok or not o.error or "no error recorded" in o.error]
    assert not bad, "mismatched peers not rejected with an error:\n" + "\n".join(bad)
