"""Smoke tests of the benchmark program (bench/keyx-bench.c), run briefly on a real SoftHSM2 token.

They assert behaviour, never speed: every row is printed, the JSON is valid and complete, every
figure is a positive rate, ratios are the quotients of the measured medians, the memory figures
are there, --only selects, and the program refuses to report keyx figures when keyx is not the
provider serving the keys or when the token cannot be used.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

import kxutil
from kxutil import TIMEOUT, base_env, run

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN = "keyx-bench-test"
PIN = "4711-bench"

ALGS_ALL = ("P-256", "X25519", "ffdhe2048")
ALGS_P11 = ("P-256", "ffdhe2048")
OPS = ("derive", "keygen+derive")
READY = ("derive", "keygen+derive", "static-derive")
# RSA-OAEP decrypt rows: SHA-256 everywhere, SHA-1 (SoftHSM's native OAEP) on pkcs11
RSA = "RSA-2048"
RSA_P11_CELLS = {(impl, RSA, op) for impl in ("keyx-pkcs11", "raw-pkcs11")
                 for op in ("oaep-decrypt", "oaep-sha1-decrypt")}
RSA_CELLS = {("default", RSA, "oaep-decrypt"), ("keyx-software", RSA, "oaep-decrypt")} | RSA_P11_CELLS
# signatures with a certificate key: ECDSA P-256 and RSA-2048 PSS, SHA-256
SIGN = {("P-256", "ecdsa-sign"), (RSA, "pss-sign")}
SIGN_CELLS = {(impl, alg, op) for impl in ("default", "keyx-software", "keyx-pkcs11", "raw-pkcs11")
              for alg, op in SIGN}
# HPKE open (P-256 DHKEM): OpenSSL >= 3.2 only; no raw rows (the raw static derive is its floor)
HPKE = kxutil.openssl_version() >= (3, 2)
HPKE_CELLS = {(impl, "P-256", "hpke-open") for impl in ("default", "keyx-software", "keyx-pkcs11")
              } if HPKE else set()


def expected_cells():
    cells = set()
    for impl in ("default", "keyx-software"):
        cells |= {(impl, a, op) for a in ALGS_ALL for op in OPS}
    for impl in ("keyx-pkcs11", "raw-pkcs11"):
        cells |= {(impl, a, op) for a in ALGS_P11 for op in OPS}
        cells.add((impl, "P-256", "static-derive"))
    # the same with the peer imported beforehand: keyx's side of the comparison with raw Cryptoki
    cells |= {("keyx-pkcs11", "P-256", op + "(ready)") for op in READY}
    return cells | RSA_CELLS | SIGN_CELLS | HPKE_CELLS


def bench_bin():
    return kxutil.build_dir() / "bench" / "keyx-bench"


@pytest.fixture
def token(tmp, build):
    """A SoftHSM2 token in tmp with a P-256 key labelled bench-ecdh; fails if SoftHSM is missing."""
    for tool in ("softhsm2-util", "pkcs11-tool"):
        assert shutil.which(tool), f"{tool} not found: install softhsm2 and opensc"
    assert Path(MODULE).is_file(), f"{MODULE} not found: install softhsm2"
    assert bench_bin().is_file(), f"{bench_bin()} not found (bench/CMakeLists.txt)"
    (tmp / "tokens").mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    env = base_env(SOFTHSM2_CONF=conf)
    run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--so-pin", "123456",
         "--pin", PIN], env=env).ok("softhsm2-util --init-token")
    run(["pkcs11-tool", "--module", MODULE, "--token-label", TOKEN, "--login", "--pin", PIN,
         "--keypairgen", "--key-type", "EC:prime256v1", "--label", "bench-ecdh", "--id", "01",
         "--usage-derive"], env=env).ok("pkcs11-tool --keypairgen")
    run(["pkcs11-tool", "--module", MODULE, "--token-label", TOKEN, "--login", "--pin", PIN,
         "--keypairgen", "--key-type", "rsa:2048", "--label", "bench-rsa", "--id", "02",
         "--usage-decrypt"], env=env).ok("pkcs11-tool --keypairgen rsa:2048")
    for kt, label, kid in (("EC:prime256v1", "bench-sign-ec", "03"), ("rsa:2048", "bench-sign-rsa", "04")):
        run(["pkcs11-tool", "--module", MODULE, "--token-label", TOKEN, "--login", "--pin", PIN,
             "--keypairgen", "--key-type", kt, "--label", label, "--id", kid, "--usage-sign"],
            env=env).ok(f"pkcs11-tool --keypairgen {label}")
    pin = tmp / "pin"
    pin.write_text(PIN)
    return {"env": env, "pin": pin}


def bench_args(cnf, token, *extra, software=None, pkcs11=None):
    sw = software or cnf(keyx={"backends": "software"}, name="software.cnf")
    p11 = pkcs11 or cnf(keyx={"backends": "pkcs11", "pkcs11-module": MODULE,
                              "pkcs11-token": f"pkcs11:token={TOKEN}",
                              "pkcs11-pin": f"file:{token['pin']}",
                              # OAEP-SHA256 on SoftHSM: CKM_RSA_X_509 + keyx's OAEP decoding
                              "pkcs11-raw-rsa": "1"}, name="pkcs11.cnf")
    return [bench_bin(), "--software-config", sw, "--pkcs11-config", p11,
            "--pkcs11-module", MODULE, "--pkcs11-token", TOKEN, "--pkcs11-pin-file", token["pin"],
            "--pkcs11-rsa-key", "bench-rsa",
            "--pkcs11-sign-key", "bench-sign-ec", "--pkcs11-sign-rsa-key", "bench-sign-rsa",
            "--rounds", "1", "--seconds", "0.1", "--peers", "4", "--mem-ops", "50", *extra]


def run_bench(args, token, timeout=max(TIMEOUT, 180)):
    return run(args, env=token["env"], timeout=timeout)


def test_bench_table_has_every_row(cnf, token):
    r = run_bench(bench_args(cnf, token), token).ok("keyx-bench")
    rows = {}
    for line in r.out.splitlines():
        m = re.match(r"^(\S+)\s+(\S+)\s+((?:derive|keygen\+derive|static-derive)(?:\(ready\))?|oaep-(?:sha1-)?decrypt|ecdsa-sign|pss-sign|hpke-open)\s+(\d+)\s+(\d+)-(\d+)"
                     r"\s+([\d.]+)\s+ok$", line)
        if m:
            rows[m.group(1, 2, 3)] = [float(x) for x in m.group(4, 5, 6, 7)]
    assert set(rows) == expected_cells(), f"rows differ from the plan:\n{r!r}"
    for cellname, (ops, lo, hi, cpu) in rows.items():
        assert ops > 0 and lo <= ops <= hi and cpu > 0, f"{cellname}: bad figures\n{r!r}"
    for ratio in ("keyx-software/default", "keyx-pkcs11/raw-pkcs11", "keyx-pkcs11/default"):
        assert re.search(rf"^{re.escape(ratio)}\s+P-256\s+keygen\+derive\s+[\d.]+", r.out, re.M), \
            f"ratio {ratio} missing:\n{r!r}"
    assert re.search(r"^keyx-pkcs11/raw-pkcs11\s+P-256\s+static-derive\s+[\d.]+", r.out, re.M)
    mem = re.findall(r"^(\S+)\s+P-256\s+(\S+)\s+50\s+-?\d+\s+-?[\d.]+$", r.out, re.M)
    assert {m for m in mem} == {(c[0], c[2]) for c in expected_cells() if c[1] == "P-256"}, \
        f"memory rows missing:\n{r!r}"
    # the PIN never reaches the output
    assert PIN not in r.out and PIN not in r.err


def test_bench_json(cnf, token):
    r = run_bench(bench_args(cnf, token, "--json", "--rounds", "2"), token).ok("keyx-bench --json")
    doc = json.loads(r.out)
    assert doc["rounds"] == 2 and doc["peer_validation"] is True
    cells = {(c["impl"], c["alg"], c["op"]): c for c in doc["cells"]}
    assert len(cells) == len(doc["cells"]), "a cell appears twice"
    assert set(cells) == expected_cells()
    for key, c in cells.items():
        assert len(c["rounds"]) == 2 and all(x > 0 for x in c["rounds"]), key
        assert c["min"] == pytest.approx(min(c["rounds"]), abs=1e-3), key
        assert c["max"] == pytest.approx(max(c["rounds"]), abs=1e-3), key
        # median of two rounds = their mean
        assert c["ops_per_s"] == pytest.approx(sum(c["rounds"]) / 2, abs=1e-3), key
        assert c["cpu_us_per_op"] > 0 and c["secret_check"] is True, key
        if c["alg"] == "P-256":
            assert c["memory"]["ops"] == 50 and isinstance(c["memory"]["rss_growth_kb"], int), key
        else:
            assert "memory" not in c, key
    seen = set()
    for ra in doc["ratios"]:
        num = cells[(ra["num"], ra["alg"], ra["op"])]["ops_per_s"]
        den_op = ra["op"].replace("(ready)", "") if ra["den"] == "raw-pkcs11" else ra["op"]
        if ra["op"] == "hpke-open" and ra["den"] == "raw-pkcs11":
            den_op = "static-derive"  # the floor: the token's DH of the same key
        assert ra["den_op"] == den_op, ra
        den = cells[(ra["den"], ra["alg"], den_op)]["ops_per_s"]
        assert ra["ratio"] == pytest.approx(num / den, rel=1e-4), ra
        if "target" in ra:
            assert ra["meets_target"] == (ra["ratio"] >= ra["target"]), ra
        seen.add((ra["num"], ra["den"], ra["alg"], ra["op"]))
    for alg in ALGS_ALL:
        assert ("keyx-software", "default", alg, "keygen+derive") in seen
    for alg in ALGS_P11:
        for op in OPS:
            assert ("keyx-pkcs11", "raw-pkcs11", alg, op) in seen
    assert ("keyx-pkcs11", "raw-pkcs11", "P-256", "static-derive") in seen
    for op in READY:  # raw Cryptoki's plain figure is the denominator of the "(ready)" ratios
        assert ("keyx-pkcs11", "raw-pkcs11", "P-256", op + "(ready)") in seen
    if HPKE:
        for num, den in (("keyx-software", "default"), ("keyx-pkcs11", "default"),
                         ("keyx-pkcs11", "raw-pkcs11")):
            assert (num, den, "P-256", "hpke-open") in seen, (num, den)


def test_bench_only_selects(cnf, token):
    r = run_bench(bench_args(cnf, token, "--json", "--only", "pkcs11/P-256/static"), token).ok()
    doc = json.loads(r.out)
    assert {(c["impl"], c["alg"], c["op"]) for c in doc["cells"]} == {
        ("keyx-pkcs11", "P-256", "static-derive"), ("keyx-pkcs11", "P-256", "static-derive(ready)"),
        ("raw-pkcs11", "P-256", "static-derive")}
    assert [(x["num"], x["den"], x["op"]) for x in doc["ratios"]] == [
        ("keyx-pkcs11", "raw-pkcs11", "static-derive"), ("keyx-pkcs11", "raw-pkcs11", "static-derive(ready)")]
    r = run_bench(bench_args(cnf, token, "--only", "no-such-cell"), token)
    assert r.rc != 0 and "no cell selected" in r.err, r


def test_bench_default_only_without_configs(build):
    r = run([bench_bin(), "--rounds", "1", "--seconds", "0.05", "--peers", "2", "--mem-ops", "0",
             "--json"], timeout=max(TIMEOUT, 120)).ok("keyx-bench without keyx configs")
    doc = json.loads(r.out)
    assert {c["impl"] for c in doc["cells"]} == {"default"}
    assert doc["ratios"] == []


def test_bench_refuses_when_keyx_does_not_serve(cnf, token):
    """keyx loaded but not preferred: the keys come from the default provider, and the program
    must say so instead of reporting default-provider figures as keyx's."""
    sw = cnf(keyx={"backends": "software"}, prefer=False, name="not-preferred.cnf")
    r = run_bench(bench_args(cnf, token, "--only", "keyx-software/P-256/derive", software=sw),
                  token)
    assert r.rc != 0, r
    assert "served by provider 'default', not 'keyx'" in r.err, r


