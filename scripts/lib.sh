# shellcheck shell=bash
# Shared by scripts/test.sh and scripts/demo.sh: installs missing Debian packages and builds keyx.
# Source it; it sets KEYX_ROOT and defines keyx_* functions.

KEYX_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Debian packages, on bookworm and trixie alike, in three lists: what the demo needs, what building
# keyx's .deb and trying it in a clean root adds, and what the test suite adds to both.
# The demo (scripts/demo.sh): building keyx.so (the TPM and PKCS#11 libraries it links), the
# openssl tool, python3, swtpm, SoftHSM2, pkcs11-tool (opensc) and tpm2_getcap (tpm2-tools).
KEYX_DEMO_PACKAGES=(cmake gcc libc6-dev make pkg-config libssl-dev libtss2-dev libp11-kit-dev
    openssl python3 swtpm softhsm2 opensc tpm2-tools)
# The Debian package (debian/, tests/test_debian_package.py): dpkg-buildpackage with debhelper
# (and build-essential, which it requires of every build), lintian, and debootstrap for the clean
# root the package is installed into.
KEYX_PACKAGING_PACKAGES=(build-essential dpkg-dev debhelper fakeroot lintian debootstrap)
# The test suite (scripts/test.sh): all of the above, and the real swtpm tools, p11-kit's proxy
# module, p11-kit's server (a remote token) and the peer tools the tests drive; for the TLS server tests nginx, curl, and tpm2-abrmd
# (its TCTI, a private dbus-daemon); clang and its libFuzzer runtime for the fuzz targets
# (tests/fuzz/); valgrind for tests/test_valgrind.py; Go for a crypto/tls client
# (tests/test_tls_groups.py); python3-pytest.
KEYX_PACKAGES=("${KEYX_DEMO_PACKAGES[@]}" "${KEYX_PACKAGING_PACKAGES[@]}" python3-pytest
    p11-kit-modules p11-kit swtpm-tools tpm2-openssl libengine-pkcs11-openssl
    nginx curl tpm2-abrmd libtss2-tcti-tabrmd0 dbus-daemon
    clang libclang-rt-dev valgrind golang-go)

keyx_say() {
    printf '\n==> %s\n' "$*"
}

keyx_die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

keyx_installed() {
    dpkg -s "$1" 2>/dev/null | grep -q '^Status: install ok installed'
}

# keyx_install_deps PKG...: installs those not installed yet; apt-get update once, only if needed.
keyx_install_deps() {
    local missing=() pkg sudo=()
    for pkg in "$@"; do
        keyx_installed "$pkg" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || keyx_die "missing packages ${missing[*]} and no apt-get (Debian bookworm or trixie expected)"
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || keyx_die "missing packages ${missing[*]}: run as root or install sudo"
        sudo=(sudo)
    fi
    keyx_say "installing ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" </dev/null
}

# keyx_build DIR [TARGET...]: configures and builds keyx.so and the test helpers (or only the
# TARGETs, e.g. keyx) into DIR (relative to the repo root unless absolute). $KEYX_SANITIZE (e.g.
# address,undefined) selects a sanitizer build.
keyx_build() {
    local dir=$1 targets=()
    shift
    [ $# -eq 0 ] || targets=(--target "$@")
    keyx_say "building keyx in $dir${KEYX_SANITIZE:+ (sanitizers: $KEYX_SANITIZE)}"
    cmake -S "$KEYX_ROOT" -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DKEYX_SANITIZE="${KEYX_SANITIZE:-}" >/dev/null
    cmake --build "$dir" -j "$(nproc 2>/dev/null || echo 2)" "${targets[@]}"
    [ -f "$dir/keyx.so" ] || keyx_die "the build left no $dir/keyx.so"
}

# keyx_build_fuzz: the libFuzzer targets of tests/fuzz/ in $KEYX_FUZZ_DIR (default build-fuzz/,
# shared by CI's stages on one OpenSSL version), with clang. Without clang it says so and builds nothing: tests/test_fuzz.py
# then fails, naming what is missing.
keyx_build_fuzz() {
    local dir
    dir=$(keyx_abs "${KEYX_FUZZ_DIR:-build-fuzz}")
    if ! command -v clang >/dev/null; then
        printf 'warning: no clang: the fuzz targets are not built (tests/test_fuzz.py will fail)\n' >&2
        return 0
    fi
    keyx_say "building the fuzz targets in $dir (clang, libFuzzer, ASan+UBSan)"
    cmake -S "$KEYX_ROOT" -B "$dir" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DKEYX_FUZZ=ON -DKEYX_SANITIZE= -DKEYX_BUILD_TESTS=OFF -DKEYX_BUILD_EXAMPLES=OFF >/dev/null
    cmake --build "$dir" --target keyx-fuzzers -j "$(nproc 2>/dev/null || echo 2)"
}

# keyx_tls_groups BACKENDS: the openssl.cnf `Groups` line (system_default section) for one of the
# backend sets of docs/tls-servers.md ("tpm", "pkcs11", "software"), for the installed OpenSSL:
# 3.5 pairs each group with its hybrid ML-KEM group in a '/' tuple, 3.0 knows neither.
keyx_tls_groups() {
    local v35=0
    case $(openssl version) in "OpenSSL 3."[0-4]"."*) ;; *) v35=1 ;; esac
    case $v35,$1 in
    1,tpm) echo "SecP256r1MLKEM768:P-256 / SecP384r1MLKEM1024:P-384 / P-521" ;;
    1,pkcs11) echo "SecP256r1MLKEM768:P-256 / SecP384r1MLKEM1024:P-384 / P-521 / ffdhe2048:ffdhe3072" ;;
    1,software) echo "X25519MLKEM768:X25519 / SecP256r1MLKEM768:P-256 / SecP384r1MLKEM1024:P-384 / P-521 / X448 / ffdhe2048:ffdhe3072" ;;
    0,tpm) echo "P-256:P-384:P-521" ;;
    0,pkcs11) echo "P-256:P-384:P-521:ffdhe2048:ffdhe3072" ;;
    0,software) echo "X25519:P-256:P-384:P-521:X448:ffdhe2048:ffdhe3072" ;;
    *) keyx_die "keyx_tls_groups: no Groups line for backends '$1'" ;;
    esac
}

# keyx_abs PATH: PATH made absolute against the repo root.
keyx_abs() {
    case $1 in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$KEYX_ROOT/$1" ;;
    esac
}

# shellcheck source=scripts/debian_root.sh
. "$KEYX_ROOT/scripts/debian_root.sh"
