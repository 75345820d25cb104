"""Project Wycheproof key-agreement vectors, every one of them, through keyx.

valid      -> exactly the expected shared secret
invalid    -> rejected
acceptable -> the expected secret, or a rejection when the vector carries one of the flags in
              DOCUMENTED_REJECTS (each with the reason keyx may refuse it)
An all-zero X25519/X448 shared secret is always refused, whatever the vector's verdict.
"""

import json
from collections import Counter

import pytest

import kxutil

# (vector file, algorithm, group, peer form): spki peers are decoded by the default provider
# (the peer key comes from another provider), raw ones are built by --peer-provider.
FILES = [
    ("ecdh_secp256r1_test.json", "EC", "P-256", "spki"),
    ("ecdh_secp256r1_ecpoint_test.json", "EC", "P-256", "raw"),
    ("ecdh_secp384r1_test.json", "EC", "P-384", "spki"),
    ("ecdh_secp384r1_ecpoint_test.json", "EC", "P-384", "raw"),
    ("ecdh_secp521r1_test.json", "EC", "P-521", "spki"),
    ("ecdh_secp521r1_ecpoint_test.json", "EC", "P-521", "raw"),
    ("x25519_test.json", "X25519", "X25519", "raw"),
    ("x448_test.json", "X448", "X448", "raw"),
]

# Flags of "acceptable" vectors that keyx may reject, one line of reason each.
DOCUMENTED_REJECTS = {
    "InvalidAsn": "the peer SPKI is not DER: the default provider's decoder may refuse it before keyx sees a key",
    "UnnamedCurve": "the peer spells out curve parameters: keyx serves only the named groups P-256/384/521",
    "LowOrderPublic": "small-order X25519/X448 public points are refused (keyx's low-order point check)",
    "SmallPublicKey": "a public value of small order is refused like any low-order point",
    "ZeroSharedSecret": "an all-zero X25519/X448 secret is refused (RFC 7748 section 6.1 check)",
}

# The default provider of OpenSSL 3.0 (only used to check this harness) accepts explicit-curve
# peers whose cofactor is missing or wrong; Wycheproof marks them invalid. keyx must not.
DEFAULT_PROVIDER_DEVIATIONS = {"NoCofactor", "LargeCofactor"}


def load(vectors_dir, name):
    path = vectors_dir / name
    assert path.is_file(), f"missing Wycheproof file {path}"
    data = json.loads(path.read_text())
    tests = [t for g in data["testGroups"] for t in g["tests"]]
    assert len(tests) == data["numberOfTests"], f"{name}: {len(tests)} tests, header says {data['numberOfTests']}"
    assert len({t["tcId"] for t in tests}) == len(tests), f"{name}: duplicate tcIds"
    return tests


def judge(alg, t, out, deviations=frozenset(), quiet_stages=frozenset()):
    """None when the outcome is right for the vector, else what is wrong. A rejection must
    come with an error on the stack, except at quiet_stages (the default provider's decoder
    fails some malformed keys silently: that is OpenSSL's, not keyx's)."""
    flags = set(t["flags"])
    shared = t["shared"]
    zero = alg in ("X25519", "X448") and shared and set(shared) == {"0"}
    if out.ok:
        if zero:
            return "an all-zero shared secret was returned instead of refused"
        if t["result"] == "invalid":
            if flags & deviations and out.secret == shared:
                return None
            return "invalid vector accepted"
        if out.secret != shared:
            return f"wrong secret {out.secret} (expected {shared})"
        return None
    if out.stage not in quiet_stages and (not out.error or out.error == "(no error recorded)"):
        return f"rejected at {out.stage} without any error on the error stack"
    if t["result"] == "valid" and not zero:
        return f"valid vector rejected at {out.stage}: {out.error}"
    if t["result"] == "acceptable" and not zero and not flags & DOCUMENTED_REJECTS.keys():
        return f"acceptable vector rejected without a documented reason at {out.stage}: {out.error}"
    return None