def test_bench_wrong_pin_fails_cleanly(cnf, token, tmp):
    bad = tmp / "bad-pin"
    bad.write_text("0000")
    args = bench_args(cnf, token, "--only", "raw-pkcs11/P-256/static")
    args[args.index("--pkcs11-pin-file") + 1] = bad
    r = run_bench(args, token)
    assert r.rc == 1, r
    assert "C_Login failed" in r.err and "0000" not in r.err, r


def test_bench_threads(cnf, token):
    """--threads 2 runs every cell on two threads as well (raw rows on their own sessions) and
    reports the sum of the threads' rates and its ratio to one thread."""
    r = run_bench(bench_args(cnf, token, "--json", "--threads", "2", "--only", "P-256/derive",
                             "--mem-ops", "0"), token).ok("keyx-bench --threads 2")
    doc = json.loads(r.out)
    assert doc["threads"] == 2
    assert {c["impl"] for c in doc["cells"]} == {"default", "keyx-software", "keyx-pkcs11",
                                                 "raw-pkcs11"}
    for c in doc["cells"]:
        assert len(c["threads_rounds"]) == 1 and c["threads_rounds"][0] > 0, c
        assert c["threads_ops_per_s"] == pytest.approx(c["threads_rounds"][0], abs=1e-3), c
        assert c["scaling"] == pytest.approx(c["threads_ops_per_s"] / c["ops_per_s"], rel=1e-4), c
        assert 0 < c["threads_cpu_per_wall"] <= 1.05, c
        assert "cryptoki_calls_per_op" in c or c["impl"] in ("default", "keyx-software")
    r = run_bench(bench_args(cnf, token, "--only", "keyx-software/P-256/derive", "--threads", "2",
                             "--mem-ops", "0"), token).ok()
    assert re.search(r"^2 threads", r.out, re.M), r
    # scaling, then the threads' CPU time as a share of their wall time (below 1: lock waits or
    # a busy machine)
    assert re.search(r"^keyx-software\s+P-256\s+derive\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+$", r.out, re.M), r


