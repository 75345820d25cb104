# shellcheck shell=bash
# Sourced by scripts/lib.sh: runs a command of this repository inside a Debian root of another
# release (trixie: OpenSSL 3.5), so that both OpenSSL versions are tested on one machine.
#
# The root is made once with debootstrap from the Debian archive this machine's apt already uses,
# kept in $KEYX_DEBIAN_ROOTS/SUITE (default build-debian/ in the repo, which git ignores) and reused.
# For each run /proc, /dev and the repository (at the same path) are mounted into it, and
# unmounted after, whatever the command's outcome. Inside, the command installs the packages it
# needs from that release as it does here. Root only (debootstrap, mount, chroot).

KEYX_DEBIAN_ROOTS=${KEYX_DEBIAN_ROOTS:-$KEYX_ROOT/build-debian}
# Clean roots (tests/test_debian_package.py): one minimal root per release, nothing of keyx's build
# or tests in it, into a throwaway overlay of which the test installs keyx's .deb. Made once,
# never changed after. keyx_debian_run mounts this directory into the test root at the same path,
# so that the trixie stage's clean root is kept here too.
KEYX_CLEAN_ROOTS=${KEYX_CLEAN_ROOTS:-/var/cache/keyx/clean-roots}

# keyx_debian_mirror: the Debian archive's URI in this machine's apt sources (deb822 or one-line).
keyx_debian_mirror() {
    local f uri=
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }' "$f")
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\/.*\/debian\/?$/) { print $i; exit } }')
    fi
    [ -n "$uri" ] || keyx_die "no Debian archive in this machine's apt sources: set KEYX_DEBIAN_MIRROR"
    printf '%s\n' "${uri%/}"
}

# keyx_debian_make_root SUITE DIR [PACKAGES]: debootstrap into DIR.tmp (minbase, and PACKAGES:
# comma-separated), then move it into place, so that an interrupted build is never taken for a
# finished root.
keyx_debian_make_root() {
    local suite=$1 dir=$2 include=${3:-} mirror
    mirror=${KEYX_DEBIAN_MIRROR:-$(keyx_debian_mirror)}
    keyx_install_deps debootstrap
    keyx_say "making a Debian $suite root in $dir (debootstrap from $mirror)" >&2
    rm -rf "$dir.tmp"
    mkdir -p "$(dirname "$dir")"
    debootstrap --variant=minbase ${include:+--include="$include"} "$suite" "$dir.tmp" "$mirror" \
        >"$dir.log" 2>&1 ||
        keyx_die "debootstrap $suite failed: see $dir.log"
    # The release, its updates and its security fixes, from the same archive.
    {
        printf 'deb %s %s main\n' "$mirror" "$suite" "$mirror" "$suite-updates"
        printf 'deb %s-security %s-security main\n' "$mirror" "$suite"
    } >"$dir.tmp/etc/apt/sources.list"
    # Packages installed in the root must not start their services (nginx, dbus) on this machine.
    printf '#!/bin/sh\nexit 101\n' >"$dir.tmp/usr/sbin/policy-rc.d"
    chmod 755 "$dir.tmp/usr/sbin/policy-rc.d"
    mv "$dir.tmp" "$dir"
}

# keyx_debian_unmount DIR: ends what still runs in the root (a leftover swtpm would hold its
# mounts), then unmounts what keyx_debian_run mounted, innermost first.
keyx_debian_unmount() {
    local dir=$1 p m
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/root" 2>/dev/null)" = "$dir" ] && kill -9 "${p#/proc/}" 2>/dev/null
    done
    for m in "$dir$KEYX_CLEAN_ROOTS" "$dir$KEYX_ROOT" "$dir/dev" "$dir/proc"; do
        mountpoint -q "$m" && { umount -R "$m" 2>/dev/null || umount -R -l "$m"; }
    done
    return 0
}

