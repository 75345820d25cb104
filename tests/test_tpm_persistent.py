"""Persistent TPM keys made with tpm2-tools, used through STORE by reference:
`keyx:tpm:handle=0x81000002`. The secret keyx derives must equal what tpm2_ecdhzgen computes
with the same key for the same peer point; the public key exports; freeing never evicts.
"""

import pytest

import kxutil
from fixture_swtpm import tpm_cnf
from kxutil import base_env, openssl

FIELD = {"P-256": 32, "P-384": 48}
KEYS = [("P-256", "ecc256", 0x81000002), ("P-384", "ecc384", 0x81000003)]


def make_persistent(tpm, d, alg, handle):
    """A decrypt ECC key under the owner SRK, evicted to handle (once per session swtpm)."""
    if f"0x{handle:x}" in tpm.tools("tpm2_getcap", "handles-persistent").out.lower():
        return
    tpm.flush_transient()
    tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc256", "-c", d / "prim.ctx")
    tpm.flush_transient()
    tpm.tools("tpm2_create", "-Q", "-C", d / "prim.ctx", "-G", f"{alg}:null", "-a",
              "decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
              "-u", d / "key.pub", "-r", d / "key.priv")
    tpm.flush_transient()
    tpm.tools("tpm2_load", "-Q", "-C", d / "prim.ctx", "-u", d / "key.pub", "-r", d / "key.priv",
              "-c", d / "key.ctx")
    tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", d / "key.ctx", f"0x{handle:x}")
    tpm.flush_transient()


def peer_point(tmp, group, name):
    """A fresh peer key (default provider): its public PEM and the TPM2B_ECC_POINT file
    tpm2_ecdhzgen reads."""
    keys = kxutil.pair("EC", group)
    pem = tmp / f"{name}.pem"
    der = bytes.fromhex(keys["B"]["spki"])
    r = kxutil.run(["openssl", "pkey", "-pubin", "-inform", "DER", "-out", pem], input=der, text=False)
    assert r.rc == 0, r
    pub = bytes.fromhex(keys["B"]["pub"])
    n = FIELD[group]
    assert pub[0] == 4 and len(pub) == 1 + 2 * n
    body = n.to_bytes(2, "big") + pub[1:1 + n] + n.to_bytes(2, "big") + pub[1 + n:]
    point = tmp / f"{name}.point"
    point.write_bytes(len(body).to_bytes(2, "big") + body)
    return pem, point


@pytest.mark.parametrize("group,alg,handle", KEYS, ids=[k[0] for k in KEYS])
def test_persistent_key_matches_tpm2_ecdhzgen(swtpm, tmp, group, alg, handle):
    make_persistent(swtpm, tmp, alg, handle)
    log = tmp / "audit.jsonl"
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"audit-log": log}))
    uri = f"keyx:tpm:handle=0x{handle:08x}"
    for i in range(3):
        pem, point = peer_point(tmp, group, f"peer{i}")
        z = tmp / f"z{i}.bin"
        swtpm.tools("tpm2_ecdhzgen", "-c", f"0x{handle:x}", "-u", point, "-o", z)
        raw = z.read_bytes()  # TPM2B_ECC_POINT: size, x.size, x, y.size, y
        xlen = int.from_bytes(raw[2:4], "big")
        want = raw[4:4 + xlen].rjust(FIELD[group], b"\0")
        out = tmp / f"s{i}.bin"
        r = openssl("pkeyutl", "-derive", "-inkey", uri, "-peerkey", pem, "-out", out, env=env)
        assert r.rc == 0, f"keyx derive with {uri} failed:\n{r!r}"
        assert out.read_bytes() == want, f"{group}: keyx and tpm2_ecdhzgen disagree"

    # The public key exports and is the TPM's.
    mine = tmp / "pub.pem"
    openssl("pkey", "-in", uri, "-pubout", "-out", mine, env=env).ok("public export")
    theirs = tmp / "tpm-pub.pem"
    swtpm.tools("tpm2_readpublic", "-c", f"0x{handle:x}", "-f", "pem", "-o", theirs)
    assert mine.read_text() == theirs.read_text()
    # "private key out" writes a reference to the key, never the private key
    openssl("pkey", "-in", uri, "-out", tmp / "ref.pem", env=env).ok("key reference")
    ref = (tmp / "ref.pem").read_text()
    assert ref.startswith("-----BEGIN KEYX KEY-----") and "PRIVATE" not in ref, ref

    events = kxutil.read_audit(log)
    kxutil.check_audit_schema(events)
    derives = [e for e in events if e["event"] == "derive"]
    assert len(derives) == 3 and all(e["ok"] and e["backend"] == "tpm" and e["ephemeral"] is False
                                     and e["group"] == group for e in derives), derives
    # free() released keyx's reference only: the key is still in the TPM
    assert f"0x{handle:x}" in swtpm.tools("tpm2_getcap", "handles-persistent").out.lower()
    assert not swtpm.tools("tpm2_getcap", "handles-transient").out.strip()