def test_bench_refuses_pkcs11_rows_that_do_not_reach_the_token(cnf, token):
    """A 'pkcs11' configuration that routes keys to software must not yield pkcs11 figures."""
    wrong = cnf(keyx={"backends": "software"}, name="not-pkcs11.cnf")
    r = run_bench(bench_args(cnf, token, "--only", "keyx-pkcs11/P-256/derive", pkcs11=wrong),
                  token)
    assert r.rc == 1, r
    assert "made 0 C_DeriveKey calls on the token" in r.err, r


# ---- RSA-OAEP decrypt -----------------------------------------------------------------------------

RSA_RATIOS = {("keyx-software", "default", "oaep-decrypt"),
              ("keyx-pkcs11", "raw-pkcs11", "oaep-decrypt"),
              ("keyx-pkcs11", "raw-pkcs11", "oaep-sha1-decrypt"),
              ("keyx-pkcs11", "default", "oaep-decrypt")}


def test_bench_rsa_rows_and_ratios(cnf, token):
    """OAEP-SHA256 decrypt rows of every configured implementation, each after one ciphertext of
    its pool (made by the default provider with the cell's public key) decrypted to the key that
    was encrypted; ratios are the quotients of the medians with no target (none is set);
    the keyx-pkcs11 rows make their C_Decrypt on the token (one per operation)."""
    r = run_bench(bench_args(cnf, token, "--json", "--only", "RSA-2048/oaep", "--rounds", "2",
                             "--count-ops", "10"), token).ok("keyx-bench --only RSA")
    doc = json.loads(r.out)
    cells = {(c["impl"], c["alg"], c["op"]): c for c in doc["cells"]}
    assert set(cells) == RSA_CELLS, r
    for key, c in cells.items():
        assert c["secret_check"] is True and c["ops_per_s"] > 0, key
        assert len(c["rounds"]) == 2 and all(x > 0 for x in c["rounds"]), key
    ratios = {(x["num"], x["den"], x["op"]): x for x in doc["ratios"]}
    assert set(ratios) == RSA_RATIOS, doc["ratios"]
    for (num, den, op), x in ratios.items():
        assert x["alg"] == RSA and "target" not in x, x
        want = cells[(num, RSA, op)]["ops_per_s"] / cells[(den, RSA, op)]["ops_per_s"]
        assert x["ratio"] == pytest.approx(want, rel=1e-4), x
    for impl in ("keyx-pkcs11", "raw-pkcs11"):
        for op in ("oaep-decrypt", "oaep-sha1-decrypt"):
            calls = cells[(impl, RSA, op)]["cryptoki_calls_per_op"]
            assert calls["C_Decrypt"] == pytest.approx(1.0), (impl, op, calls)
    # the table: every row, and the ratios with "-" for the target
    r = run_bench(bench_args(cnf, token, "--only", "RSA-2048/oaep", "--mem-ops", "0"), token).ok()
    for impl, alg, op in RSA_CELLS:
        assert re.search(rf"^{re.escape(impl)}\s+{alg}\s+{op}\s+\d+\s+\d+-\d+\s+[\d.]+\s+ok$",
                         r.out, re.M), f"row {impl} {op} missing:\n{r!r}"
    for num, den, op in RSA_RATIOS:
        assert re.search(rf"^{num}/{den}\s+{alg}\s+{op}\s+[\d.]+\s+-$", r.out, re.M), \
            f"ratio {num}/{den} {op} missing:\n{r!r}"
    assert PIN not in r.out and PIN not in r.err


