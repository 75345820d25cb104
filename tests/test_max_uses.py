"""ephemeral-max-uses: a key keyx generated is destroyed after N derives; the next one fails."""

import pytest

import kxutil
from kxutil import base_env

ALGS = [("EC", "P-256"), ("X25519", "X25519"), ("X448", "X448"), ("DH", "ffdhe2048")]


def uses(n, env=None, alg="EC", group="P-256", config=None):
    r = kxutil.run(kxutil.driver_cmd(config=config) + ["uses", alg, group, str(n)], env=env)
    r.ok("keyx-test-derive uses")
    lines = r.out.splitlines()
    assert lines and lines[0].startswith("pub "), f"no public key line:\n{r!r}"
    pub = lines[0].split()[1]
    results = [kxutil.Outcome(l.split()[0], l) for l in lines[1:]]
    assert len(results) == n, f"{len(results)} results for {n} derives:\n{r!r}"
    return r, pub, results


@pytest.mark.parametrize("alg,group", ALGS)
def test_fourth_derive_fails_with_max_uses_3(tmp, alg, group):
    log = tmp / "audit.jsonl"
    r, pub, res = uses(4, base_env(KEYX_EPHEMERAL_MAX_USES=3, KEYX_AUDIT_LOG=log), alg, group)
    for o in res[:3]:
        assert o.ok, f"derive {o.id} of 3 allowed failed: {o}\n{r!r}"
    assert len({o.secret for o in res[:3]}) == 1, "the same key and peer gave different secrets"
    last = res[3]
    assert not last.ok, f"4th derive succeeded with ephemeral-max-uses=3: {last}"
    assert "key used up" in last.error, f"4th derive failed without 'key used up': {last}"
    assert last.by_keyx, last

    kid = kxutil.key_id(pub)
    events = [e for e in kxutil.read_audit(log) if e["pid"] == r.pid]
    kxutil.check_audit_schema(events)
    mine = [e for e in events if e.get("key") == kid]
    keygen = [e for e in mine if e["event"] == "keygen"]
    assert keygen and keygen[0]["ok"] and keygen[0].get("ephemeral") is True, f"keygen event: {mine}"
    assert keygen[0].get("alg") == alg and keygen[0].get("group") == group, keygen
    ok_derives = [e for e in mine if e["event"] == "derive" and e["ok"]]
    assert len(ok_derives) == 3, f"{len(ok_derives)} successful derive events, expected 3: {mine}"
    failed = [e for e in mine if not e["ok"]]
    assert failed, f"the refused 4th derive left no ok:false event: {events}"
    assert failed[-1]["event"] in ("derive", "error"), failed
    assert "used up" in failed[-1]["error"] or "max" in failed[-1]["error"], failed
    kxutil.assert_no_secrets(log.read_text(), [res[0].secret], "audit log")


def test_max_uses_from_openssl_cnf(cnf):
    conf = cnf(keyx={"ephemeral-max-uses": 2}, prefer=False)
    _, _, res = uses(3, config=conf)
    assert [o.ok for o in res] == [True, True, False], res
    assert "key used up" in res[2].error, res[2]


def test_zero_means_unlimited():
    _, _, res = uses(6, base_env(KEYX_EPHEMERAL_MAX_USES=0))
    assert all(o.ok for o in res), res


def test_unset_means_unlimited():
    _, _, res = uses(6)
    assert all(o.ok for o in res), res


def test_max_uses_1():
    _, _, res = uses(2, base_env(KEYX_EPHEMERAL_MAX_USES=1), "X25519", "X25519")
    assert [o.ok for o in res] == [True, False], res
    assert "key used up" in res[1].error, res[1]
