"""Shared helpers of the keyx test suite: paths, subprocess runner, openssl.cnf writer, audit log.

Every subprocess runs with a timeout (a hung process fails its test, it never hangs the suite),
in an environment stripped of the caller's KEYX_* and OPENSSL_* variables, with the sanitizer
runtimes preloaded when keyx.so was built with -DKEYX_SANITIZE (the openssl binary is not).
"""

import base64
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The Wycheproof files the tests use travel with the repository (tests/vectors/README.md).
VECTORS = REPO / "tests" / "vectors" / "wycheproof"

# Generous: ASan builds and a loaded 2-core CI machine are slow, a hang is still caught.
TIMEOUT = float(os.environ.get("KEYX_TEST_TIMEOUT", "60"))

SANITIZER_MARKERS = (
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
    "UndefinedBehaviorSanitizer",
    "WARNING: ThreadSanitizer",
    "ERROR: ThreadSanitizer",
)

# Reason strings of keyx's errors (provider/errors.c), as tests may match them.
KEYX_REASONS = (
    "invalid keyx configuration",
    "not supported by any configured keyx backend",
    "invalid peer public key",
    "peer key does not match the key's group",
    "key used up (ephemeral-max-uses reached)",
    "private key cannot leave its hardware backend",
    "backend operation failed",
    "backend unavailable",
    "missing key",
    "invalid argument",
    "re-entry into keyx from a backend refused",
    "internal error",
    "audit log error",
    "key exchange KDF error",
    "token login not tried: the token shows failed logins",
    "provider parameter buffer too small or of the wrong type",
    "PKCS#1 v1.5 decryption refused (padding oracle)",
    "key cannot be written: an ephemeral hardware key has no reference",
    "digest not supported for this key",
    "PKCS#11 module cannot be loaded",
    "token login failed",
    "TPM out of object memory",
    "the key does not allow this operation",
    "tpm2-abrmd unreachable after fork() from a process that used it",
)

# Every configuration key (docs/configuration.md) with its environment variable.
CONFIG_KEYS = {
    "backends": "KEYX_BACKENDS",
    "tpm-tcti": "KEYX_TPM_TCTI",
    "tpm-parent": "KEYX_TPM_PARENT",
    "pkcs11-module": "KEYX_PKCS11_MODULE",
    "pkcs11-token": "KEYX_PKCS11_TOKEN",
    "pkcs11-pin": "KEYX_PKCS11_PIN",
    "pkcs11-raw-rsa": "KEYX_PKCS11_RAW_RSA",
    "tpm-encrypt-sessions": "KEYX_TPM_ENCRYPT_SESSIONS",
    "tpm-timeout": "KEYX_TPM_TIMEOUT",
    "tpm-pool": "KEYX_TPM_POOL",
    "pkcs11-pool": "KEYX_PKCS11_POOL",
    "pkcs11-timeout": "KEYX_PKCS11_TIMEOUT",
    "audit-log": "KEYX_AUDIT_LOG",
    "ephemeral-max-uses": "KEYX_EPHEMERAL_MAX_USES",
    "debug": "KEYX_DEBUG",
}

# A 2048-bit safe prime (openssl dhparam 2048) with g = 2: DH with explicit p/g that is no
# named group, as a TLS 1.2 server may send.
EXPLICIT_DH_P = (
    "9EA0959C11C63000BB76EA887B70AD082A7A7A8B896B4DE9E7183C35AE2A128607D8682392DFBE2DF9FB33F1"
    "5141D6159A1059FC6371A82DACE20266E484ADF62C2868276699E0D0A25391E5C3BCC9CFD3AC559A20C429FC"
    "EE981134E7BA9264535866656FFE5FAC1F0C358C7A09D95D5BC6C65703270EBD30DB080CC5074DC2DA2AE099"
    "9287372AB06CA311013EB1218CC61D9C360CEDD9CBC3886BA81E462A282AF7FC7E166897DEF80F3A26CA040B"
    "9AB52ACA8E75644A8806C7CDF3505D8EF68A35ED23811216223E0F8A4627D19184817BB5A49830A800C3AB9B"
    "661769DDBC9720652318F05E66A9FB2AC4B5D5B96EA2C46081E93D696560786C7AA5C1DF"
)
EXPLICIT_DH_G = "02"
EXPLICIT_DH = f"explicit:{EXPLICIT_DH_P}:{EXPLICIT_DH_G}"