def test_bench_rsa_pkcs11_needs_raw_rsa(cnf, token):
    """Without pkcs11-raw-rsa = 1, SoftHSM cannot do OAEP-SHA256 and keyx refuses: the program
    stops on that cell instead of reporting a figure."""
    p11 = cnf(keyx={"backends": "pkcs11", "pkcs11-module": MODULE,
                    "pkcs11-token": f"pkcs11:token={TOKEN}", "pkcs11-pin": f"file:{token['pin']}"},
              name="pkcs11-no-raw.cnf")
    r = run_bench(bench_args(cnf, token, "--only", "keyx-pkcs11/RSA-2048/oaep-decrypt",
                             pkcs11=p11), token)
    assert r.rc == 1, r
    assert "keyx-pkcs11/RSA-2048/oaep-decrypt" in r.err, r
    # SHA-1 is the token's own OAEP: it works without the setting
    run_bench(bench_args(cnf, token, "--only", "keyx-pkcs11/RSA-2048/oaep-sha1", pkcs11=p11),
              token).ok("SHA-1 OAEP without pkcs11-raw-rsa")


# ---- TPM: keyx-tpm beside raw ESYS on a private swtpm -------------------------------------------

TPM_HANDLE = 0x81000002
TPM_CELLS = ({("keyx-tpm", "P-256", op) for op in READY} |
             {("keyx-tpm", "P-256", op + "(ready)") for op in READY} |
             {(raw, "P-256", op) for raw in ("raw-esys-sess", "raw-esys") for op in OPS} |
             ({("keyx-tpm", "P-256", "hpke-open")} if HPKE else set()))


@pytest.fixture
def tpm_bench(swtpm_factory, tmp, build):
    """A private swtpm with a persistent P-256 decrypt key at 0x81000002 (made with tpm2-tools,
    flushing after each step: swtpm has three transient slots) and a keyx config on it with an
    audit log. Fails when swtpm or tpm2-tools are missing."""
    assert bench_bin().is_file(), f"{bench_bin()} not found (bench/CMakeLists.txt)"
    tpm = swtpm_factory()
    tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-G", "ecc256", "-c", tmp / "srk.ctx")
    tpm.flush_transient()
    tpm.tools("tpm2_create", "-Q", "-C", tmp / "srk.ctx", "-G", "ecc256:null", "-a",
              "decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
              "-u", tmp / "k.pub", "-r", tmp / "k.priv")
    tpm.flush_transient()
    tpm.tools("tpm2_load", "-Q", "-C", tmp / "srk.ctx", "-u", tmp / "k.pub", "-r", tmp / "k.priv",
              "-c", tmp / "k.ctx")
    tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", tmp / "k.ctx", f"0x{TPM_HANDLE:x}")
    tpm.flush_transient()
    log = tmp / "audit-tpm.jsonl"
    cfg = kxutil.write_cnf(tmp / "tpm.cnf", keyx={"backends": "tpm", "tpm-tcti": tpm.tcti,
                                                  "audit-log": log})
    return {"tpm": tpm, "cnf": cfg, "log": log}


