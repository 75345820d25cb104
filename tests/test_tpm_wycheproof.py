"""Wycheproof ECDH vectors with the private key inside the TPM.

Each vector's private key is moved into swtpm with TPM2_LoadExternal (NULL hierarchy) through the
`keyx-backend = tpm` import parameter, and the secret comes from TPM2_ECDH_ZGen. Valid vectors
give exactly the expected secret; invalid public keys are refused, before the TPM or by it, with
an error on the stack. The audit log proves every secret came from the tpm backend.
"""

from collections import Counter

import pytest

import kxutil
from fixture_swtpm import tpm_cnf, tpm_derive
from test_wycheproof import judge, load, report

FILES = [
    ("ecdh_secp256r1_test.json", "P-256", "spki"),
    ("ecdh_secp256r1_ecpoint_test.json", "P-256", "raw"),
    ("ecdh_secp384r1_test.json", "P-384", "spki"),
    ("ecdh_secp384r1_ecpoint_test.json", "P-384", "raw"),
    ("ecdh_secp521r1_test.json", "P-521", "spki"),
]


@pytest.mark.parametrize("name,group,form", [pytest.param(*f, id=f[0]) for f in FILES])
def test_wycheproof_in_tpm(build, swtpm, vectors_dir, tmp, name, group, form):
    log = tmp / "audit.jsonl"
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"audit-log": log})
    tests = load(vectors_dir, name)
    vectors = [(t["tcId"], "EC", group, t["private"], form, t["public"]) for t in tests]
    got, res = tpm_derive(vectors, cnf)

    quiet = {"peer"} if form == "spki" else set()
    problems = [(t, why) for t in tests if (why := judge("EC", t, got[str(t["tcId"])], quiet_stages=quiet))]
    assert not problems, report(name, problems, tests, got)
    verdicts = Counter((t["result"], got[str(t["tcId"])].ok) for t in tests)
    assert verdicts[("valid", True)] == sum(1 for t in tests if t["result"] == "valid"), f"{verdicts}"
    assert verdicts[("invalid", True)] == 0, f"{verdicts}"

    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    n_ok = sum(1 for o in got.values() if o.ok)
    derives = [e for e in events if e["event"] == "derive" and e["ok"]]
    assert len(derives) == n_ok, f"{len(derives)} derive events for {n_ok} secrets"
    assert all(e["backend"] == "tpm" and e["group"] == group for e in derives), derives[:3]
    loads = [e for e in events if e["event"] == "load" and e["ok"]]
    assert loads and all(e["backend"] == "tpm" for e in loads), "private keys not loaded into the TPM"
    text = log.read_text()
    kxutil.assert_no_secrets(text, [t["shared"] for t in tests if len(set(t["shared"])) > 2], "audit log")
    kxutil.assert_no_secrets(text, [t["private"] for t in tests], "audit log")


def test_tpm_invalid_peer_then_valid(build, swtpm, tmp):
    """A point off the curve is refused with a keyx error (the TPM is never asked to compute
    with it), and the same process goes on deriving correct secrets in the TPM afterwards."""
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm)
    keys = kxutil.pair("EC", "P-256")
    bad = "04" + "00" * 31 + "01" + "00" * 31 + "02"  # (1, 2) is not on P-256
    got, _ = tpm_derive([(1, "EC", "P-256", keys["A"]["priv"], "raw", bad),
                         (2, "EC", "P-256", keys["A"]["priv"], "spki", keys["B"]["spki"])], cnf)
    assert not got["1"].ok and got["1"].by_keyx, got["1"]
    assert got["2"].ok and got["2"].secret == keys["S"], got["2"]