def run_file(vectors_dir, name, alg, group, form, provider, peer_provider=None, env=None):
    tests = load(vectors_dir, name)
    vectors = [(t["tcId"], alg, group, t["private"], form, t["public"]) for t in tests]
    got, res = kxutil.derive(vectors, provider=provider, peer_provider=peer_provider, env=env)
    return tests, got, res


def report(name, problems, tests, got):
    lines = [f"{name}: {len(problems)} of {len(tests)} vectors wrong"]
    for t, why in problems[:25]:
        lines.append(f"  tcId {t['tcId']} [{t['result']}] {t['comment']!r} flags={t['flags']}: {why}")
    if len(problems) > 25:
        lines.append(f"  ... and {len(problems) - 25} more")
    return "\n".join(lines)


def params():
    out = []
    for name, alg, group, form in FILES:
        out.append(pytest.param(name, alg, group, form, None, id=name))
        if form == "raw":
            # the same raw public keys, built by the default provider this time
            out.append(pytest.param(name, alg, group, form, "default", id=name + "-default-peer"))
    return out


@pytest.mark.parametrize("name,alg,group,form,peer_provider", params())
def test_wycheproof_through_keyx(build, vectors_dir, tmp, name, alg, group, form, peer_provider):
    log = tmp / "audit.jsonl"
    env = kxutil.base_env(KEYX_AUDIT_LOG=log)
    tests, got, res = run_file(vectors_dir, name, alg, group, form, "keyx", peer_provider, env)

    # peers the default provider decodes may fail there silently; keyx must always say why
    quiet = {"peer"} if form == "spki" or peer_provider == "default" else set()
    problems = [(t, why) for t in tests if (why := judge(alg, t, got[str(t["tcId"])], quiet_stages=quiet))]
    assert not problems, report(name, problems, tests, got)

    # Counts: nothing silently dropped.
    verdicts = Counter((t["result"], got[str(t["tcId"])].ok) for t in tests)
    assert sum(verdicts.values()) == len(tests)
    ecx = alg in ("X25519", "X448")
    valid = sum(1 for t in tests if t["result"] == "valid" and not (ecx and set(t["shared"]) == {"0"}))
    assert verdicts[("valid", True)] == valid, f"{verdicts}"
    assert verdicts[("invalid", True)] == 0, f"{verdicts}"

    # The audit log: every derive done by keyx in this process, never a secret or private key.
    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    mine = [e for e in events if e["pid"] == res.pid]
    assert len(mine) == len(events), "audit events from another process"
    ok_derives = [e for e in mine if e["event"] == "derive" and e["ok"]]
    n_ok = sum(1 for o in got.values() if o.ok)
    assert len(ok_derives) == n_ok, f"{len(ok_derives)} successful derive events for {n_ok} secrets"
    for e in ok_derives:
        assert e.get("backend") == "software" and e.get("alg") == alg, f"derive event {e}"
        assert e.get("group") == group, f"derive event without group {group}: {e}"
    text = log.read_text()
    kxutil.assert_no_secrets(text, [t["shared"] for t in tests if len(set(t["shared"])) > 2], "audit log")
    kxutil.assert_no_secrets(text, [t["private"] for t in tests], "audit log")


@pytest.mark.parametrize("name,alg,group,form", [pytest.param(*f, id=f[0]) for f in FILES])
def test_wycheproof_harness_with_default_provider(build, vectors_dir, name, alg, group, form):
    """The same driver and rules on OpenSSL's default provider: proves the harness itself."""
    tests, got, _ = run_file(vectors_dir, name, alg, group, form, "default")
    problems = [
        (t, why) for t in tests if (why := judge(alg, t, got[str(t["tcId"])], DEFAULT_PROVIDER_DEVIATIONS, {"peer"}))
    ]
    assert not problems, report(name, problems, tests, got)
    assert sum(1 for o in got.values() if o.ok) > len(tests) // 2
