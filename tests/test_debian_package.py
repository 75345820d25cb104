"""keyx's Debian package (debian/), built as Debian builds it and installed as a user installs it,
on the release the suite runs on (bookworm: OpenSSL 3.0 on the host; trixie: 3.5 in CI's Debian
13 root). dpkg-buildpackage -us -uc -b builds it from a copy of the source without build
directories; lintian finds no error or warning; the .deb holds exactly the files `cmake --install`
puts in place (kxutil.installed_files; tests/test_provider.py checks the CMake side) plus dpkg's
copyright and changelog. Then apt installs it in a clean root of the same release (debootstrap
minbase with openssl and man-db, made once by scripts/debian_root.sh and used through a throwaway
overlay), where `openssl list -providers -provider keyx` shows keyx active, a key made through it
is in its audit log, `man -w keyx` finds keyx(7), the docs and examples are in /usr/share/doc/keyx,
and `dpkg -r keyx` removes every file it installed. Needs root (mount, chroot) and the Debian
archive. CI's sanitizer stages deselect it (marker `package`): it does not use their build.
"""

import contextlib
import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import kxutil
from kxutil import run

pytestmark = pytest.mark.package

VERSION = kxutil.project_version()
ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
DEB = f"keyx_{VERSION}_{ARCH}.deb"
BUILD_TIMEOUT = 900
APT_TIMEOUT = 600


def host_env(**extra):
    """The machine's environment without the suite's KEYX_/OPENSSL_ settings and sanitizer
    runtimes: dpkg-buildpackage, lintian and apt run as a user runs them. Where the clean roots
    are (and the archive they come from) stays as the caller set it."""
    env = kxutil.plain_client_env(OPENSSL_CONF=None, **extra)
    for var in ("KEYX_CLEAN_ROOTS", "KEYX_DEBIAN_MIRROR"):
        if var in os.environ:
            env[var] = os.environ[var]
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def suite():
    """The Debian release this runs on (VERSION_CODENAME of /etc/os-release)."""
    m = re.search(r"^VERSION_CODENAME=(\w+)$", Path("/etc/os-release").read_text(), re.M)
    assert m, "no VERSION_CODENAME in /etc/os-release"
    return m.group(1)


def clean_copy(dst):
    """The repository's files without build output (build*/, obj-*/, git's data, Python caches)."""
    def ignore(d, names):
        top = Path(d) == kxutil.REPO
        return [n for n in names
                if (top and n.startswith(("build", ".git", "obj-")))
                or n in ("__pycache__", ".pytest_cache") or n.endswith(".pyc")]
    shutil.copytree(kxutil.REPO, dst, ignore=ignore, symlinks=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The directory holding the .deb, .changes and .buildinfo of one dpkg-buildpackage run."""
    out = tmp_path_factory.mktemp("deb")
    clean_copy(out / "keyx")
    env = host_env(DEB_BUILD_OPTIONS=f"parallel={os.cpu_count() or 2}")
    r = run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=out / "keyx", env=env, timeout=BUILD_TIMEOUT)
    assert r.rc == 0, f"dpkg-buildpackage failed:\n{r!r}"
    assert (out / DEB).is_file(), f"dpkg-buildpackage made no {DEB}: {sorted(os.listdir(out))}\n{r!r}"
    return out


def deb_files(deb):
    """The regular files of a .deb, absolute paths."""
    r = run(["dpkg-deb", "--fsys-tarfile", deb], env=host_env(), text=False, timeout=60).ok("dpkg-deb")
    listing = subprocess.run(["tar", "-tvf", "-"], input=r.out, capture_output=True, timeout=60, check=True)
    files = set()
    for line in listing.stdout.decode().splitlines():
        if line.startswith("-"):
            files.add(line.split(None, 5)[5].removeprefix("."))
    return files


def test_version_matches_cmake():
    first = (kxutil.REPO / "debian" / "changelog").read_text().splitlines()[0]
    m = re.match(r"keyx \(([^)]+)\) ", first)
    assert m and m.group(1) == VERSION, (
        f"debian/changelog's version ({first}) is not CMakeLists.txt's project version {VERSION}: "
        f"the package is native, so they are the same")


def test_package_files(built):
    files = deb_files(built / DEB)
    doc = "/usr/share/doc/keyx"
    assert f"{doc}/copyright" in files and f"{doc}/changelog.gz" in files, sorted(files)
    shipped = {f.removesuffix(".gz") for f in files} - {f"{doc}/copyright", f"{doc}/changelog"}
    expected = kxutil.installed_files(kxutil.openssl_modulesdir())
    assert shipped == expected, (f"the .deb lacks {sorted(expected - shipped)} and has "
                                 f"{sorted(shipped - expected)} that cmake --install does not install")
    assert "/usr/share/man/man7/keyx.7.gz" in files, "keyx(7) is not compressed as Debian wants it"


def test_package_depends_on_shlibs(built):
    r = run(["dpkg-deb", "-f", built / DEB, "Depends"], env=host_env(), timeout=60).ok("dpkg-deb -f")
    for lib in ("libssl3", "libtss2-esys", "libp11-kit0", "libc6"):
        assert lib in r.out, f"the .deb's Depends ({r.out.strip()}) lacks {lib}: ${{shlibs:Depends}}"


def test_lintian_clean(built):
    changes = built / f"keyx_{VERSION}_{ARCH}.changes"
    r = run(["lintian", "--fail-on", "error,warning", "--display-info", changes], env=host_env(),
            timeout=600)
    assert r.rc == 0, f"lintian reports errors or warnings:\n{r!r}"
    assert not re.search(r"^[EW]: ", r.out, re.M), r


@contextlib.contextmanager
def overlay_root(tmp):
    """A throwaway root: the clean root of this release under an overlay in tmp, with /proc,
    /dev and resolv.conf for apt; unmounted after, whatever happened."""
    r = run(["bash", "-c", '. scripts/lib.sh && keyx_debian_clean_root "$1"', "keyx", suite()],
            cwd=kxutil.REPO, env=host_env(), timeout=1800)
    assert r.rc == 0, f"no clean {suite()} root:\n{r!r}"
    lower = r.out.strip().splitlines()[-1]
    root, upper, work = tmp / "root", tmp / "upper", tmp / "work"
    for d in (root, upper, work):
        d.mkdir()
    mounts = []

    def mount(*args, target):
        run(["mount", *args, target], env=host_env(), timeout=60).ok(f"mount {target}")
        mounts.append(target)

    try:
        mount("-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
              target=root)
        mount("-t", "proc", "proc", target=root / "proc")
        mount("--rbind", "/dev", target=root / "dev")
        run(["mount", "--make-rslave", root / "dev"], env=host_env(), timeout=60).ok()
        shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
        yield root
    finally:
        for p in Path("/proc").iterdir():  # whatever still runs in the root holds its mounts
            try:
                if p.name.isdigit() and os.readlink(p / "root") == str(root):
                    os.kill(int(p.name), 9)
            except OSError:
                pass
        for target in reversed(mounts):
            if subprocess.run(["umount", "-R", target], capture_output=True).returncode:
                subprocess.run(["umount", "-R", "-l", target], capture_output=True)


def in_root(root, script, timeout=120):
    """Runs a shell script in the root, as root, with a plain environment."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8",
           "DEBIAN_FRONTEND": "noninteractive"}
    return run(["chroot", root, "/bin/sh", "-ec", script], env=env, timeout=timeout)