# keyx_debian_run SUITE COMMAND...: runs COMMAND (a path relative to the repository, and its
# arguments) inside the SUITE root, in the repository, as root. One run per root at a time.
keyx_debian_run() {
    local suite=$1 dir rc=0
    shift
    [ "$(id -u)" -eq 0 ] || keyx_die "--debian needs root (debootstrap, mount and chroot)"
    case $suite in '' | *[!a-z]*) keyx_die "--debian takes a Debian release name, e.g. trixie" ;; esac
    dir=$(keyx_abs "$KEYX_DEBIAN_ROOTS")/$suite
    [ -x "$dir/bin/bash" ] || keyx_debian_make_root "$suite" "$dir"
    exec 9>"$dir.lock"
    flock -w 3600 9 || keyx_die "another run holds the $suite root ($dir.lock)"
    cp /etc/resolv.conf "$dir/etc/resolv.conf" 2>/dev/null || true
    mkdir -p "$dir$KEYX_ROOT"
    keyx_debian_unmount "$dir" # what a killed run left mounted
    trap 'keyx_debian_unmount "$dir"' EXIT
    trap 'exit 143' TERM
    trap 'exit 130' INT
    mount -t proc proc "$dir/proc"
    mount --rbind /dev "$dir/dev"
    mount --make-rslave "$dir/dev"
    mount --bind "$KEYX_ROOT" "$dir$KEYX_ROOT"
    case $KEYX_CLEAN_ROOTS in
    "$KEYX_ROOT"/*) ;; # in the repository, mounted already
    /*)
        mkdir -p "$KEYX_CLEAN_ROOTS" "$dir$KEYX_CLEAN_ROOTS"
        mount --bind "$KEYX_CLEAN_ROOTS" "$dir$KEYX_CLEAN_ROOTS"
        ;;
    *) keyx_die "KEYX_CLEAN_ROOTS must be an absolute path" ;;
    esac
    keyx_say "running $* in the Debian $suite root ($dir)" >&2
    chroot "$dir" /usr/bin/env -u TMPDIR HOME=/root \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        /bin/bash -c 'cd "$1" && shift && exec "$@"' keyx "$KEYX_ROOT" "$@" || rc=$?
    keyx_debian_unmount "$dir"
    trap - EXIT TERM INT
    return "$rc"
}

# keyx_debian_clean_root SUITE: prints the path of the clean SUITE root, made first when there is
# none (debootstrap minbase with openssl and man-db, which the package test runs there; its
# progress goes to stderr). Root only.
keyx_debian_clean_root() {
    local suite=$1 dir
    [ "$(id -u)" -eq 0 ] || keyx_die "a clean Debian root needs root (debootstrap, mount and chroot)"
    case $suite in '' | *[!a-z]*) keyx_die "keyx_debian_clean_root takes a Debian release name" ;; esac
    dir=$KEYX_CLEAN_ROOTS/$suite
    mkdir -p "$KEYX_CLEAN_ROOTS"
    (
        flock -w 1800 9 || keyx_die "another run is making $dir ($dir.lock)"
        [ -x "$dir/usr/bin/openssl" ] || keyx_debian_make_root "$suite" "$dir" openssl,man-db >&2
    ) 9>"$dir.lock" || exit
    printf '%s\n' "$dir"
}

# keyx_debian_rerun SCRIPT ARGS...: when ARGS start with "--debian SUITE", runs SCRIPT with the
# other arguments inside that root, its builds in $BUILD_DIR-SUITE (build-trixie/) and
# build-fuzz-SUITE/ beside this machine's own, and exits with its status; otherwise returns.
keyx_debian_rerun() {
    local script=$1 suite
    shift
    [ "${1:-}" = --debian ] || return 0
    [ $# -ge 2 ] || keyx_die "usage: $script --debian SUITE [args]"
    suite=$2
    shift 2
    case ${BUILD_DIR:-build} in /*) keyx_die "with --debian, BUILD_DIR must be inside the repository" ;; esac
    BUILD_DIR=${BUILD_DIR:-build}-$suite KEYX_FUZZ_DIR=build-fuzz-$suite \
        keyx_debian_run "$suite" "$script" "$@"
    exit
}
