"""The provider itself: identity, configuration keys and their environment overrides, debug trace."""

import re

import pytest

import kxutil
from kxutil import CONFIG_KEYS, base_env, openssl

# One value per key that docs/configuration.md does not accept.
INVALID = {
    "backends": "tmp",
    "tpm-tcti": "",
    "tpm-parent": "0x12345678",
    "pkcs11-module": "",
    "pkcs11-token": "token=keyx",
    "pkcs11-pin": "file:",
    "pkcs11-raw-rsa": "maybe",
    "tpm-encrypt-sessions": "2",
    "tpm-timeout": "99",
    "tpm-pool": "1025",
    "pkcs11-pool": "-1",
    "pkcs11-timeout": "600001",
    "audit-log": "",
    "ephemeral-max-uses": "ten",
    "debug": "2",
}


def providers(listing):
    """{name: {field: value}} from `openssl list -providers -verbose`."""
    out, cur = {}, None
    for line in listing.splitlines():
        m = re.match(r"^  (\S+)$", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        m = re.match(r"^    ([a-z ]+): (.*)$", line)
        if m and cur is not None:
            cur.setdefault(m.group(1), m.group(2))
    return out


def check_keyx_listed(r):
    r.ok("openssl list -providers")
    p = providers(r.out)
    assert "keyx" in p, f"keyx not listed:\n{r!r}"
    k = p["keyx"]
    assert "keyx" in k.get("name", ""), f"name: {k}"
    assert k.get("version") == kxutil.project_version(), f"version: {k} (CMakeLists says {kxutil.project_version()})"
    assert k.get("status") == "active", f"status: {k}"


def test_listed_with_provider_path(module_dir):
    check_keyx_listed(openssl("list", "-providers", "-verbose", "-provider-path", module_dir, "-provider", "keyx"))


def test_listed_with_openssl_modules(module_dir):
    env = base_env(OPENSSL_MODULES=module_dir)
    check_keyx_listed(openssl("list", "-providers", "-verbose", "-provider", "keyx", env=env))


def test_listed_from_openssl_cnf(cnf):
    env = base_env(OPENSSL_CONF=cnf())
    r = openssl("list", "-providers", "-verbose", env=env)
    check_keyx_listed(r)
    assert "default" in providers(r.out), "default provider not active beside keyx"
    assert "warning" not in r.err, f"a valid configuration warned:\n{r!r}"


def test_every_key_has_an_invalid_value_here():
    assert set(INVALID) == set(CONFIG_KEYS)


def check_refusing(r, *names):
    """`openssl list -providers -verbose` of a keyx that cannot serve as configured: listed, status
    inactive, and stderr names the cause (one of names) once."""
    r.ok("openssl list -providers")
    k = providers(r.out).get("keyx")
    assert k is not None, f"keyx not listed: OpenSSL would run on without it:\n{r!r}"
    assert k.get("status") == "inactive", f"status: {k}\n{r!r}"
    lines = [l for l in r.err.splitlines() if l.startswith("keyx: error: ")]
    assert len(lines) == 1, f"expected one 'keyx: error:' line on stderr:\n{r!r}"
    assert any(re.search(rf"\b{re.escape(n)}\b", lines[0]) for n in names), f"{names} not named:\n{r!r}"
    assert "refuses every operation" in lines[0], r


@pytest.mark.parametrize("key", sorted(CONFIG_KEYS))
def test_invalid_value_in_openssl_cnf_refuses_to_serve(cnf, key):
    """keyx loads (so OpenSSL does not carry on with the default provider in its place), shows
    itself inactive and names the key; test_fail_closed.py checks that every operation fails."""
    env = base_env(OPENSSL_CONF=cnf(keyx={key: INVALID[key]}))
    check_refusing(openssl("list", "-providers", "-verbose", env=env), key)


@pytest.mark.parametrize("key", sorted(CONFIG_KEYS))
def test_invalid_value_in_environment_refuses_to_serve(module_dir, tmp, key):
    var = CONFIG_KEYS[key]
    env = base_env(**{var: INVALID[key]})
    r = openssl("list", "-providers", "-verbose", "-provider-path", module_dir, "-provider", "keyx", env=env)
    check_refusing(r, key, var)
    assert "invalid keyx configuration" in r.err, f"no 'invalid keyx configuration' error:\n{r!r}"


def test_unknown_key_refuses_to_serve(cnf):
    """A typo (`backedns = tpm`) would leave keyx on its defaults, in software: it is an error."""
    env = base_env(OPENSSL_CONF=cnf(keyx={"frobnicate": "1"}))
    r = openssl("list", "-providers", "-verbose", env=env)
    check_refusing(r, "frobnicate")
    assert 'unknown configuration key "frobnicate"' in r.err and "backends" in r.err, r


def test_valid_values_load(cnf, tmp):
    """Every key with a value the docs accept: keyx loads and does not warn."""
    good = {
        "backends": "software",
        "tpm-tcti": "swtpm:host=127.0.0.1,port=2321",
        "tpm-parent": "0x81000001",
        "pkcs11-module": "/usr/lib/softhsm/libsofthsm2.so",
        "pkcs11-token": "pkcs11:token=keyx",
        "pkcs11-pin": "env:KEYX_TEST_PIN",
        "pkcs11-raw-rsa": "1",
        "tpm-encrypt-sessions": "0",
        "tpm-timeout": "5000",
        "tpm-pool": "4",
        "pkcs11-pool": "0",
        "pkcs11-timeout": "2000",
        "audit-log": tmp / "audit.jsonl",
        "ephemeral-max-uses": "5",
        "debug": "0",
    }
    assert set(good) == set(CONFIG_KEYS)
    env = base_env(OPENSSL_CONF=cnf(keyx=good))
    r = openssl("list", "-providers", "-verbose", env=env)
    check_keyx_listed(r)
    assert "warning" not in r.err, f"valid values warned:\n{r!r}"


# ---- environment overrides openssl.cnf ------------------------------------------------------


def test_env_overrides_ephemeral_max_uses(cnf):
    conf = cnf(keyx={"ephemeral-max-uses": "1"}, prefer=False)
    r = kxutil.run(kxutil.driver_cmd(config=conf) + ["uses", "EC", "P-256", "3"],
                   env=base_env(KEYX_EPHEMERAL_MAX_USES="3"))
    r.ok("uses")
    lines = r.out.splitlines()[1:]
    assert [l.split()[1] for l in lines] == ["ok", "ok", "ok"], f"KEYX_EPHEMERAL_MAX_USES=3 did not override 1:\n{r!r}"
    # and the file's value alone applies
    r = kxutil.run(kxutil.driver_cmd(config=conf) + ["uses", "EC", "P-256", "2"])
    r.ok("uses")
    assert [l.split()[1] for l in r.out.splitlines()[1:]] == ["ok", "err"], f"ephemeral-max-uses = 1 ignored:\n{r!r}"


def test_env_overrides_audit_log(cnf, tmp):
    in_file, in_env = tmp / "from-cnf.jsonl", tmp / "from-env.jsonl"
    conf = cnf(keyx={"audit-log": in_file}, prefer=False)
    r = kxutil.run(kxutil.driver_cmd(config=conf) + ["uses", "X25519", "X25519", "1"],
                   env=base_env(KEYX_AUDIT_LOG=in_env))
    r.ok("uses")
    assert in_env.exists(), "KEYX_AUDIT_LOG not used"
    assert not in_file.exists() or not in_file.read_text(), "the openssl.cnf audit-log was written despite KEYX_AUDIT_LOG"
    assert any(e["event"] == "derive" for e in kxutil.read_audit(in_env))


def test_env_overrides_debug(cnf):
    conf = cnf(keyx={"debug": "0"}, prefer=False)
    r = kxutil.run(kxutil.driver_cmd(config=conf) + ["uses", "X25519", "X25519", "1"],
                   env=base_env(KEYX_DEBUG="1"))
    r.ok("uses")
    assert re.search(r"^keyx: .*derive", r.err, re.M), f"KEYX_DEBUG=1 did not override debug = 0:\n{r!r}"


def test_env_overrides_backends(cnf):
    conf = cnf(keyx={"backends": "software"}, prefer=False)
    r = kxutil.run(kxutil.driver_cmd(config=conf) + ["uses", "X25519", "X25519", "1"],
                   env=base_env(KEYX_BACKENDS="nonsense"))
    assert r.rc != 0 or " ok " not in r.out, f"KEYX_BACKENDS=nonsense was ignored:\n{r!r}"


# ---- debug trace ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg,group", [("EC", "P-256"), ("X25519", "X25519"), ("X448", "X448"), ("DH", "ffdhe2048")])
def test_debug_trace_names_backend_alg_key_and_no_secret(build, alg, group):
    k = kxutil.pair(alg, group)
    vectors = [("ab", alg, group, k["A"]["priv"], "raw", k["B"]["pub"])]
    got, r = kxutil.derive(vectors, env=base_env(KEYX_DEBUG="1"), dh_pad=1)
    assert got["ab"].ok and got["ab"].secret == k["S"], f"derive failed: {got['ab']}"
    kid = kxutil.key_id(k["A"]["pub"])
    traces = [l for l in r.err.splitlines() if l.startswith("keyx: ")]
    derive = [l for l in traces if re.search(r"\bderive\b", l)]
    assert derive, f"no derive trace on stderr with KEYX_DEBUG=1:\n{r!r}"
    line = derive[-1]
    assert "backend=software" in line, f"trace without backend: {line}"
    assert re.search(rf"\balg={alg}\b", line), f"trace without alg={alg}: {line}"
    assert f"key={kid}" in line, f"trace without key={kid}: {line}"
    kxutil.assert_no_secrets(r.err, [k["S"], k["A"]["priv"], k["B"]["priv"]], "KEYX_DEBUG trace")


def test_no_trace_without_debug(build):
    k = kxutil.pair("EC", "P-256")
    got, r = kxutil.derive([("ab", "EC", "P-256", k["A"]["priv"], "raw", k["B"]["pub"])])
    assert got["ab"].ok
    assert not [l for l in r.err.splitlines() if l.startswith("keyx:")], f"keyx wrote to stderr without KEYX_DEBUG:\n{r!r}"


# ---- the module file ------------------------------------------------------------------------


def test_only_provider_init_is_exported(module_path):
    r = kxutil.run(["nm", "-D", "--defined-only", module_path]).ok("nm -D")
    symbols = sorted(line.split()[-1] for line in r.out.splitlines() if line.strip())
    assert symbols == ["OSSL_provider_init"], f"keyx.so exports more than OSSL_provider_init: {symbols}"


def test_cmake_install_puts_module_in_openssl_modulesdir(build, tmp):
    """`cmake --install` puts in place the files the Debian package ships (kxutil.installed_files,
    which tests/test_debian_package.py checks against the .deb), and nothing else; the uninstall
    target, with the same DESTDIR, removes them and keyx's doc directory."""
    modulesdir = kxutil.openssl_modulesdir()
    root = tmp / "root"
    env = base_env(DESTDIR=root)
    r = kxutil.run(["cmake", "--install", build, "--prefix", "/usr"], env=env, timeout=120)
    r.ok("cmake --install")
    installed = root / modulesdir.lstrip("/") / "keyx.so"
    assert installed.is_file(), f"cmake --install did not put keyx.so in {modulesdir}:\n{r!r}"
    files = {"/" + str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}
    expected = kxutil.installed_files(modulesdir)
    assert files == expected, (f"cmake --install: missing {sorted(expected - files)}, "
                               f"not expected {sorted(files - expected)}")
    for rel in files - {f"{modulesdir}/keyx.so"}:
        src = kxutil.REPO / (rel.split("/share/doc/keyx/", 1)[1] if "/share/doc/" in rel else "docs/keyx.7")
        assert (root / rel.lstrip("/")).read_bytes() == src.read_bytes(), f"{rel} differs from {src}"

    r = kxutil.run(["cmake", "--build", build, "--target", "uninstall"], env=env, timeout=120)
    r.ok("cmake --build --target uninstall")
    left = sorted("/" + str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    assert not left, f"the uninstall target left {left}:\n{r!r}"
    assert not (root / "usr/share/doc/keyx").exists(), f"the uninstall target left share/doc/keyx:\n{r!r}"
