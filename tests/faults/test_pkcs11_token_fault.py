"""A SoftHSM2 token removed and restored (its directory moved out of the tokendir and back) under
one long-lived application doing every kind of operation: keygen (ephemeral P-256 on
the token), derive and ECDSA sign with a token EC key, RSA OAEP decrypt with a token RSA key, the
two made by `genpkey -pkeyopt keyx-label:` and loaded once by URI (mixed_app.py; every result
checked by the default provider). While the token is away each operation fails within 5 s with
an error naming the token; the process survives; once the token is back the same process uses
the same keys again (found again by their URI). The token's objects are the same before and
after.

test_pkcs11_reinit.py covers the same removal under TLS servers and threads; test_pkcs11_failover.py
a failover set of two tokens; faults/test_failover_tls.py with `software` listed after pkcs11.
"""

import shutil
import time

import kxutil
from fixture_softhsm import SoftHSM
from test_tpm_faults import OPS, App

LABEL = "keyx-a"


def token_dir(hsm, label):
    found = [d for d in hsm.tokendir.iterdir()
             if d.is_dir() and label.encode() in (d / "token.object").read_bytes()]
    assert len(found) == 1, found
    return found[0]


def until_ok(app, op, seconds):
    deadline = time.monotonic() + seconds
    while True:
        res, took = app.ask(op)
        assert took < 5, f"{op} took {took:.1f}s"
        if res == "ok":
            return
        assert time.monotonic() < deadline, f"{op} still failing {seconds}s after the token came back: {res}"
        time.sleep(0.2)


def test_every_operation_across_token_removal(tmp_path_factory, cnf, tmp):
    hsm = SoftHSM(tmp_path_factory.mktemp("tokfault")).setup()
    log = tmp / "audit.jsonl"
    conf = cnf(keyx={"audit-log": log, **hsm.keyx_settings(tokens=(LABEL,), **{"pkcs11-raw-rsa": 1})})
    env = hsm.env(OPENSSL_CONF=conf)
    kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt", "keyx-label:fault-ec",
                   env=env).ok("token EC key")
    kxutil.openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-pkeyopt",
                   "keyx-label:fault-rsa", env=env).ok("token RSA key")
    before = hsm.token_objects(LABEL)
    tdir, away = token_dir(hsm, LABEL), hsm.root / "away"
    app = App(conf, env, tmp / "app.err", f"pkcs11:token={LABEL};object=fault-ec;type=private",
                 f"pkcs11:token={LABEL};object=fault-rsa;type=private")
    try:
        for _ in range(3):
            for op in OPS:
                res, _ = app.ask(op)
                assert res == "ok", f"{op} with the token present: {res}"
        shutil.move(tdir, away)
        time.sleep(1.2)  # keyx checks a token's presence at most once a second
        for _ in range(2):
            for op in OPS:
                res, took = app.ask(op)
                assert res.startswith("err "), f"{op} with the token away: {res}"
                assert took < 5, f"{op} failed only after {took:.1f}s"
                assert LABEL in res and "keyx:" in res, f"{op}: the error does not name the token: {res}"
        shutil.move(away, tdir)
        for op in OPS:
            until_ok(app, op, 5)
        for _ in range(3):
            for op in OPS:
                res, _ = app.ask(op)
                assert res == "ok", f"{op} after the token came back, same process: {res}"
    finally:
        if away.exists():
            shutil.move(away, tdir)
        rc = app.close()
    app.check_run(rc, tmp / "app.err", log, "pkcs11")
    assert hsm.token_objects(LABEL) == before, "token objects added or lost"