# A test CA must say it is one: since OpenSSL 3.2 `req -x509` writes X.509 v3 certificates, and
# a v3 issuer without basicConstraints CA:TRUE fails verification ("invalid CA certificate");
# Python 3.13's default (strict) verification also wants its key usage. digitalSignature: some
# tests' CAs are their servers' certificates too.
CA_EXTENSIONS = ("-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")


@functools.lru_cache(maxsize=None)
def openssl_version():
    """(major, minor, patch) of the openssl binary and libcrypto under test: for the few
    behaviours that differ between OpenSSL 3.0 and 3.5 by design (each caller says which)."""
    out = subprocess.run(["openssl", "version"], capture_output=True, text=True, timeout=30).stdout
    m = re.match(r"OpenSSL (\d+)\.(\d+)\.(\d+)", out)
    assert m, f"cannot read the OpenSSL version from {out!r}"
    return tuple(int(x) for x in m.groups())


def build_dir():
    """The build directory under test: $KEYX_BUILD_DIR (relative to the repo) or build/."""
    d = Path(os.environ.get("KEYX_BUILD_DIR", "build"))
    if not d.is_absolute():
        d = REPO / d
    return d.resolve()


def module_path():
    return build_dir() / "keyx.so"


def copies_for_another_user(d, *files):
    """Copies of keyx.so and the given build files in d, readable by every user, and d's path
    made traversable: a test that runs a program as another user (nobody) cannot count on the
    build directory being readable to it (a CI clone may sit in a 0700 directory, and OpenSSL
    then runs without keyx, silently). Returns the copies' paths, keyx.so first."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    out = []
    for f in (module_path(), *files):
        dst = d / Path(f).name
        shutil.copy2(f, dst)
        os.chmod(dst, 0o755)
        out.append(dst)
    return out


def env_for_another_user(env, d):
    """env with its sanitizer suppressions file (TSan build) copied into d, where another user
    can read it: the sanitizer runtime stops the process when it cannot read the file."""
    env = dict(env)
    m = re.search(r"suppressions=([^:]*)", env.get("TSAN_OPTIONS", ""))
    if m:
        supp, = copies_for_another_user(d, m.group(1))[1:]
        env["TSAN_OPTIONS"] = env["TSAN_OPTIONS"].replace(m.group(0), f"suppressions={supp}")
    return env


def derive_bin():
    return build_dir() / "tests" / "keyx-test-derive"


def project_version():
    m = re.search(r"project\(keyx\s+VERSION\s+([0-9.]+)", (REPO / "CMakeLists.txt").read_text())
    assert m, "cannot find the project version in CMakeLists.txt"
    return m.group(1)


def installed_files(modulesdir, prefix="/usr"):
    """The files keyx installs, absolute, the same set for `cmake --install --prefix PREFIX` and the
    Debian package (prefix /usr; dpkg adds its copyright and changelog and gzips the man page and
    the larger docs): keyx.so in OpenSSL's modules directory, keyx(7), the README, every doc and
    the example files."""
    doc = f"{prefix}/share/doc/keyx"
    files = {f"{modulesdir}/keyx.so", f"{prefix}/share/man/man7/keyx.7", f"{doc}/README.md"}
    files |= {f"{doc}/docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    files |= {f"{doc}/examples/{name}" for name in ("openssl.cnf", "nginx.conf", "state.c", "wrap.c")}
    return files


def openssl_modulesdir():
    """OpenSSL's modules directory, where keyx.so is installed (libcrypto's pkg-config file)."""
    out = subprocess.run(["pkg-config", "--variable=modulesdir", "libcrypto"], capture_output=True,
                         text=True, timeout=30).stdout.strip()
    assert out, "pkg-config knows no modulesdir for libcrypto"
    return out


@functools.lru_cache(maxsize=None)
def sanitizer_preload():
    """Sanitizer runtimes keyx.so needs (NEEDED entries found by ldd), '' when not sanitized."""
    so = module_path()
    if not so.exists():
        return ""
    out = subprocess.run(["ldd", str(so)], capture_output=True, text=True, timeout=30).stdout
    libs = []
    for name in ("libasan.so", "libubsan.so", "libtsan.so"):
        m = re.search(r"^\s*(" + re.escape(name) + r"\S*)\s+=>\s+(\S+)", out, re.M)
        if m:
            libs.append(m.group(2))
    return ":".join(libs)


def base_env(**extra):
    """Environment for a subprocess: no inherited KEYX_/OPENSSL_ settings, a neutral config."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KEYX_", "OPENSSL_", "SSL_CERT", "LD_PRELOAD", "ASAN_", "UBSAN_", "TSAN_"))
    }
    env["OPENSSL_CONF"] = str(neutral_cnf())
    preload = sanitizer_preload()
    if preload:
        env["LD_PRELOAD"] = preload
        # The openssl binary is not built with ASan: under it LeakSanitizer's exit-time scan is
        # unreliable (seen crashing in its tracer after TLS 1.2 handshakes), so leak checking is
        # off for openssl; run() turns it on for our own sanitized helper, which frees
        # everything, so keyx's leaks are still caught there. Every other ASan/UBSan finding
        # stops the process with exit code 99 and fails the test.
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1:exitcode=99"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=99"
        # ThreadSanitizer build (CI's TSan stage): a report stops the process, exit code 66.
        env["TSAN_OPTIONS"] = f"halt_on_error=1:exitcode=66:suppressions={REPO / 'tests' / 'tsan.supp'}"
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def plain_client_env(**extra):
    """base_env for a program that does not load keyx (a TLS client, Go's toolchain): without the
    sanitizer runtimes a sanitized keyx.so needs in the processes that load it."""
    return base_env(LD_PRELOAD=None, ASAN_OPTIONS=None, UBSAN_OPTIONS=None, TSAN_OPTIONS=None, **extra)