def tpm_args(tb, *extra):
    return [bench_bin(), "--tpm-config", tb["cnf"], "--tpm-tcti", tb["tpm"].tcti,
            "--tpm-handle", f"0x{TPM_HANDLE:08x}", "--only", "P-256", "--rounds", "1",
            "--seconds", "0.1", "--peers", "4", "--mem-ops", "50", *extra]


def test_bench_tpm_rows_ratios_and_cross_check(tpm_bench):
    """keyx-tpm and raw ESYS rows (with and without a salted session) are all measured, each after
    a secret cross-checked against the default provider (peer's private key with the cell's
    public key; the program stops on a mismatch), in one process on swtpm's single connection;
    ratios are the quotients of the medians; the absolute keygen+derive target is reported; and
    the audit log shows keyx's keys made and used in the TPM, never in software."""
    r = run(tpm_args(tpm_bench, "--json"), timeout=max(TIMEOUT, 300)).ok("keyx-bench (tpm)")
    doc = json.loads(r.out)
    cells = {(c["impl"], c["alg"], c["op"]): c for c in doc["cells"]}
    assert set(cells) == TPM_CELLS | {("default", "P-256", op) for op in OPS + ("ecdsa-sign",)} | \
        ({("default", "P-256", "hpke-open")} if HPKE else set()), r
    for key, c in cells.items():
        assert c["secret_check"] is True and c["ops_per_s"] > 0, key
        assert c["memory"]["ops"] == 50, key
    ratios = {(x["num"], x["den"], x["op"]): x for x in doc["ratios"]}
    for den in ("raw-esys-sess", "raw-esys"):
        for op in READY:
            for o in (op, op + "(ready)"):
                x = ratios[("keyx-tpm", den, o)]
                base = "derive" if o.startswith("static-derive") or o == "derive(ready)" else \
                    o.replace("(ready)", "")
                want = cells[("keyx-tpm", "P-256", o)]["ops_per_s"] / cells[(den, "P-256", base)]["ops_per_s"]
                assert x["ratio"] == pytest.approx(want, rel=1e-4), x
    if HPKE:  # an open against the default's open and against the raw ZGen of the same key
        x = ratios[("keyx-tpm", "default", "hpke-open")]
        assert x["den_op"] == "hpke-open", x
        for den in ("raw-esys-sess", "raw-esys"):
            x = ratios[("keyx-tpm", den, "hpke-open")]
            assert x["den_op"] == "derive", x
            want = cells[("keyx-tpm", "P-256", "hpke-open")]["ops_per_s"] / \
                cells[(den, "P-256", "derive")]["ops_per_s"]
            assert x["ratio"] == pytest.approx(want, rel=1e-4), x
        assert any(e.get("event") == "decapsulate" and e.get("backend") == "tpm" and e.get("ok")
                   for e in kxutil.read_audit(tpm_bench["log"])), "no decapsulation in the TPM"
    # the like-for-like derive ratio carries the 0.9 target
    assert ratios[("keyx-tpm", "raw-esys-sess", "derive(ready)")]["target"] == 0.9
    absolute = {(a["impl"], a["op"]): a for a in doc["absolute"]}
    a = absolute[("keyx-tpm", "keygen+derive")]
    assert a["target"] == 518 and a["meets_target"] == (a["ops_per_s"] >= 518), a
    events = kxutil.read_audit(tpm_bench["log"])
    backends = {(e.get("event"), e.get("backend")) for e in events}
    assert ("keygen", "tpm") in backends and ("derive", "tpm") in backends, backends
    assert not any(e.get("backend") == "software" and e.get("event") in ("keygen", "derive")
                   for e in events), "a keyx-tpm cell ran in software"
    # raw ESYS flushed what it made: only keyx's objects could remain, and keyx has exited
    left = tpm_bench["tpm"].tools("tpm2_getcap", "handles-transient").out
    assert "0x80" not in left, left


def test_bench_tpm_table(tpm_bench):
    r = run(tpm_args(tpm_bench, "--mem-ops", "0"), timeout=max(TIMEOUT, 300)).ok("keyx-bench")
    for impl, alg, op in TPM_CELLS:
        assert re.search(rf"^{re.escape(impl)}\s+{alg}\s+{re.escape(op)}\s+\d+\s+\d+-\d+\s+[\d.]+\s+ok$",
                         r.out, re.M), f"row {impl} {op} missing:\n{r!r}"
    assert re.search(r"^keyx-tpm/raw-esys-sess\s+P-256\s+derive\(ready\)\s+[\d.]+\s+>=0\.90", r.out, re.M), r
    assert re.search(r"^keyx-tpm\s+P-256\s+keygen\+derive\s+\d+\s+>=518\s+2x tpm2-openssl", r.out, re.M), r


