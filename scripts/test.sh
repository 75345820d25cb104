#!/usr/bin/env bash
# Installs missing Debian packages, builds keyx and its test helpers, runs the whole test suite.
# Exits non-zero on any failure. Extra arguments go to pytest (e.g. -k tls).
#   BUILD_DIR=build-asan KEYX_SANITIZE=address,undefined scripts/test.sh   # sanitizer build
#   scripts/test.sh --debian trixie [pytest args]   # the same inside a Debian 13 root (OpenSSL 3.5)
# With --debian, the build goes to $BUILD_DIR-SUITE (build-trixie/) and the fuzz targets to
# build-fuzz-SUITE/, beside this machine's own builds (scripts/debian_root.sh makes the root).
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

keyx_debian_rerun scripts/test.sh "$@"

keyx_install_deps "${KEYX_PACKAGES[@]}"
build=$(keyx_abs "${BUILD_DIR:-build}")
keyx_build "$build"
keyx_build_fuzz

keyx_say "running the test suite against $build"
cd "$KEYX_ROOT"
start=$SECONDS
status=0
KEYX_BUILD_DIR=$build /usr/bin/python3 -m pytest tests -q -ra -p no:cacheprovider "$@" </dev/null || status=$?
keyx_say "test suite finished in $((SECONDS - start))s with status $status"
exit "$status"