@functools.lru_cache(maxsize=None)
def neutral_cnf():
    """An empty openssl.cnf: only the default provider, whatever /etc/ssl/openssl.cnf says."""
    d = Path(os.environ.get("KEYX_TEST_TMP", "/tmp")) / f"keyx-tests-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    p = d / "neutral.cnf"
    p.write_text("# empty: default provider only\n")
    return p


class Result:
    def __init__(self, cmd, rc, out, err, pid, seconds):
        self.cmd, self.rc, self.out, self.err, self.pid, self.seconds = cmd, rc, out, err, pid, seconds

    def __repr__(self):
        return (
            f"$ {' '.join(map(str, self.cmd))}\n[exit {self.rc}, pid {self.pid}, "
            f"{self.seconds:.1f}s]\n--- stdout ---\n{_clip(self.out)}\n--- stderr ---\n{_clip(self.err)}"
        )

    def ok(self, what=""):
        assert self.rc == 0, f"{what or 'command'} failed:\n{self!r}"
        return self


def _clip(s, n=4000):
    if isinstance(s, bytes):
        s = s.decode("utf-8", "replace")
    return s if len(s) <= n else s[: n // 2] + "\n[...]\n" + s[-n // 2 :]


def run(cmd, env=None, input=None, timeout=TIMEOUT, cwd=None, text=True):
    """Runs cmd to completion; AssertionError on timeout (process group killed) or on a
    sanitizer report. Never raises for a non-zero exit: callers check rc."""
    cmd = [str(c) for c in cmd]
    if env is None:
        env = base_env()
    if cmd[0] == str(derive_bin()) and "ASAN_OPTIONS" in env:
        env = dict(env, ASAN_OPTIONS=env["ASAN_OPTIONS"].replace("detect_leaks=0", "detect_leaks=1"))
    start = time.monotonic()
    p = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        text=text,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(input if input is not None else ("" if text else b""), timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, err = p.communicate()
        raise AssertionError(
            f"timed out after {timeout}s (killed):\n{Result(cmd, None, out, err, p.pid, timeout)!r}"
        )
    r = Result(cmd, p.returncode, out, err, p.pid, time.monotonic() - start)
    check_sanitizer(r)
    return r


def kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        p.kill()


def check_sanitizer(r):
    err = r.err if isinstance(r.err, str) else r.err.decode("utf-8", "replace")
    for m in SANITIZER_MARKERS:
        assert m not in err, f"sanitizer report ({m}):\n{r!r}"


def openssl(*args, **kw):
    return run(["openssl", *args], **kw)


# ---- openssl.cnf ----------------------------------------------------------------------------


# What each backend serves for TLS (swtpm: the NIST curves; SoftHSM: those and finite-field DH;
# software: every group), in the order docs/tls-servers.md recommends: OpenSSL 3.5's default
# order, groups made in hardware first. (hybrid, group) pairs: 3.5 pairs a group with its ML-KEM
# hybrid in one '/' tuple; 3.0 knows neither hybrids nor tuples.
TLS_GROUP_ORDER = (("X25519MLKEM768", "X25519"), ("SecP256r1MLKEM768", "P-256"),
                   ("SecP384r1MLKEM1024", "P-384"), (None, "P-521"), (None, "X448"),
                   (None, "ffdhe2048:ffdhe3072"))
BACKEND_GROUPS = {
    "tpm": {"P-256", "P-384", "P-521"},
    "pkcs11": {"P-256", "P-384", "P-521", "ffdhe2048:ffdhe3072"},
    "software": {g for _, g in TLS_GROUP_ORDER},
}


def tls_groups(backends, version=None):
    """The openssl.cnf `Groups` line (system_default section) for these backends ("tpm,
    software") on this OpenSSL version: what docs/tls-servers.md tells operators to write, and
    what keyx's refusal of an unserved group suggests."""
    v35 = (version or openssl_version()) >= (3, 5)
    names = [b.strip() for b in backends.split(",") if b.strip()]
    hardware, software = [], []
    for hybrid, group in TLS_GROUP_ORDER:
        first = next((b for b in names if group in BACKEND_GROUPS[b]), None)
        if first is None:
            continue
        entry = f"{hybrid}:{group}" if v35 and hybrid else group
        (software if first == "software" else hardware).append(entry)
    return (" / " if v35 else ":").join(hardware + software)


def write_cnf(path, keyx=None, prefer=True, activate_keyx=True, default=True, diagnostics=True,
              module=None, groups=None):
    """Writes an openssl.cnf loading keyx (section keyx_sect with the given options) and the
    default provider; prefer: default_properties = ?provider=keyx. groups: the TLS `Groups` line
    of the system_default section, as docs/tls-servers.md has operators write it ("auto": the
    one for keyx["backends"], see tls_groups)."""
    lines = []
    if diagnostics:
        lines.append("config_diagnostics = 1")
    lines += ["openssl_conf = openssl_init", "", "[openssl_init]", "providers = provider_sect"]
    if groups == "auto":
        groups = tls_groups((keyx or {}).get("backends", "software"))
    if groups:
        lines.append("ssl_conf = ssl_sect")
    if prefer:
        lines.append("alg_section = algorithm_sect")
        lines += ["", "[algorithm_sect]", "default_properties = ?provider=keyx"]
    lines += ["", "[provider_sect]", "keyx = keyx_sect"]
    if default:
        lines.append("default = default_sect")
    lines += ["", "[keyx_sect]", f"module = {module or module_path()}"]
    if activate_keyx:
        lines.append("activate = 1")
    for k, v in (keyx or {}).items():
        lines.append(f"{k} = {v}")
    if default:
        lines += ["", "[default_sect]", "activate = 1"]
    if groups:
        lines += ["", "[ssl_sect]", "system_default = tls_sect", "", "[tls_sect]", f"Groups = {groups}"]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


# ---- audit log ------------------------------------------------------------------------------


def read_audit(path):
    """Parses the JSON-lines audit log; every line must be one complete JSON object."""
    path = Path(path)
    assert path.exists(), f"audit log {path} was not created"
    events = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            ev = json.loads(line)
        except ValueError as e:
            raise AssertionError(f"{path}:{n}: not a JSON line ({e}): {line!r}")
        assert isinstance(ev, dict), f"{path}:{n}: not an object: {line!r}"
        events.append(ev)
    return events


AUDIT_FIELDS = {"ts", "pid", "event", "ok"}
AUDIT_EVENTS = {"keygen", "load", "derive", "free", "release", "error", "decrypt", "sign", "encrypt",
                "encapsulate", "decapsulate", "failover"}


def check_audit_schema(events):
    """Fields and types of the audit format (docs/guide.md, "Audit log and debug trace")."""
    for ev in events:
        missing = AUDIT_FIELDS - ev.keys()
        assert not missing, f"audit event lacks {sorted(missing)}: {ev}"
        assert ev["event"] in AUDIT_EVENTS, f"unknown audit event: {ev}"
        assert isinstance(ev["pid"], int), f"pid not a number: {ev}"
        assert isinstance(ev["ok"], bool), f"ok not a boolean: {ev}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", str(ev["ts"])), f"bad ts: {ev}"
        if "key" in ev:
            assert re.fullmatch(r"[0-9a-f]{16}", str(ev["key"])), f"bad key id: {ev}"
        if "ephemeral" in ev:
            assert isinstance(ev["ephemeral"], bool), f"ephemeral not a boolean: {ev}"
        if not ev["ok"]:
            assert ev.get("error"), f"failed event without an error text: {ev}"


def key_id(encoded_pub_hex):
    import hashlib

    return hashlib.sha256(bytes.fromhex(encoded_pub_hex)).hexdigest()[:16]


def secret_forms(hexstr):
    """The ways a secret could be written into a text log: hex lower/upper, base64."""
    forms = {hexstr.lower(), hexstr.upper()}
    raw = bytes.fromhex(hexstr)
    forms.add(base64.b64encode(raw).decode())
    return {f for f in forms if len(f) >= 16}


def assert_no_secrets(text, secrets, where):
    """None of the secrets (hex strings) appears in text, in any of secret_forms."""
    for s in secrets:
        s = s.strip()
        if not s or s == "-":
            continue
        for f in secret_forms(s):
            assert f not in text, f"{where} contains a secret or private key ({f[:16]}...)"


# ---- the derive driver (tests/helpers/derive.c) ---------------------------------------------


class Outcome:
    """One vector's result: ok with secret, or err with the failing stage and error text."""

    def __init__(self, vid, line):
        self.id, self.line = vid, line
        parts = line.split(" ", 2)
        assert len(parts) >= 2 and parts[1] in ("ok", "err"), f"bad driver output line: {line!r}"
        self.ok = parts[1] == "ok"
        rest = parts[2] if len(parts) > 2 else ""
        self.secret = rest if self.ok else None
        self.stage, _, self.error = (None, "", "") if self.ok else rest.partition(":")
        self.error = self.error.strip()

    @property
    def by_keyx(self):
        """The error was raised by keyx itself (library name keyx, or one of its reasons)."""
        return " keyx:" in f" {self.error}" or any(r in self.error for r in KEYX_REASONS)

    def __repr__(self):
        return self.line


def driver_cmd(provider="keyx", peer_provider=None, dh_pad=None, config=None, backend=None):
    cmd = [derive_bin(), "--module", build_dir(), "--provider", provider]
    if config:
        cmd += ["--config", config]
    if backend:
        cmd += ["--backend", backend]
    if peer_provider:
        cmd += ["--peer-provider", peer_provider]
    if dh_pad is not None:
        cmd += ["--dh-pad", str(dh_pad)]
    return cmd


def derive(vectors, provider="keyx", peer_provider=None, dh_pad=None, env=None, config=None,
           timeout=TIMEOUT, backend=None):
    """Runs vectors (tuples id, alg, group, priv, form, peer) through the driver; returns
    {id: Outcome} and the Result. Every vector must be answered exactly once. backend: the keyx
    backend private keys are imported into (--backend), else software."""
    text = "".join(" ".join(str(f) if str(f) else "-" for f in v) + "\n" for v in vectors)
    r = run(driver_cmd(provider, peer_provider, dh_pad, config, backend), input=text, env=env,
            timeout=timeout)
    assert r.rc == 0, f"driver failed:\n{r!r}"
    got = {}
    for line in r.out.splitlines():
        vid = line.split(" ", 1)[0]
        assert vid not in got, f"vector {vid} answered twice:\n{r!r}"
        got[vid] = Outcome(vid, line)
    want = [str(v[0]) for v in vectors]
    missing = [v for v in want if v not in got]
    assert not missing, f"driver did not answer {len(missing)} vectors ({missing[:5]}...):\n{r!r}"
    assert len(got) == len(want), f"driver answered {len(got)} lines for {len(want)} vectors"
    return got, r


def derive_twice(config, uri, group, env):
    """The EC key at uri loaded twice in one process, the first copy freed, a derive with the
    second (keyx-test-derive twice). Asserts the secret equals the default provider's from the
    peer's side; returns the Result."""
    r = run([derive_bin(), "--config", config, "twice", uri, group], env=env)
    lines = dict(line.split(" ", 1) for line in r.out.splitlines() if " " in line)
    assert r.rc == 0 and lines.get("1", "").startswith("ok "), f"derive after a second load failed:\n{r!r}"
    want, _ = derive([("x", "EC", group, lines["peer"], "raw", lines["pub"])], provider="default")
    assert want["x"].ok and lines["1"][3:] == want["x"].secret, f"wrong secret:\n{r!r}"
    return r


def pair(alg, group, zero=False, env=None):
    """Two key pairs made by the default provider and their secret (see derive.c, mode pair)."""
    cmd = [derive_bin(), "--provider", "default", "pair", alg, group] + (["zero"] if zero else [])
    r = run(cmd, env=env, timeout=max(TIMEOUT, 120)).ok(f"pair {alg} {group}")
    keys = {}
    for line in r.out.splitlines():
        tag, *fields = line.split(" ")
        if tag in ("A", "B"):
            keys[tag] = dict(zip(("priv", "pub", "spki"), fields))
        elif tag == "S":
            keys["S"] = fields[0]
    assert set(keys) == {"A", "B", "S"}, f"bad pair output:\n{r!r}"
    return keys


def dh_params(group):
    """(p, q, g) as ints of a named DH group, from the default provider."""
    r = run([derive_bin(), "--provider", "default", "params", group]).ok(f"params {group}")
    p, q, g = (int(x, 16) for x in r.out.split())
    return p, q, g


# ---- s_client output -----------------------------------------------------------------------


def temp_key(client_output):
    """The peer's key share s_client describes (group / key exchange), or ''. OpenSSL 3.0 prints
    'Server Temp Key: ECDH, prime256v1, 256 bits', 3.5 'Peer Temp Key: ...', and for a KEM group,
    which has no peer key, only 'Negotiated TLS1.3 group: X25519MLKEM768' (see negotiated_group)."""
    m = re.search(r"^(?:Server|Peer) Temp Key: (.*)$", client_output, re.M)
    return m.group(1).strip() if m else ""


def negotiated_group(client_output):
    """The TLS 1.3 group s_client names on OpenSSL >= 3.2 ('Negotiated TLS1.3 group: ...'), or ''."""
    m = re.search(r"^Negotiated TLS1\.3 group: (.*)$", client_output, re.M)
    return m.group(1).strip() if m else ""


def peer_signature(client_output):
    """The kind of the server's handshake signature s_client reports: 'ECDSA', 'RSA-PSS' or 'RSA'
    (PKCS#1 v1.5), or ''. OpenSSL 3.0 prints those words, 3.5 the TLS scheme's name
    (ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256)."""
    m = re.search(r"^Peer signature type: (\S+)$", client_output, re.M)
    if not m:
        return ""
    t = m.group(1)
    for prefix, kind in (("ecdsa_", "ECDSA"), ("rsa_pss_", "RSA-PSS"), ("rsa_pkcs1_", "RSA")):
        if t.startswith(prefix):
            return kind
    return t


def server_errors(server_output):
    """s_server's error lines, less those of a client that closed without close_notify, as
    s_time does: 'unexpected eof' (3.0 and 3.5), and on 3.5 also the failed write of the
    session ticket to the closed socket ('Broken pipe', tls_retry_write_records)."""
    return [l for l in server_output.splitlines()
            if ":error:" in l and "unexpected eof" not in l and "tls_retry_write_records" not in l]


def protocol(client_output):
    """The negotiated protocol from s_client's 'New, TLSv1.3, Cipher is ...' line, or ''."""
    m = re.search(r"^New, (TLSv1\.\d), Cipher is (\S+)", client_output, re.M)
    return m.group(1) if m else ""


def cipher(client_output):
    m = re.search(r"^New, (TLSv1\.\d), Cipher is (\S+)", client_output, re.M)
    return m.group(2) if m else ""


# ---- TLS in one Python process ----------------------------------------------------------------

# Source for test scripts run by python3: memory_handshake(srv, cli) makes one TLS handshake
# between two ssl.SSLContexts through memory BIOs (no sockets) and returns the version.
MEMORY_HANDSHAKE = r"""
import ssl


def memory_handshake(srv, cli):
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s = srv.wrap_bio(bios[0], bios[1], server_side=True)
    c = cli.wrap_bio(bios[2], bios[3], server_hostname="localhost")
    done = [False, False]
    for _ in range(20):
        for i, (obj, outb, peer_in) in enumerate(((c, bios[3], bios[0]), (s, bios[1], bios[2]))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(outb.read())
        if all(done):
            return c.version()
    raise SystemExit("handshake did not finish")
"""


# Source for test scripts that call libcrypto through ctypes: fn(name, restype, *argtypes), a
# library context loaded from an openssl.cnf (LIB_new, LIB_load, LIB_free), file BIOs and
# PEM_read_bio_PrivateKey_ex (read_pem).
LIBCRYPTO_CTYPES = r"""
import ctypes, sys
from ctypes import c_void_p, c_char_p, c_int, c_size_t, byref, POINTER
L = ctypes.CDLL("libcrypto.so.3")
def fn(name, res, *args):
    f = getattr(L, name); f.restype = res; f.argtypes = list(args); return f
# libcrypto's error queue to the process's stderr (ERR_print_errors_fp takes a FILE *, never NULL)
_stderr = c_void_p.in_dll(ctypes.CDLL(None), "stderr")
_print_errors_fp = fn("ERR_print_errors_fp", None, c_void_p)
def print_errors():
    sys.stderr.flush(); _print_errors_fp(_stderr)
LIB_new = fn("OSSL_LIB_CTX_new", c_void_p)
LIB_load = fn("OSSL_LIB_CTX_load_config", c_int, c_void_p, c_char_p)
LIB_free = fn("OSSL_LIB_CTX_free", None, c_void_p)
bio_file = fn("BIO_new_file", c_void_p, c_char_p, c_char_p)
bio_free = fn("BIO_free", c_int, c_void_p)
read_pem = fn("PEM_read_bio_PrivateKey_ex", c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_char_p)
CTX_name = fn("EVP_PKEY_CTX_new_from_name", c_void_p, c_void_p, c_char_p, c_char_p)
CTX_pkey = fn("EVP_PKEY_CTX_new_from_pkey", c_void_p, c_void_p, c_void_p, c_char_p)
CTX_free = fn("EVP_PKEY_CTX_free", None, c_void_p)
kg_init = fn("EVP_PKEY_keygen_init", c_int, c_void_p)
set_group = fn("EVP_PKEY_CTX_set_group_name", c_int, c_void_p, c_char_p)
generate = fn("EVP_PKEY_generate", c_int, c_void_p, POINTER(c_void_p))
d_init = fn("EVP_PKEY_derive_init", c_int, c_void_p)
d_peer = fn("EVP_PKEY_derive_set_peer", c_int, c_void_p, c_void_p)
d_derive = fn("EVP_PKEY_derive", c_int, c_void_p, c_char_p, POINTER(c_size_t))
pkey_free = fn("EVP_PKEY_free", None, c_void_p)
get_prov = fn("EVP_PKEY_get0_provider", c_void_p, c_void_p)
prov_name = fn("OSSL_PROVIDER_get0_name", c_char_p, c_void_p)
i2d = fn("i2d_PUBKEY", c_int, c_void_p, POINTER(ctypes.POINTER(ctypes.c_ubyte)))
d2i = fn("d2i_PUBKEY_ex", c_void_p, c_void_p, POINTER(ctypes.POINTER(ctypes.c_ubyte)), ctypes.c_long, c_void_p, c_char_p)
ossl_free = fn("CRYPTO_free", None, c_void_p, c_char_p, c_int)
# The public half of key as a default-provider key in ctx (the script's library context; keyx
# exports public parts only).
def public_copy(key):
    buf = ctypes.POINTER(ctypes.c_ubyte)()
    n = i2d(key, byref(buf))
    if n <= 0: return None
    p = ctypes.cast(buf, ctypes.POINTER(ctypes.c_ubyte))
    out = d2i(None, byref(p), n, ctx, b"provider=default")
    ossl_free(buf, None, 0)
    return out
"""

# An application making a key in keyx on the domain parameters of a file, through the API:
# `openssl genpkey -paramfile` cannot, as it decodes the file into the default provider, whose
# key generation knows no keyx-label. argv: algorithm (DH, DHX), parameter file, keyx-label, key
# file out (a key reference for a token key), public key out (PEM). keyx from OPENSSL_CONF.
KEY_ON_PARAMS_APP = LIBCRYPTO_CTYPES + r"""
todata = fn("EVP_PKEY_todata", c_int, c_void_p, c_int, POINTER(c_void_p))
fromdata_init = fn("EVP_PKEY_fromdata_init", c_int, c_void_p)
fromdata = fn("EVP_PKEY_fromdata", c_int, c_void_p, POINTER(c_void_p), c_int, c_void_p)
read_params = fn("PEM_read_bio_Parameters_ex", c_void_p, c_void_p, c_void_p, c_void_p, c_char_p)
bld_new = fn("OSSL_PARAM_BLD_new", c_void_p)
push_str = fn("OSSL_PARAM_BLD_push_utf8_string", c_int, c_void_p, c_char_p, c_char_p, c_size_t)
to_param = fn("OSSL_PARAM_BLD_to_param", c_void_p, c_void_p)
set_params = fn("EVP_PKEY_CTX_set_params", c_int, c_void_p, c_void_p)
write_key = fn("PEM_write_bio_PrivateKey", c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_int,
               c_void_p, c_void_p)
write_pub = fn("PEM_write_bio_PUBKEY", c_int, c_void_p, c_void_p)
ALL_PARAMETERS = 0x84
alg, paramfile, label, key_out, pub_out = sys.argv[1:6]
b = bio_file(paramfile.encode(), b"r")
params = b and read_params(b, None, None, b"provider=default")
data, dom, key = c_void_p(), c_void_p(), c_void_p()
ctx = CTX_name(None, alg.encode(), b"provider=keyx")
ok = bool(params) and todata(params, ALL_PARAMETERS, byref(data)) == 1 and bool(ctx) and \
    fromdata_init(ctx) == 1 and fromdata(ctx, byref(dom), ALL_PARAMETERS, data) == 1
lab = label.encode()  # the builder keeps the pointer until to_param: keep the bytes alive
bl = bld_new(); push_str(bl, b"keyx-label", lab, 0)
gctx = ok and CTX_pkey(None, dom, b"provider=keyx")
ok = ok and bool(gctx) and kg_init(gctx) == 1 and set_params(gctx, to_param(bl)) == 1 and \
    generate(gctx, byref(key)) == 1
for path, write in ((key_out, lambda o: write_key(o, key, None, None, 0, None, None)),
                    (pub_out, lambda o: write_pub(o, key))):
    if ok:
        o = bio_file(path.encode(), b"w"); ok = bool(o) and write(o) == 1; bio_free(o)
if not ok:
    print_errors(); sys.exit(1)
print("generated")
"""
