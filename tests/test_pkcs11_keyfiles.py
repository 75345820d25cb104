"""Token keys made by keyx (openssl genpkey -pkeyopt keyx-label:/keyx-id:), their locators and
the listing of a token's keys (issue 6, PKCS#11 side).

Everything runs on a SoftHSM2 token of this module's own ("keyx-kf", in its own token
directory), so the session fixture's tokens keyx-a/keyx-b, whose objects other tests count, are
never touched. Secrets are cross-checked against the default provider (peer side, with the public
key pkcs11-tool reads from the token) and, for EC, against libp11's engine on the same token key;
object attributes against pkcs11-tool's listing.
"""

import re
import shutil
from pathlib import Path

import pytest

import kxutil
from fixture_softhsm import MODULE, PIN, SO_PIN, SoftHSM

TOKEN = "keyx-kf"


class OwnToken(SoftHSM):
    """A SoftHSM2 token directory with the single token keyx-kf and nothing on it."""

    def setup(self):
        self.tokendir.mkdir(parents=True)
        self.conf.write_text(f"directories.tokendir = {self.tokendir}\n"
                             "objectstore.backend = file\nlog.level = ERROR\n")
        self.pin_file.write_text(PIN)
        self.pin_file.chmod(0o600)
        r = kxutil.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN,
                        "--pin", PIN, "--so-pin", SO_PIN], env=self.tool_env()).ok("init token")
        m = re.search(r"reassigned to slot (\d+)", r.out + r.err)
        assert m, f"softhsm2-util did not say which slot {TOKEN} got:\n{r!r}"
        self.slots[TOKEN] = int(m.group(1))
        return self

    def serial(self):
        r = kxutil.run(["softhsm2-util", "--show-slots"], env=self.tool_env()).ok("show slots")
        block = next(b for b in r.out.split("\nSlot ") if re.search(rf"Label:[ \t]+{TOKEN}\b", b))
        return re.search(r"Serial number:[ \t]+(\S+)", block).group(1)


@pytest.fixture(scope="module")
def hsm(tmp_path_factory, build):
    for tool in ("softhsm2-util", "pkcs11-tool"):
        assert shutil.which(tool), f"{tool} not found: install softhsm2 and opensc (scripts/test.sh does)"
    assert MODULE.exists(), f"SoftHSM2 module {MODULE} not found: install softhsm2"
    return OwnToken(tmp_path_factory.mktemp("softhsm-kf")).setup()


def keyx_env(hsm, cnf, tmp):
    log = tmp / "audit.jsonl"
    settings = hsm.keyx_settings(tokens=(TOKEN,), **{"audit-log": log})
    return hsm.env(OPENSSL_CONF=cnf(keyx=settings)), log


def objects(hsm):
    """pkcs11-tool --list-objects, parsed: one dict per object (kind, label, id, usage, access)."""
    r = hsm.tool(TOKEN, "--list-objects").ok("list objects")
    out = []
    for block in re.split(r"\n(?=\S)", r.out):
        m = re.match(r"(Private Key|Public Key|Secret Key|Data|Certificate) Object", block)
        if not m:
            continue
        o = {"kind": m.group(1)}
        for key in ("label", "ID", "Usage", "Access"):
            mm = re.search(rf"^\s+{key}:\s*(.*)$", block, re.M)
            o[key.lower()] = mm.group(1).strip() if mm else ""
        out.append(o)
    return out


def check_error(r, *needles):
    text = r.out + r.err
    assert r.rc not in (0, -11, -6) and r.rc > 0, f"expected a clean failure:\n{r!r}"
    for n in needles:
        assert n in text, f"error does not say {n!r}:\n{r!r}"
    assert PIN not in text, f"the PIN appears in the output:\n{r!r}"


def genpkey(env, alg, label=None, key_id=None, *opts, out=None):
    args = ["genpkey", "-algorithm", alg, *opts]
    if label is not None:
        args += ["-pkeyopt", f"keyx-label:{label}"]
    if key_id is not None:
        args += ["-pkeyopt", f"keyx-id:{key_id}"]
    if out is not None:
        args += ["-out", out]
    return kxutil.openssl(*args, env=env)


def token_uri(label=None, key_id=None):
    uri = f"pkcs11:token={TOKEN}"
    if key_id is not None:
        uri += ";id=" + "".join(f"%{key_id[i:i + 2]}" for i in range(0, len(key_id), 2))
    if label is not None:
        uri += f";object={label}"
    return uri + ";type=private"


def peer_side(tmp, alg, hsm, key_id, name):
    """The default provider's half of an exchange with the token key: a peer key on the token
    key's domain (pkcs11-tool reads the public key), the peer's public key, and the secret the
    default provider derives from the peer's private key and the token key's public key."""
    env = kxutil.base_env()
    tokpub = tmp / f"{name}-tok.der"
    hsm.tool(TOKEN, "--read-object", "--type", "pubkey", "--id", key_id, "-o", tokpub).ok("read pubkey")
    params, key, pub, secret = (tmp / f"{name}-{x}" for x in ("params.pem", "peer.pem", "peer.pub", "peer.bin"))
    if alg == "EC":
        kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", key, env=env).ok("peer")
    else:  # DH: the peer's parameters are the token key's (its SPKI carries p and g)
        kxutil.openssl("pkey", "-pubin", "-inform", "DER", "-in", tokpub, "-out", tmp / f"{name}-tok.pem",
                       env=env).ok("tok pem")
        kxutil.openssl("pkeyparam", "-in", tmp / f"{name}-tok.pem", "-out", params, env=env).ok("params")
        kxutil.openssl("genpkey", "-paramfile", params, "-out", key, env=env).ok("peer")
    kxutil.openssl("pkey", "-in", key, "-pubout", "-out", pub, env=env).ok("peer pub")
    kxutil.openssl("pkeyutl", "-derive", "-inkey", key, "-peerkey", tokpub, "-peerform", "DER",
                   "-out", secret, env=env).ok("peer derive")
    return pub, secret.read_bytes(), tokpub


def test_smoke(hsm, cnf, tmp):
    env, log = keyx_env(hsm, cnf, tmp)
    r = kxutil.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-pkeyopt", "keyx-label:srv",
                       "-pkeyopt", "keyx-id:01", env=env)
    print(r)
    print(hsm.tool(TOKEN, "--list-objects").out)
    print(objects(hsm))
    r = kxutil.openssl("genpkey", "-algorithm", "DH", "-pkeyopt", "group:ffdhe2048", "-pkeyopt", "keyx-label:dh", env=env)
    print(r)
    print(hsm.tool(TOKEN, "--list-objects").out)
    print(hsm.tool(TOKEN, "--read-object", "--type", "pubkey", "--label", "dh", "-o", tmp / "dh.der"))
    print(kxutil.openssl("storeutl", "-keys", "pkcs11:token=keyx-kf", env=env))
    print(kxutil.openssl("pkey", "-in", "pkcs11:token=keyx-kf;object=srv", "-text_pub", "-noout", env=env))
    print(hsm.serial())
    assert 0
