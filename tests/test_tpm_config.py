"""How keyx finds the TPM: `tpm-tcti` in openssl.cnf and KEYX_TPM_TCTI are both
honoured (tpm2-openssl ignores its config key), the variable overriding the file; a TPM that
cannot be reached fails fast with an error naming the TCTI, or fails over to the next backend.
"""

import time

import kxutil
from fixture_swtpm import tpm_cnf, tpm_derive
from kxutil import base_env, openssl


def dead_tcti(free_port):
    return f"swtpm:host=127.0.0.1,port={free_port}"


def one_vector():
    k = kxutil.pair("EC", "P-256")
    return k, [(1, "EC", "P-256", k["A"]["priv"], "spki", k["B"]["spki"])]


def check_tpm_derive(got, k, log):
    assert got["1"].ok and got["1"].secret == k["S"], got["1"]
    derives = [e for e in kxutil.read_audit(log) if e["event"] == "derive"]
    assert [e["backend"] for e in derives] == ["tpm"], derives


def test_tcti_from_openssl_cnf(swtpm, tmp):
    log = tmp / "audit.jsonl"
    k, vec = one_vector()
    got, _ = tpm_derive(vec, tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"audit-log": log}))
    check_tpm_derive(got, k, log)


def test_tcti_from_environment(swtpm, tmp):
    log = tmp / "audit.jsonl"
    k, vec = one_vector()
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"tpm-tcti": None, "audit-log": log})
    assert "tpm-tcti" not in cnf.read_text()
    got, _ = tpm_derive(vec, cnf, env=base_env(KEYX_TPM_TCTI=swtpm.tcti))
    check_tpm_derive(got, k, log)


def test_environment_overrides_cnf(swtpm, tmp, free_port):
    log = tmp / "audit.jsonl"
    k, vec = one_vector()
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"tpm-tcti": dead_tcti(free_port), "audit-log": log})
    got, _ = tpm_derive(vec, cnf, env=base_env(KEYX_TPM_TCTI=swtpm.tcti))
    check_tpm_derive(got, k, log)


def test_unreachable_tcti_fails_fast_naming_it(build, tmp, free_port):
    tcti = dead_tcti(free_port)
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", None, keyx={"tpm-tcti": tcti}))
    start = time.monotonic()
    r = openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", env=env)
    took = time.monotonic() - start
    assert r.rc != 0, r
    assert f"TCTI '{tcti}'" in r.err and "backend unavailable" in r.err, f"error does not name the TCTI:\n{r!r}"
    assert took < 5, f"took {took:.1f}s to report an unreachable TPM"
    # Keys moved into the TPM: same error, at import.
    k, vec = one_vector()
    got, _ = tpm_derive(vec, tmp / "openssl.cnf")
    assert not got["1"].ok and tcti in got["1"].error, got["1"]


def test_unknown_tcti_module(build, tmp):
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", None, keyx={"tpm-tcti": "nosuchtcti:x=1"}))
    r = openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", env=env)
    assert r.rc != 0 and "TCTI 'nosuchtcti:x=1'" in r.err, r


def test_failover_to_software_when_tpm_unreachable(build, tmp, free_port):
    """backends = tpm, software: new keys go to software while the TPM is down, with a
    `failover` audit event; nothing fails over when software is not listed (test above)."""
    log = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", None, keyx={
        "backends": "tpm, software", "tpm-tcti": dead_tcti(free_port), "audit-log": log}))
    r = openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", env=env)
    assert r.rc == 0 and "BEGIN PRIVATE KEY" in r.out, r
    events = kxutil.read_audit(log)
    fo = [e for e in events if e["event"] == "failover"]
    assert fo and fo[0]["backend"] == "tpm" and fo[0].get("next") == "software", events
    assert [e["backend"] for e in events if e["event"] == "keygen"] == ["software"], events


def test_domain_parameters_only_create_no_tpm_object(swtpm, tmp):
    """genpkey -genparam asks for EC domain parameters: nothing is made in the TPM."""
    log = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"audit-log": log}))
    r = openssl("genpkey", "-genparam", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", tmp / "params.pem", env=env)
    assert r.rc == 0, r
    events = kxutil.read_audit(log) if log.exists() else []
    assert not [e for e in events if e["event"] == "keygen"], events