def test_two_loads_of_one_handle_are_independent(swtpm, tmp):
    """ESYS gives both loads of a handle one ESYS_TR: freeing the first must not break the
    second (it did: "ESYS_TR resource object is bad")."""
    make_persistent(swtpm, tmp, "ecc256", 0x81000002)
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm)
    kxutil.derive_twice(cnf, "keyx:tpm:handle=0x81000002", "P-256", base_env())
    assert "0x81000002" in swtpm.tools("tpm2_getcap", "handles-persistent").out.lower()


def test_missing_handle_and_bad_locator(swtpm, tmp):
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm))
    r = openssl("pkey", "-in", "keyx:tpm:handle=0x81000077", "-pubout", env=env)
    assert r.rc != 0 and "no persistent key at handle 0x81000077" in r.err, r
    r = openssl("pkey", "-in", "keyx:tpm:handle=0x01000001", "-pubout", env=env)
    assert r.rc != 0 and "expected handle=0x81xxxxxx" in r.err, r


def test_storage_key_is_refused_for_ecdh(swtpm, tmp):
    """A restricted key (an SRK) cannot do ECDH_ZGen: loading it says so."""
    swtpm.flush_transient()
    swtpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-G", "ecc256", "-c", tmp / "srk.ctx")
    if "0x81000010" not in swtpm.tools("tpm2_getcap", "handles-persistent").out.lower():
        swtpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", tmp / "srk.ctx", "0x81000010")
    swtpm.flush_transient()
    env = base_env(OPENSSL_CONF=tpm_cnf(tmp / "openssl.cnf", swtpm))
    r = openssl("pkey", "-in", "keyx:tpm:handle=0x81000010", "-pubout", env=env)
    assert r.rc != 0 and "unrestricted decrypt" in r.err, r


@pytest.mark.parametrize("alg,handle", [("ecc256", "0x81000011"), ("rsa2048", "0x81000012")])
def test_tpm_parent_from_config(swtpm, s_server, s_client, certs, tmp, alg, handle):
    """tpm-parent: ephemeral keys are made under a persistent storage key instead of the
    cached primary (an RSA one salts ESYS's session instead of keyx's). A TLS handshake with a
    client on the default provider proves the secret (the Finished messages only verify when
    both sides derived the same one)."""
    swtpm.flush_transient()
    swtpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-G", alg, "-c", tmp / "srk.ctx")
    if handle not in swtpm.tools("tpm2_getcap", "handles-persistent").out.lower():
        swtpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", tmp / "srk.ctx", handle)
    swtpm.flush_transient()
    log = tmp / "audit.jsonl"
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"tpm-parent": handle, "audit-log": log})
    crt, key = certs["rsa"]
    srv = s_server(["-cert", crt, "-key", key], base_env(OPENSSL_CONF=cnf))
    cli = s_client(srv.port, ["-tls1_3", "-groups", "P-256"], base_env())
    server_out = srv.wait()
    assert cli.rc == 0 and kxutil.protocol(cli.out) == "TLSv1.3", f"{cli!r}\n{server_out}"
    events = [e for e in kxutil.read_audit(log) if e["pid"] == srv.pid]
    assert [(e["event"], e["backend"], e["ok"]) for e in events if e["event"] in ("keygen", "derive")] == [
        ("keygen", "tpm", True), ("derive", "tpm", True)], events
    assert handle in swtpm.tools("tpm2_getcap", "handles-persistent").out.lower()
    assert not swtpm.tools("tpm2_getcap", "handles-transient").out.strip()


def test_unusable_tpm_parent(swtpm, tmp):
    cnf = tpm_cnf(tmp / "openssl.cnf", swtpm, keyx={"tpm-parent": "0x81000099"})
    r = openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                env=base_env(OPENSSL_CONF=cnf))
    assert r.rc != 0 and "tpm-parent 0x81000099 is not usable" in r.err, r
