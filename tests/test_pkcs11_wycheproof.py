"""Wycheproof ECDH P-256/384/521 with the private key imported into a SoftHSM2 token.

Each private scalar becomes a session object on the token (C_CreateObject, sensitive, not
extractable) and the secret comes from CKM_ECDH1_DERIVE there: valid vectors give exactly the
expected secret, invalid public keys are rejected, and the audit log puts every derive in pkcs11.
"""

from collections import Counter

import pytest

import kxutil
from test_wycheproof import judge, load, report

FILES = [
    ("ecdh_secp256r1_test.json", "P-256", "spki"),
    ("ecdh_secp256r1_ecpoint_test.json", "P-256", "raw"),
    ("ecdh_secp384r1_test.json", "P-384", "spki"),
    ("ecdh_secp384r1_ecpoint_test.json", "P-384", "raw"),
    ("ecdh_secp521r1_test.json", "P-521", "spki"),
    ("ecdh_secp521r1_ecpoint_test.json", "P-521", "raw"),
]


@pytest.mark.parametrize("name,group,form", [pytest.param(*f, id=f[0]) for f in FILES])
def test_wycheproof_ecdh_on_the_token(softhsm, vectors_dir, tmp, name, group, form):
    log = tmp / "audit.jsonl"
    s = softhsm.keyx_settings()
    env = softhsm.env(KEYX_AUDIT_LOG=log, KEYX_BACKENDS=s["backends"], KEYX_PKCS11_MODULE=s["pkcs11-module"],
                      KEYX_PKCS11_TOKEN=s["pkcs11-token"], KEYX_PKCS11_PIN=s["pkcs11-pin"])
    tests = load(vectors_dir, name)
    vectors = [(t["tcId"], "EC", group, t["private"], form, t["public"]) for t in tests]
    got, res = kxutil.derive(vectors, env=env, backend="pkcs11", timeout=max(kxutil.TIMEOUT, 300))

    quiet = {"peer"} if form == "spki" else set()
    problems = [(t, why) for t in tests if (why := judge("EC", t, got[str(t["tcId"])], quiet_stages=quiet))]
    assert not problems, report(name, problems, tests, got)
    verdicts = Counter((t["result"], got[str(t["tcId"])].ok) for t in tests)
    assert verdicts[("valid", True)] == sum(1 for t in tests if t["result"] == "valid"), verdicts
    assert verdicts[("invalid", True)] == 0, verdicts

    events = [e for e in kxutil.read_audit(log) if e["pid"] == res.pid]
    kxutil.check_audit_schema(events)
    derives = [e for e in events if e["event"] == "derive" and e["ok"]]
    assert len(derives) == sum(1 for o in got.values() if o.ok), "one derive event per secret"
    assert {e["backend"] for e in derives} == {"pkcs11"}, f"derives outside the token: {derives[:3]}"
    imports = [e for e in events if e["event"] == "load" and e["ok"]]  # an import is a load
    assert imports and {e["backend"] for e in imports} == {"pkcs11"}, f"imports: {imports[:3]}"
    kxutil.assert_no_secrets(log.read_text(), [t["private"] for t in tests], "audit log")
    # session objects only: the token holds what the fixture put there, nothing more
    assert len(softhsm.token_objects("keyx-a")) == 2