def test_bench_tpm_options_checked(tpm_bench):
    r = run([bench_bin(), "--tpm-config", tpm_bench["cnf"], "--rounds", "1"], timeout=TIMEOUT)
    assert r.rc == 2 and "--tpm-config needs --tpm-tcti and --tpm-handle" in r.err, r
    r = run(tpm_args(tpm_bench) + ["--tpm-handle", "0x01000002"], timeout=TIMEOUT)
    assert r.rc == 2 and "bad value" in r.err, r
    # no key at the handle: the raw rows say so and the program stops
    args = tpm_args(tpm_bench, "--only", "raw-esys/")
    args[args.index("--tpm-handle") + 1] = "0x81000009"
    r = run(args, timeout=max(TIMEOUT, 120))
    assert r.rc == 1 and "no key at persistent handle 0x81000009" in r.err, r


def test_bench_counts_tpm_commands_on_the_wire(tpm_bench):
    """--count-tpm relays every TPM command of the process through a loopback proxy and counts
    them per operation. The raw ESYS rows, whose calls are known from their code (CreateLoaded +
    ECDH_ZGen + FlushContext; one ECDH_ZGen), show that the proxy counts what crosses the wire;
    keyx-tpm must make no more commands than raw ESYS for the same operation (one CreatePrimary,
    one ECDH_ZGen, one FlushContext per ephemeral exchange; one ECDH_ZGen per derive with a key it
    holds or a persistent one: names and the public key are cached, nothing is read back)."""
    args = tpm_args(tpm_bench, "--count-tpm", "--count-ops", "20", "--json")
    args[args.index("--only") + 1] = "^(keyx-tpm|raw-esys)"
    r = run(args, timeout=max(TIMEOUT, 300)).ok("keyx-bench --count-tpm")
    rows = {(c["impl"], c["op"]): c for c in json.loads(r.out)["tpm_commands"]}
    assert set(rows) == {(i, op) for i, _, op in TPM_CELLS}, r
    for key, c in rows.items():
        assert c["ops"] == 20 and c["total"] == pytest.approx(sum(c["commands"].values())), c
    for raw in ("raw-esys", "raw-esys-sess"):
        assert rows[(raw, "keygen+derive")]["commands"] == {
            "CreateLoaded": 1, "ECDH_ZGen": 1, "FlushContext": 1}, rows[(raw, "keygen+derive")]
        assert rows[(raw, "derive")]["commands"] == {"ECDH_ZGen": 1}, rows[(raw, "derive")]
    for op in ("keygen+derive", "keygen+derive(ready)"):
        assert rows[("keyx-tpm", op)]["commands"] == {
            "CreatePrimary": 1, "ECDH_ZGen": 1, "FlushContext": 1}, rows[("keyx-tpm", op)]
    for op in ("derive", "derive(ready)", "static-derive", "static-derive(ready)") + \
            (("hpke-open",) if HPKE else ()):
        assert rows[("keyx-tpm", op)]["commands"] == {"ECDH_ZGen": 1}, rows[("keyx-tpm", op)]
    # the counting run times nothing: no cells, ratios or memory figures are printed
    assert "cells" not in json.loads(r.out)
    # the proxy speaks to swtpm only
    args[args.index("--tpm-tcti") + 1] = "device:/dev/tpmrm0"
    r = run(args, timeout=TIMEOUT)
    assert r.rc == 2 and "--tpm-tcti must be swtpm:host=H,port=P" in r.err, r


TPM_RSA_HANDLE = 0x81000004


@pytest.fixture
def tpm_rsa_bench(tpm_bench, tmp):
    """tpm_bench plus a persistent RSA-2048 decrypt key (scheme NULL) at 0x81000004."""
    tpm = tpm_bench["tpm"]
    tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-G", "ecc256", "-c", tmp / "srk2.ctx")
    tpm.flush_transient()
    tpm.tools("tpm2_create", "-Q", "-C", tmp / "srk2.ctx", "-G", "rsa2048:null:null", "-a",
              "decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
              "-u", tmp / "r.pub", "-r", tmp / "r.priv")
    tpm.flush_transient()
    tpm.tools("tpm2_load", "-Q", "-C", tmp / "srk2.ctx", "-u", tmp / "r.pub", "-r", tmp / "r.priv",
              "-c", tmp / "r.ctx")
    tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", tmp / "r.ctx", f"0x{TPM_RSA_HANDLE:x}")
    tpm.flush_transient()
    return tpm_bench


