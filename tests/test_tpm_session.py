"""The TPM bus is protected: ECDH Z points come back from the TPM in a salted HMAC
session with response parameter encryption, and private keys moved into the TPM travel with
command parameter encryption. The pcap TCTI records every byte exchanged with swtpm: with
`tpm-encrypt-sessions` on (the default) neither the secret nor the private key may appear in
the capture; with it off they do (which proves the capture sees the traffic).
"""

import re

import pytest

import kxutil
from fixture_swtpm import tpm_cnf, tpm_derive


@pytest.mark.parametrize("group", ["P-256", "P-384"])
@pytest.mark.parametrize("encrypt", ["1", "0"])
def test_secrets_on_the_bus(swtpm, tmp, group, encrypt):
    pcap = tmp / "tpm.pcap"
    keys = [kxutil.pair("EC", group) for _ in range(3)]
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm,
                  keyx={"tpm-tcti": f"pcap:{swtpm.tcti}", "tpm-encrypt-sessions": encrypt})
    vectors = [(i, "EC", group, k["A"]["priv"], "spki", k["B"]["spki"]) for i, k in enumerate(keys)]
    got, _ = tpm_derive(vectors, cnf, env=kxutil.base_env(TCTI_PCAP_FILE=pcap))
    for i, k in enumerate(keys):
        assert got[str(i)].ok and got[str(i)].secret == k["S"], got[str(i)]
    data = pcap.read_bytes()
    assert len(data) > 500, "the pcap TCTI recorded nothing"
    # Exactly one TPM2_ECDH_ZGen per derive: the driver asks for the size first
    # (EVP_PKEY_derive with a NULL buffer), which must not reach the TPM.
    zgen = re.findall(rb"\x80[\x01\x02].{4}\x00\x00\x01\x54", data, re.S)
    assert len(zgen) == len(keys), f"{len(zgen)} ECDH_ZGen commands for {len(keys)} derives"
    field = {"P-256": 32, "P-384": 48}[group]
    seen = [bytes.fromhex(k["S"]) in data for k in keys]
    seen_priv = [bytes.fromhex(k["A"]["priv"].rjust(2 * field, "0")) in data for k in keys]
    if encrypt == "1":
        assert not any(seen), "a shared secret crossed the TPM bus in clear"
        assert not any(seen_priv), "a private key crossed the TPM bus in clear"
    else:
        assert all(seen) and all(seen_priv), "capture without encryption should show the values"


def test_env_turns_encryption_off(swtpm, tmp):
    """KEYX_TPM_ENCRYPT_SESSIONS overrides openssl.cnf (as every keyx setting)."""
    pcap = tmp / "tpm.pcap"
    k = kxutil.pair("EC", "P-256")
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"tpm-tcti": f"pcap:{swtpm.tcti}"})
    got, _ = tpm_derive([(1, "EC", "P-256", k["A"]["priv"], "spki", k["B"]["spki"])], cnf,
                        env=kxutil.base_env(TCTI_PCAP_FILE=pcap, KEYX_TPM_ENCRYPT_SESSIONS="0"))
    assert got["1"].ok and got["1"].secret == k["S"]
    assert bytes.fromhex(k["S"]) in pcap.read_bytes()


def test_rsa_parent_session_also_encrypts(swtpm, tmp):
    """With an RSA tpm-parent keyx cannot salt its own session (ECC) and ESYS's session takes
    over: the secret still does not cross the bus in clear."""
    handle = "0x81000012"
    if handle not in swtpm.tools("tpm2_getcap", "handles-persistent").out.lower():
        swtpm.flush_transient()
        swtpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-G", "rsa2048", "-c", tmp / "srk.ctx")
        swtpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", tmp / "srk.ctx", handle)
        swtpm.flush_transient()
    pcap = tmp / "tpm.pcap"
    k = kxutil.pair("EC", "P-256")
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm,
                  keyx={"tpm-tcti": f"pcap:{swtpm.tcti}", "tpm-parent": handle})
    got, _ = tpm_derive([(1, "EC", "P-256", k["A"]["priv"], "spki", k["B"]["spki"])], cnf,
                        env=kxutil.base_env(TCTI_PCAP_FILE=pcap))
    assert got["1"].ok and got["1"].secret == k["S"], got["1"]
    assert bytes.fromhex(k["S"]) not in pcap.read_bytes()


def test_ephemeral_keys_are_null_hierarchy_primaries(swtpm, tmp):
    """The cost of a TPM keygen: an ephemeral key is one TPM2_CreatePrimary in the NULL hierarchy
    (no CreateLoaded under the storage parent, which is created once per process in the owner
    hierarchy, never per key); it is flushed when freed."""
    pcap = tmp / "tpm.pcap"
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"tpm-tcti": f"pcap:{swtpm.tcti}"})
    before = swtpm.tools("tpm2_getcap", "handles-transient").out
    r = kxutil.run([kxutil.derive_bin(), "--config", cnf, "uses", "EC", "P-256", "3"],
                   env=kxutil.base_env(TCTI_PCAP_FILE=pcap))
    assert r.rc == 0 and r.out.count(" ok ") == 3, r
    assert len({line.split()[2] for line in r.out.splitlines()[1:]}) == 1, "one key, one peer: one secret"
    data = pcap.read_bytes()
    create_primary = rb"\x80[\x01\x02].{4}\x00\x00\x01\x31"
    null_primary = re.findall(create_primary + rb"\x40\x00\x00\x07", data, re.S)
    owner_primary = re.findall(create_primary + rb"\x40\x00\x00\x01", data, re.S)
    create_loaded = re.findall(rb"\x80[\x01\x02].{4}\x00\x00\x01\x91", data, re.S)
    zgen = re.findall(rb"\x80[\x01\x02].{4}\x00\x00\x01\x54", data, re.S)
    assert (len(null_primary), len(owner_primary), len(create_loaded), len(zgen)) == (1, 1, 0, 3), \
        (len(null_primary), len(owner_primary), len(create_loaded), len(zgen))
    assert swtpm.tools("tpm2_getcap", "handles-transient").out == before, "a transient object was left"
