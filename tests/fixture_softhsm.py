"""SoftHSM2 tokens in a temporary directory, for the PKCS#11 backend tests.

`softhsm` (session scope) initializes two tokens, "keyx-a" and "keyx-b" (user PIN in a file),
and puts a static P-256 key pair "srv-ecdh" (CKA_ID 01, derive allowed) on keyx-a with
pkcs11-tool, as an operator would. Everything runs on the real SoftHSM2 module; when SoftHSM2 or
pkcs11-tool is missing the tests fail (scripts/test.sh installs them).
"""

import re
import shutil
from pathlib import Path

import pytest

import kxutil

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
SPY = Path("/usr/lib/x86_64-linux-gnu/pkcs11-spy.so")  # OpenSC's call logger, a PKCS#11 module
PIN, SO_PIN = "kxpin-5824", "kxso-9173"
TOKENS = ("keyx-a", "keyx-b")


class SoftHSM:
    def __init__(self, root):
        self.root = Path(root)
        self.tokendir = self.root / "tokens"
        self.conf = self.root / "softhsm2.conf"
        self.pin_file = self.root / "pin"
        self.module = MODULE
        self.slots = {}  # label -> slot id (pkcs11-tool --slot)

    def env(self, **extra):
        """base_env plus SOFTHSM2_CONF pointing at this token directory."""
        return kxutil.base_env(SOFTHSM2_CONF=self.conf, **extra)

    def tool_env(self):
        """For softhsm2-util and pkcs11-tool: no sanitizer runtime preloaded (they are not
        keyx, and ASan finds bugs of their own, e.g. a use-after-free in pkcs11-tool 0.23)."""
        return self.env(LD_PRELOAD=None, ASAN_OPTIONS=None, UBSAN_OPTIONS=None)

    def spy_env(self, log, **extra):
        """env() for a process whose pkcs11-module is OpenSC's pkcs11-spy (logging every call
        into log, then calling SoftHSM). The spy leaks 16 bytes per load: LeakSanitizer is told
        so, keyx's own leaks are still reported."""
        supp = self.root / "lsan-spy.supp"
        supp.write_text("leak:pkcs11-spy.so\n")
        return self.env(PKCS11SPY=self.module, PKCS11SPY_OUTPUT=log, LSAN_OPTIONS=f"suppressions={supp}", **extra)

    def init_tokens(self, *labels):
        """A new token directory with these empty tokens (user PIN in pin_file); the setups of the
        test files' own token directories start here."""
        self.tokendir.mkdir(parents=True)
        self.conf.write_text(f"directories.tokendir = {self.tokendir}\n"
                             "objectstore.backend = file\nlog.level = ERROR\n")
        self.pin_file.write_text(PIN)
        self.pin_file.chmod(0o600)
        for label in labels:
            r = kxutil.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                            "--pin", PIN, "--so-pin", SO_PIN], env=self.tool_env()).ok("init token")
            m = re.search(r"reassigned to slot (\d+)", r.out + r.err)
            assert m, f"softhsm2-util did not say which slot {label} got:\n{r!r}"
            self.slots[label] = int(m.group(1))
        return self

    def setup(self):
        self.init_tokens(*TOKENS)
        self.tool("keyx-a", "--keypairgen", "--key-type", "EC:prime256v1", "--label", "srv-ecdh",
                  "--id", "01", "--usage-derive").ok("static key")
        return self

    def tool(self, label, *args, login=True, **kw):
        """pkcs11-tool on token `label`, by slot (its --token-label matches prefixes)."""
        cmd = ["pkcs11-tool", "--module", self.module, "--slot", str(self.slots[label])]
        if login:
            cmd += ["--login", "--pin", PIN]
        return kxutil.run(cmd + list(args), env=self.tool_env(), **kw)

    def token_objects(self, label):
        """Labels of the objects stored on the token (another process never sees our session
        objects, so this counts what an ephemeral key would have left behind)."""
        r = self.tool(label, "--list-objects").ok("list objects")
        return re.findall(r"^(?:Private|Public|Secret) Key Object.*$|^Data object.*$|^Certificate Object.*$",
                          r.out, re.M)

    def keyx_settings(self, tokens=("keyx-a",), backends="pkcs11", **more):
        """The keyx section of an openssl.cnf that uses these tokens."""
        s = {
            "backends": backends,
            "pkcs11-module": self.module,
            "pkcs11-token": " ".join(f"pkcs11:token={t}" for t in tokens),
            "pkcs11-pin": f"file:{self.pin_file}",
        }
        s.update(more)
        return s


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory, build):
    for tool in ("softhsm2-util", "pkcs11-tool"):
        assert shutil.which(tool), f"{tool} not found: install softhsm2 and opensc (scripts/test.sh does)"
    assert MODULE.exists(), f"SoftHSM2 module {MODULE} not found: install softhsm2"
    assert SPY.exists(), f"{SPY} not found: install opensc"
    return SoftHSM(tmp_path_factory.mktemp("softhsm")).setup()