def test_bench_tpm_rsa_rows(tpm_rsa_bench):
    """keyx-tpm OAEP-SHA256 decrypt with the persistent key by URI beside one Esys_RSA_Decrypt on
    the same key (with and without the salted session) and the default provider; every cell
    decrypts one ciphertext of its pool to the key the default provider encrypted; the audit
    log shows the decrypts in the TPM."""
    args = tpm_args(tpm_rsa_bench, "--json", "--tpm-rsa-handle", f"0x{TPM_RSA_HANDLE:08x}")
    args[args.index("--only") + 1] = "RSA-2048/oaep"
    r = run(args, timeout=max(TIMEOUT, 300)).ok("keyx-bench (tpm rsa)")
    doc = json.loads(r.out)
    cells = {(c["impl"], c["alg"], c["op"]): c for c in doc["cells"]}
    assert set(cells) == {(i, RSA, "oaep-decrypt") for i in
                          ("default", "keyx-tpm", "raw-esys-sess", "raw-esys")}, r
    for key, c in cells.items():
        assert c["secret_check"] is True and c["ops_per_s"] > 0, key
    ratios = {(x["num"], x["den"]): x for x in doc["ratios"]}
    assert set(ratios) == {("keyx-tpm", "raw-esys-sess"), ("keyx-tpm", "raw-esys"),
                           ("keyx-tpm", "default"), ("raw-esys-sess", "raw-esys")}, doc["ratios"]
    for (num, den), x in ratios.items():
        want = cells[(num, RSA, "oaep-decrypt")]["ops_per_s"] / \
            cells[(den, RSA, "oaep-decrypt")]["ops_per_s"]
        assert x["ratio"] == pytest.approx(want, rel=1e-4) and "target" not in x, x
    events = kxutil.read_audit(tpm_rsa_bench["log"])
    assert any(e.get("event") == "decrypt" and e.get("backend") == "tpm" and e.get("ok")
               for e in events), "no decrypt in the TPM in the audit log"
    assert not any(e.get("event") == "decrypt" and e.get("backend") == "software"
                   for e in events), "a keyx-tpm decrypt ran in software"
    left = tpm_rsa_bench["tpm"].tools("tpm2_getcap", "handles-transient").out
    assert "0x80" not in left, left
    # the handle option is checked
    r = run(tpm_args(tpm_rsa_bench, "--tpm-rsa-handle", "0x01000004"), timeout=TIMEOUT)
    assert r.rc == 2 and "bad value" in r.err, r


# ---- signatures with certificate keys -------------------------------------------------------------

SIGN_RATIOS = {(num, den, op) for _, op in SIGN for num, den in
               (("keyx-software", "default"), ("keyx-pkcs11", "raw-pkcs11"),
                ("keyx-pkcs11", "default"))}


def test_bench_sign_rows(cnf, token):
    """ECDSA P-256 and RSA-PSS sign rows for every implementation, each after one signature
    verified by the default provider with the cell's public key (read from the token for the raw
    rows); the keyx-pkcs11 rows sign on the token (one C_Sign per operation, as raw)."""
    r = run_bench(bench_args(cnf, token, "--json", "--only", "sign", "--rounds", "2",
                             "--count-ops", "10", "--mem-ops", "0"), token).ok("keyx-bench --only sign")
    doc = json.loads(r.out)
    cells = {(c["impl"], c["alg"], c["op"]): c for c in doc["cells"]}
    assert set(cells) == SIGN_CELLS, r
    for key, c in cells.items():
        assert c["secret_check"] is True and c["ops_per_s"] > 0, key
    ratios = {(x["num"], x["den"], x["op"]): x for x in doc["ratios"]}
    assert set(ratios) == SIGN_RATIOS, doc["ratios"]
    for (num, den, op), x in ratios.items():
        want = cells[(num, x["alg"], op)]["ops_per_s"] / cells[(den, x["alg"], op)]["ops_per_s"]
        assert x["ratio"] == pytest.approx(want, rel=1e-4) and "target" not in x, x
    for impl in ("keyx-pkcs11", "raw-pkcs11"):
        for alg, op in SIGN:
            calls = cells[(impl, alg, op)]["cryptoki_calls_per_op"]
            assert calls["C_Sign"] == pytest.approx(1.0), (impl, op, calls)


def test_bench_sign_refuses_software_pkcs11(cnf, token):
    """A 'pkcs11' configuration whose keys are not on the token cannot give pkcs11 sign figures:
    the program stops on that cell."""
    wrong = cnf(keyx={"backends": "software"}, name="not-pkcs11-sign.cnf")
    r = run_bench(bench_args(cnf, token, "--only", "keyx-pkcs11/P-256/ecdsa", pkcs11=wrong), token)
    assert r.rc == 1 and "keyx-pkcs11/P-256/ecdsa-sign" in r.err, r


TPM_SIGN_HANDLE = 0x81000003