def test_install_in_clean_root(built, tmp):
    assert os.geteuid() == 0, "installing the package in a clean Debian root needs root (mount, chroot)"
    with overlay_root(tmp) as root:
        shutil.copy(built / DEB, root / "tmp" / DEB)
        r = in_root(root, "dpkg -s keyx >/dev/null 2>&1 && exit 1; "
                          "! ls /usr/share/doc | grep -E 'libtss2|libp11-kit-dev|cmake'")
        assert r.rc == 0, f"the clean root is not clean (keyx or build packages in it):\n{r!r}"
        # As a user installs a downloaded .deb: apt resolves ${shlibs:Depends} from the archive.
        r = in_root(root, f"apt-get update -qq && apt-get install -y -q /tmp/{DEB}", timeout=APT_TIMEOUT)
        assert r.rc == 0, f"apt-get install ./{DEB} failed in a clean {suite()} root:\n{r!r}"

        r = in_root(root, "openssl list -providers -verbose -provider keyx").ok("openssl list")
        assert re.search(r"^  keyx\n(    .*\n)*?    status: active$", r.out, re.M), (
            f"keyx is not active in the clean root:\n{r!r}")
        # keyx serves: a key made through it is in its audit log.
        r = in_root(root, "KEYX_AUDIT_LOG=/tmp/audit.jsonl openssl genpkey -provider keyx -provider default "
                          "-propquery provider=keyx -algorithm X25519 -out /tmp/k.pem && cat /tmp/audit.jsonl")
        assert r.rc == 0 and '"event":"keygen"' in r.out and '"alg":"X25519"' in r.out, r

        r = in_root(root, "man -w keyx").ok("man -w keyx")
        assert r.out.strip() == "/usr/share/man/man7/keyx.7.gz", r
        r = in_root(root, "zcat /usr/share/man/man7/keyx.7.gz").ok()
        assert r.out == (kxutil.REPO / "docs" / "keyx.7").read_text(), "the installed keyx(7) is not docs/keyx.7"
        cnf = (root / "usr/share/doc/keyx/examples/openssl.cnf").read_text()
        assert cnf == (kxutil.REPO / "examples" / "openssl.cnf").read_text()
        with gzip.open(root / "usr/share/doc/keyx/docs/guide.md.gz", "rt") as f:
            assert f.read() == (kxutil.REPO / "docs" / "guide.md").read_text()
        assert "no-license-stated" in (root / "usr/share/doc/keyx/copyright").read_text()

        listed = in_root(root, "dpkg -L keyx").ok("dpkg -L keyx").out.split()
        files = [f for f in listed if (root / f.lstrip("/")).is_file()]
        assert f"{kxutil.openssl_modulesdir()}/keyx.so" in files, listed
        r = in_root(root, "dpkg -r keyx").ok("dpkg -r keyx")
        left = [f for f in listed if (root / f.lstrip("/")).exists() and (
            not (root / f.lstrip("/")).is_dir() or "keyx" in f)]
        assert not left, f"dpkg -r keyx left {left}:\n{r!r}"
        r = in_root(root, "dpkg-query -W -f '${db:Status-Abbrev}' keyx || true")
        assert not r.out.startswith("ii"), f"keyx still installed after dpkg -r: {r.out}"
        r = in_root(root, "openssl list -providers -provider keyx")
        assert r.rc != 0, f"OpenSSL still loads keyx after dpkg -r:\n{r!r}"
