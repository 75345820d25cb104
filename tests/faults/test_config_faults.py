"""Every configuration key given many bad values, beyond test_provider.py's one per key: with each,
keyx loads inactive and refuses to serve (docs/configuration.md: checked at load, never silently
ignored, never replaced by software), within 5 s, with one 'invalid keyx configuration' error
that names the key, through the environment (a key generation fails with it) and through
openssl.cnf (keyx listed as inactive, its stderr line naming the key). A value the documentation
accepts is shown to load active, so the table cannot pass by refusing everything.
"""

import re
import time

import pytest

from kxutil import CONFIG_KEYS, base_env, openssl

BAD = {
    "backends": ["", "software software", "software, tmp", "hsm", "software;tpm", "-"],
    "tpm-tcti": [""],
    "tpm-parent": ["", "81000001", "0x", "0x8100000", "0x810000011", "0x80000000", "0x82000000",
                   "0x40000001", "0xzz000000", " 0x81000001", "0x81000001 "],
    "pkcs11-module": [""],
    "pkcs11-token": ["", "token=keyx", "pkcs11:token=a pk11:token=b", "pkcs11:token=%zz", "pkcs11:token=%4"],
    "pkcs11-pin": ["file:", "env:", ""],
    "pkcs11-raw-rsa": ["", "2", "-1", "oui", "1 ", "10", "truee", "y"],
    "tpm-encrypt-sessions": ["", "2", "maybe", "0x1", "nope"],
    "tpm-timeout": ["", "0", "99", "600001", "-5000", "5s", "5000 ", "0x1388", "4294967296000"],
    "tpm-pool": ["", "-1", "1025", "+5", "0x10", "5 ", "1e3", "99999999999999999999999", "ten"],
    "pkcs11-pool": ["", "-1", "1025", "+5", "0x10", " 5", "1.5"],
    "pkcs11-timeout": ["", "0", "99", "600001", "-1000", "2s", "0x3e8"],
    "audit-log": [""],
    "ephemeral-max-uses": ["", "-1", "+1", "0x10", "1 0", "9223372036854775808", "18446744073709551616", "ten"],
    "debug": ["", "2", "debug", "0 ", "yess"],
}
GOOD = {
    "backends": "SOFTWARE, tpm,,pkcs11",
    "tpm-parent": "0x81FFFFFF",
    "pkcs11-raw-rsa": "On",
    "tpm-encrypt-sessions": "TRUE",
    "tpm-timeout": "100",
    "tpm-pool": "1024",
    "pkcs11-pool": "0",
    "pkcs11-timeout": "600000",
    "ephemeral-max-uses": "9223372036854775807",
    "debug": "off",
}


def test_every_key_has_bad_values_here():
    assert set(BAD) == set(CONFIG_KEYS)


CASES = [(k, v) for k in sorted(BAD) for v in dict.fromkeys(BAD[k])]


def keyx_status(listing):
    """keyx's status line in `openssl list -providers -verbose`, or None when keyx is not listed."""
    m = re.search(r"^  keyx\n(?:    .*\n)*?    status: (\S+)$", listing, re.M)
    return m.group(1) if m else None


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_bad_value_from_the_environment(module_dir, key, value):
    var = CONFIG_KEYS[key]
    start = time.monotonic()
    r = openssl("genpkey", "-provider-path", module_dir, "-provider", "keyx", "-algorithm", "EC",
                "-pkeyopt", "ec_paramgen_curve:P-256", env=base_env(**{var: value}))
    took = time.monotonic() - start
    assert 0 < r.rc < 128, f"keyx served (or crashed) with {var}={value!r}:\n{r!r}"
    assert "PRIVATE KEY" not in r.out, f"{var}={value!r}: a key was made:\n{r!r}"
    assert "invalid keyx configuration" in r.err and "refuses to serve" in r.err, f"{var}={value!r}:\n{r!r}"
    assert re.search(rf"\b{re.escape(key)}\b", r.err) and var in r.err, f"the error does not name {key}/{var}:\n{r!r}"
    assert took < 5, f"took {took:.1f}s"


@pytest.mark.parametrize("key,value", [c for c in CASES if c[1] == c[1].strip() and c[1]],
                         ids=[f"{k}={v!r}" for k, v in CASES if v == v.strip() and v])
def test_bad_value_in_openssl_cnf(cnf, key, value):
    env = base_env(OPENSSL_CONF=cnf(keyx={key: value}))
    r = openssl("list", "-providers", "-verbose", env=env)
    assert keyx_status(r.out) == "inactive", f"keyx not listed as inactive with {key} = {value!r}:\n{r!r}"
    assert re.search(rf"\b{re.escape(key)}\b", r.err), f"nothing on stderr names {key}:\n{r!r}"


@pytest.mark.parametrize("key", sorted(GOOD))
def test_accepted_edge_values_load(module_dir, key):
    var = CONFIG_KEYS[key]
    r = openssl("list", "-providers", "-verbose", "-provider-path", module_dir, "-provider", "keyx",
                env=base_env(**{var: GOOD[key]}))
    r.ok(f"{var}={GOOD[key]!r} is documented as accepted")
    assert keyx_status(r.out) == "active", r
