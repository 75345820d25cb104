"""Invalid peer public keys on the hardware backends.

test_invalid_peers.py refuses every bad peer with software keys; here the same peers meet
private keys moved into a SoftHSM2 token (session objects) and into swtpm (TPM2_LoadExternal),
for every group the backend serves: points off the curve, at infinity, out of range, truncated,
(0,0); DH 0, 1, p-1, p, p+1 and outside the q-subgroup. Each is refused with keyx's reason
'invalid peer public key' (or at peer construction) within 5 s, the process survives, a valid
peer afterwards still gives the default provider's secret, nothing is left on the token or in
the TPM. Groups a backend does not serve (X25519/X448 on both, DH in the TPM) are refused at
import with 'not supported', never silently served in software.
"""

import time

import pytest

import kxutil
from fixture_swtpm import tpm_cnf, tpm_derive
from test_invalid_peers import cases

SERVED = {
    "pkcs11": {"EC", "DH"},
    "tpm": {"EC"},
}


@pytest.fixture(scope="module")
def bad_cases(build):
    return cases(build)


def vectors_for(bad_cases):
    out = []
    for alg, group, priv, bad in bad_cases:
        gname = "explicit" if group.startswith("explicit:") else group
        for name, peer in bad.items():
            out.append((f"{alg}/{gname}/{name}", alg, group, priv, "raw", peer))
    return out


def judge(got, vectors, backend):
    problems = []
    for v in vectors:
        vid, alg = v[0], v[1]
        o = got[vid]
        if o.ok:
            problems.append(f"  {vid}: ACCEPTED on {backend}")
        elif alg not in SERVED[backend]:
            if o.stage != "priv" or "not supported by any configured keyx backend" not in o.error:
                problems.append(f"  {vid}: {backend} does not serve {alg}: expected a refusal at import: {o}")
        elif not o.by_keyx and o.stage != "peer":
            problems.append(f"  {vid}: refused at {o.stage} without a keyx error: {o.error}")
        elif o.by_keyx and o.stage != "peer" and "invalid peer public key" not in o.error:
            problems.append(f"  {vid}: refused at {o.stage} without 'invalid peer public key': {o.error}")
    return problems


def test_invalid_peers_on_the_token(softhsm, bad_cases, tmp):
    before = softhsm.token_objects("keyx-a")
    log = tmp / "audit.jsonl"
    s = softhsm.keyx_settings()
    env = softhsm.env(KEYX_AUDIT_LOG=log, KEYX_BACKENDS=s["backends"], KEYX_PKCS11_MODULE=s["pkcs11-module"],
                      KEYX_PKCS11_TOKEN=s["pkcs11-token"], KEYX_PKCS11_PIN=s["pkcs11-pin"])
    good = kxutil.pair("EC", "P-256")
    vectors = vectors_for(bad_cases) + [("good", "EC", "P-256", good["A"]["priv"], "spki", good["B"]["spki"])]
    start = time.monotonic()
    got, res = kxutil.derive(vectors, env=env, backend="pkcs11")
    took = time.monotonic() - start
    problems = judge(got, vectors[:-1], "pkcs11")
    assert not problems, "invalid peers on the token:\n" + "\n".join(problems)
    assert got["good"].ok and got["good"].secret == good["S"], f"valid peer after the bad ones: {got['good']}"
    assert took < 5 * len(vectors), f"{len(vectors)} derives took {took:.1f}s"
    events = [e for e in kxutil.read_audit(log) if e["pid"] == res.pid]
    kxutil.check_audit_schema(events)
    ok = [e for e in events if e["event"] == "derive" and e["ok"]]
    assert len(ok) == 1 and ok[0]["backend"] == "pkcs11", ok
    loads = [e for e in events if e["event"] == "load" and e["ok"]]
    assert {e["backend"] for e in loads} == {"pkcs11"}, loads
    assert {e["alg"] for e in loads} >= {"EC", "DH"}, "EC and DH private keys were moved onto the token"
    assert softhsm.token_objects("keyx-a") == before, "objects left on the token"


def test_invalid_peers_in_the_tpm(swtpm, bad_cases, tmp):
    swtpm.flush_transient()
    persistent = swtpm.tools("tpm2_getcap", "handles-persistent").out
    log = tmp / "audit.jsonl"
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"audit-log": log})
    good = kxutil.pair("EC", "P-256")
    vectors = vectors_for(bad_cases) + [("good", "EC", "P-256", good["A"]["priv"], "spki", good["B"]["spki"])]
    start = time.monotonic()
    got, res = tpm_derive(vectors, cnf)
    took = time.monotonic() - start
    problems = judge(got, vectors[:-1], "tpm")
    assert not problems, "invalid peers in the TPM:\n" + "\n".join(problems)
    assert got["good"].ok and got["good"].secret == good["S"], f"valid peer after the bad ones: {got['good']}"
    assert took < 5 * len(vectors), f"{len(vectors)} derives took {took:.1f}s"
    events = [e for e in kxutil.read_audit(log) if e["pid"] == res.pid]
    kxutil.check_audit_schema(events)
    ok = [e for e in events if e["event"] == "derive" and e["ok"]]
    assert len(ok) == 1 and ok[0]["backend"] == "tpm", ok
    assert not [e for e in events if e.get("backend") == "software" and e["event"] in ("load", "derive")]
    assert not swtpm.tools("tpm2_getcap", "handles-transient").out.strip(), "TPM objects left loaded"
    assert swtpm.tools("tpm2_getcap", "handles-persistent").out == persistent