def test_bench_tpm_sign_rows(tpm_bench, tmp):
    """keyx-tpm ECDSA P-256 with a persistent sign key loaded by URI beside one Esys_Sign of the
    same key (with the salted session and with a password) and the default provider; each
    signature verified by the default provider with the key's public point (ReadPublic for the
    raw rows); the audit log shows the signatures made in the TPM."""
    tpm = tpm_bench["tpm"]
    tpm.tools("tpm2_createprimary", "-Q", "-C", "o", "-G", "ecc256", "-c", tmp / "srk3.ctx")
    tpm.flush_transient()
    tpm.tools("tpm2_create", "-Q", "-C", tmp / "srk3.ctx", "-G", "ecc256:null", "-a",
              "sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
              "-u", tmp / "s.pub", "-r", tmp / "s.priv")
    tpm.flush_transient()
    tpm.tools("tpm2_load", "-Q", "-C", tmp / "srk3.ctx", "-u", tmp / "s.pub", "-r", tmp / "s.priv",
              "-c", tmp / "s.ctx")
    tpm.tools("tpm2_evictcontrol", "-Q", "-C", "o", "-c", tmp / "s.ctx", f"0x{TPM_SIGN_HANDLE:x}")
    tpm.flush_transient()
    args = tpm_args(tpm_bench, "--json", "--tpm-sign-handle", f"0x{TPM_SIGN_HANDLE:08x}")
    args[args.index("--only") + 1] = "ecdsa"
    r = run(args, timeout=max(TIMEOUT, 300)).ok("keyx-bench (tpm sign)")
    doc = json.loads(r.out)
    cells = {(c["impl"], c["alg"], c["op"]): c for c in doc["cells"]}
    assert set(cells) == {(i, "P-256", "ecdsa-sign") for i in
                          ("default", "keyx-tpm", "raw-esys-sess", "raw-esys")}, r
    for key, c in cells.items():
        assert c["secret_check"] is True and c["ops_per_s"] > 0, key
    ratios = {(x["num"], x["den"]): x for x in doc["ratios"]}
    assert set(ratios) == {("keyx-tpm", "raw-esys-sess"), ("keyx-tpm", "raw-esys")}, doc["ratios"]
    events = kxutil.read_audit(tpm_bench["log"])
    assert any(e.get("event") == "sign" and e.get("backend") == "tpm" and e.get("ok")
               for e in events), "no signature in the TPM in the audit log"
    left = tpm.tools("tpm2_getcap", "handles-transient").out
    assert "0x80" not in left, left
    r = run(tpm_args(tpm_bench, "--tpm-sign-handle", "0x01000003"), timeout=TIMEOUT)
    assert r.rc == 2 and "bad value" in r.err, r


# ---- HPKE open (OpenSSL >= 3.2) ------------------------------------------------------------------

@pytest.mark.skipif(not HPKE, reason="OSSL_HPKE_* and DHKEM exist from OpenSSL 3.2")
def test_bench_hpke_rows(cnf, token):
    """hpke-open of the default provider, keyx software and the token's static key, each after one
    message of its pool (sealed by the default provider to the cell's public key) opened to the
    message that was sealed; keyx-pkcs11's open makes one C_DeriveKey on the token, as the raw
    static derive that is its floor; ratios are the quotients of the medians, and the table names
    the floor's operation."""
    r = run_bench(bench_args(cnf, token, "--json", "--only",
                             "hpke-open|^raw-pkcs11/P-256/static-derive$", "--rounds", "2",
                             "--count-ops", "10", "--mem-ops", "0"), token).ok("keyx-bench hpke")
    doc = json.loads(r.out)
    cells = {(c["impl"], c["alg"], c["op"]): c for c in doc["cells"]}
    assert set(cells) == HPKE_CELLS | {("raw-pkcs11", "P-256", "static-derive")}, r
    for key, c in cells.items():
        assert c["secret_check"] is True and c["ops_per_s"] > 0 and len(c["rounds"]) == 2, key
    for impl in ("keyx-pkcs11", "raw-pkcs11"):
        calls = [c for k, c in cells.items() if k[0] == impl][0]["cryptoki_calls_per_op"]
        assert calls["C_DeriveKey"] == pytest.approx(1.0), (impl, calls)
    ratios = {(x["num"], x["den"]): x for x in doc["ratios"]}
    assert set(ratios) == {("keyx-software", "default"), ("keyx-pkcs11", "default"),
                           ("keyx-pkcs11", "raw-pkcs11")}, doc["ratios"]
    for (num, den), x in ratios.items():
        assert x["op"] == "hpke-open" and "target" not in x, x
        want = cells[(num, "P-256", "hpke-open")]["ops_per_s"] / \
            cells[(den, "P-256", x["den_op"])]["ops_per_s"]
        assert x["ratio"] == pytest.approx(want, rel=1e-4), x
    assert ratios[("keyx-pkcs11", "raw-pkcs11")]["den_op"] == "static-derive"
    r = run_bench(bench_args(cnf, token, "--only", "hpke-open|^raw-pkcs11/P-256/static-derive$",
                             "--mem-ops", "0"), token).ok()
    assert re.search(r"^keyx-pkcs11/raw-pkcs11\s+P-256\s+hpke-open\s+[\d.]+\s+-\s+floor: "
                     r"raw-pkcs11 static-derive", r.out, re.M), r


def test_bench_hpke_refuses_software_pkcs11(cnf, token):
    """An HPKE open whose key is not on the token gives no pkcs11 figure; on OpenSSL 3.0 the cells
    do not exist and the program says why."""
    wrong = cnf(keyx={"backends": "software"}, name="not-pkcs11-hpke.cnf")
    r = run_bench(bench_args(cnf, token, "--only", "keyx-pkcs11/P-256/hpke", pkcs11=wrong), token)
    if HPKE:
        assert r.rc == 1 and "keyx-pkcs11/P-256/hpke-open" in r.err, r
    else:
        assert r.rc == 2 and "HPKE needs OpenSSL >= 3.2" in r.err, r
