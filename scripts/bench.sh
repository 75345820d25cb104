#!/usr/bin/env bash
# Benchmark keyx on this machine (method and latest results: docs/performance.md).
#   1. installs missing Debian packages and builds keyx and bench/keyx-bench (RelWithDebInfo);
#   2. makes a throwaway SoftHSM2 token with a static P-256 key (label bench-ecdh) and an RSA-2048
#      decrypt key (label bench-rsa, for the RSA-OAEP decrypt rows);
#      with p11-kit >= 0.25 (Debian 13; 0.24's RPC carries no ECDH: one line says so, no remote
#      rows) `p11-kit server -f` exports that token on a unix socket in the temp dir: keyx-bench's
#      keyx-pkcs11-remote rows (keyx with pkcs11-module = p11-kit-client.so, otherwise the pkcs11
#      configuration) and raw-pkcs11-remote rows (raw Cryptoki over the same RPC), with ratios
#      keyx-remote / raw-remote and remote / local, and a keyx-pkcs11-remote TLS server (ECDHE on
#      the remote token) beside keyx-pkcs11;
#   3. starts swtpm with a persistent P-256 key (0x81000002) and RSA-2048 key (0x81000004);
#      runs keyx-bench: keyx software, pkcs11 and tpm beside the default provider and beside raw
#      Cryptoki and raw ESYS calls, one process, interleaved rounds, medians, ratios, scaling on 2 threads,
#      Cryptoki calls per operation, memory growth;
#   4. a second keyx-bench run with the pool configurations (tpm-pool = 4, pkcs11-pool = 8):
#      keygen+derive of keyx-pkcs11-pool and keyx-tpm-pool beside that run's raw rows;
#   5. TLS 1.3 handshakes per second (P-256 ECDHE, ECDSA P-256 server certificate) with
#      `openssl s_time -new` against an `openssl s_server` using the default provider, keyx
#      software, keyx pkcs11 (ECDHE on the token: default_properties = ?provider=keyx) and keyx
#      tpm (ECDHE in swtpm; target 5x tpm2-openssl's 63/s), each hardware one also with its pool
#      and with the certificate key in the hardware (+certkey: keyx reference file, certificate
#      issued by the default provider);
#   6. removes the token, swtpm, configs and servers it made.
#   7. on OpenSSL 3.5, the hybrid ML-KEM groups too: SecP256r1MLKEM768 with its EC half in the TPM
#      and on the token beside keyx's P-256 rows, keyx-software's X25519MLKEM768 beside the
#      default provider's, and the TPM's own ceiling in the same run (raw ESYS keygen+ECDH_ZGen).
#   8. on OpenSSL >= 3.2 (the Debian 13 root), HPKE open (keyx-bench op hpke-open) in the main run:
#      the default provider's, keyx software's, the token's bench-ecdh and the TPM's 0x81000002 key,
#      beside the raw static derives of the same keys (its floor); select them with
#      --only 'hpke-open|^raw-pkcs11/P-256/static-derive$|^raw-esys(-sess)?/P-256/derive$'.
# Extra arguments go to keyx-bench (e.g. --rounds 3 --seconds 0.5 --only 'pkcs11', --json); --only
# applies to the main run (the tpm2-openssl, pool and command-count runs keep their own cells).
#   scripts/bench.sh --debian trixie [args]   # the same on OpenSSL 3.5, in the Debian 13 root
# With --json, stdout is one JSON object {"bench": <keyx-bench JSON>, "pools": <keyx-bench JSON of
# the pool run>, "tls": [...]}.
#   BENCH_TLS_SECONDS=5    seconds per s_time run (0: no TLS figures)
#   BENCH_TLS_ONLY=REGEX   only the TLS servers whose name matches (and default, the /default base),
#                          e.g. '^keyx-pkcs11(-remote)?$'
#   BENCH_TLS_ROUNDS=5     interleaved TLS rounds (every server once per round); the figure is the
#                          median of a server's rounds, with their min-max
#   BUILD_DIR=build        build directory (relative to the repo root unless absolute)
#   SOFTHSM2_MODULE=/usr/lib/softhsm/libsofthsm2.so
#   P11KIT_CLIENT=/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so
#
# TPM figures: bench_tpm_setup starts swtpm (free ports on 127.0.0.1), makes persistent P-256 and
# RSA-2048 keys with tpm2-tools, writes a keyx config with backends = tpm, appends keyx-bench's TPM arguments
# (--tpm-config, --tpm-tcti, --tpm-handle, --tpm-rsa-handle) to BENCH_ARGS and "keyx-tpm <cnf>" to TLS_CONFIGS;
# cleanup stops swtpm. The TLS keyx-tpm server does P-256 ECDHE fully in the TPM.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

keyx_debian_rerun scripts/bench.sh "$@"

tls_seconds=${BENCH_TLS_SECONDS:-5}
tls_rounds=${BENCH_TLS_ROUNDS:-5}
case $tls_rounds in '' | *[!0-9]* | 0) keyx_die "BENCH_TLS_ROUNDS must be a positive integer" ;; esac
module=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
# tpm2-openssl's provider (Debian package tpm2-openssl), in OpenSSL's module directory
TPM2_OPENSSL_MODULE=${TPM2_OPENSSL_MODULE:-$(openssl version -m | sed 's/^MODULESDIR: "\(.*\)"$/\1/')/tpm2.so}
json=0
for a in "$@"; do
    [ "$a" = --json ] && json=1
done
# Chatter goes to stderr so that stdout holds only the results (pure JSON with --json).
say() { keyx_say "$@" >&2; }

keyx_install_deps "${KEYX_PACKAGES[@]}" >&2
build=$(keyx_abs "${BUILD_DIR:-build}")
keyx_build "$build" >&2
bench_bin=$build/bench/keyx-bench
[ -x "$bench_bin" ] || keyx_die "the build left no $bench_bin"
[ -f "$module" ] || keyx_die "SoftHSM2 module $module not found (package softhsm2)"

work=$(mktemp -d "${TMPDIR:-/tmp}/keyx-bench.XXXXXX")
CLEANUP_PIDS=()
# process groups: a server and what it forked (p11-kit server's p11-kit-remote per connection)
CLEANUP_GROUPS=()
cleanup() {
    local pid
    for pid in "${CLEANUP_GROUPS[@]}"; do
        kill -- "-$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for pid in "${CLEANUP_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
unset OPENSSL_MODULES OPENSSL_CONF KEYX_BACKENDS KEYX_AUDIT_LOG KEYX_DEBUG KEYX_EPHEMERAL_MAX_USES \
    KEYX_PKCS11_MODULE KEYX_PKCS11_TOKEN KEYX_PKCS11_PIN KEYX_PKCS11_POOL KEYX_TPM_POOL

# ---- SoftHSM2 token --------------------------------------------------------------------------
token=keyx-bench
mkdir "$work/tokens"
cat >"$work/softhsm2.conf" <<EOF
directories.tokendir = $work/tokens
objectstore.backend = file
log.level = ERROR
EOF
export SOFTHSM2_CONF=$work/softhsm2.conf
pin=$(openssl rand -hex 8)
so_pin=$(openssl rand -hex 8)
(umask 077 && printf '%s' "$pin" >"$work/pin")
say "SoftHSM2 token '$token' in $work/tokens with a static P-256 key (bench-ecdh) and RSA-2048 (bench-rsa)"
softhsm2-util --init-token --free --label "$token" --so-pin "$so_pin" --pin "$pin" >/dev/null
pkcs11-tool --module "$module" --token-label "$token" --login --pin "$pin" \
    --keypairgen --key-type EC:prime256v1 --label bench-ecdh --id 01 --usage-derive >/dev/null
pkcs11-tool --module "$module" --token-label "$token" --login --pin "$pin" \
    --keypairgen --key-type rsa:2048 --label bench-rsa --id 02 --usage-decrypt >/dev/null
# certificate keys for the signature rows
pkcs11-tool --module "$module" --token-label "$token" --login --pin "$pin" \
    --keypairgen --key-type EC:prime256v1 --label bench-sign-ec --id 03 --usage-sign >/dev/null
pkcs11-tool --module "$module" --token-label "$token" --login --pin "$pin" \
    --keypairgen --key-type rsa:2048 --label bench-sign-rsa --id 04 --usage-sign >/dev/null
unset pin so_pin

# ---- keyx configurations ---------------------------------------------------------------------
# write_cnf FILE BACKEND-LINES...: keyx preferred, the default provider beside it.
write_cnf() {
    local file=$1 line
    shift
    {
        printf '%s\n' "openssl_conf = openssl_init" "" "[openssl_init]" "providers = provider_sect" \
            "alg_section = algorithm_sect" "" "[algorithm_sect]" "default_properties = ?provider=keyx" \
            "" "[provider_sect]" "keyx = keyx_sect" "default = default_sect" "" "[keyx_sect]" \
            "module = $build/keyx.so" "activate = 1"
        for line in "$@"; do
            printf '%s\n' "$line"
        done
        printf '%s\n' "" "[default_sect]" "activate = 1"
    } >"$file"
}
write_cnf "$work/software.cnf" "backends = software"
write_cnf "$work/pkcs11.cnf" "backends = pkcs11" "pkcs11-module = $module" \
    "pkcs11-token = pkcs11:token=$token" "pkcs11-pin = file:$work/pin" "pkcs11-raw-rsa = 1"
# The same with the background key pools (tpm-pool, pkcs11-pool; 0 = off): rows keyx-pkcs11-pool
# and keyx-tpm-pool. Until a pool is implemented they equal the plain rows.
write_cnf "$work/pkcs11-pool.cnf" "backends = pkcs11" "pkcs11-module = $module" \
    "pkcs11-token = pkcs11:token=$token" "pkcs11-pin = file:$work/pin" "pkcs11-raw-rsa = 1" \
    "pkcs11-pool = 8"
printf '# default provider only\n' >"$work/default.cnf"

# pkcs11-raw-rsa = 1: SoftHSM does OAEP natively only with SHA-1, so OAEP-SHA256 (the RSA rows) is
# CKM_RSA_X_509 + keyx's OAEP decoding; it changes nothing for EC.
# --threads 2: every cell also on two threads (the scaling figure); later arguments override.
BENCH_ARGS=(--software-config "$work/software.cnf" --pkcs11-config "$work/pkcs11.cnf"
    --pkcs11-module "$module" --pkcs11-token "$token" --pkcs11-pin-file "$work/pin"
    --pkcs11-key bench-ecdh --pkcs11-rsa-key bench-rsa --pkcs11-sign-key bench-sign-ec
    --pkcs11-sign-rsa-key bench-sign-rsa --threads 2)
# Pool rows: a second keyx-bench process with the pool configurations in place of the plain ones,
# keygen+derive beside the raw rows of that same run (two keyx instances on one swtpm without a
# resource manager would not fit its three transient slots).
POOL_ARGS=(--pkcs11-config "$work/pkcs11-pool.cnf" --pkcs11-module "$module"
    --pkcs11-token "$token" --pkcs11-pin-file "$work/pin" --pkcs11-key bench-ecdh)
# TLS servers: "name group cnf [cert key]"; without cert and key the default provider's ECDSA
# P-256 certificate key (ec.key) signs, with them a certificate key in the hardware (made below).
# The server and the client offer only that group.
TPM2O_ARGS=()
TLS_CONFIGS=("default P-256 $work/default.cnf" "keyx-software P-256 $work/software.cnf"
    "keyx-pkcs11 P-256 $work/pkcs11.cnf")

# ---- remote token: the same token behind p11-kit's RPC ---------------------------------------
# `p11-kit server` exports the bench token on a unix socket in $work; keyx reaches it through
# p11-kit's client module with a configuration identical to pkcs11.cnf but for pkcs11-module.
# keyx-bench gets the rows keyx-pkcs11-remote and raw-pkcs11-remote (raw Cryptoki on its own
# instance of the client module) beside the local ones, TLS a keyx-pkcs11-remote server (ECDHE
# on the remote token). The client reads the server's address (P11_KIT_SERVER_ADDRESS) in
# C_GetFunctionList: it is exported for every process from here on.
P11KIT_CLIENT=${P11KIT_CLIENT:-/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so}
bench_remote_setup() {
    local sock=$work/p11kit.sock pid
    command -v p11-kit >/dev/null || keyx_die "p11-kit not found (package p11-kit)"
    [ -f "$P11KIT_CLIENT" ] || keyx_die "$P11KIT_CLIENT not found (package p11-kit-modules)"
    # its own session and process group: cleanup stops the server and the p11-kit-remote
    # process it forks per connection together
    setsid p11-kit server -f --provider "$module" -n "$sock" "pkcs11:token=$token" \
        </dev/null >"$work/p11kit-server.log" 2>&1 &
    pid=$!
    CLEANUP_GROUPS+=("$pid")
    for _ in $(seq 100); do
        [ -S "$sock" ] && break
        kill -0 "$pid" 2>/dev/null || keyx_die "p11-kit server exited: $(cat "$work/p11kit-server.log")"
        sleep 0.1
    done
    [ -S "$sock" ] || keyx_die "p11-kit server made no socket in 10 s"
    export P11_KIT_SERVER_ADDRESS=unix:path=$sock
    say "p11-kit server (pid $pid) exports token '$token' on $sock: the remote-token rows"
    write_cnf "$work/pkcs11-remote.cnf" "backends = pkcs11" "pkcs11-module = $P11KIT_CLIENT" \
        "pkcs11-token = pkcs11:token=$token" "pkcs11-pin = file:$work/pin" "pkcs11-raw-rsa = 1"
    BENCH_ARGS+=(--pkcs11-remote-config "$work/pkcs11-remote.cnf" --pkcs11-remote-module "$P11KIT_CLIENT")
    TLS_CONFIGS+=("keyx-pkcs11-remote P-256 $work/pkcs11-remote.cnf")
}
# p11-kit's RPC carries CKM_ECDH1_DERIVE from 0.25 on (client and server; Debian 13)
p11kit_version=$(dpkg-query -W -f='${Version}' p11-kit-modules 2>/dev/null || true)
if dpkg --compare-versions "${p11kit_version:-0}" ge 0.25; then
    bench_remote_setup
else
    printf 'p11-kit %s: no remote-token rows (ECDH through p11-kit'\''s RPC needs p11-kit >= 0.25)\n' \
        "${p11kit_version:-(p11-kit-modules not installed)}" >&2
fi
TLS_CONFIGS+=("keyx-pkcs11-pool P-256 $work/pkcs11-pool.cnf")

# pkcs11-provider, the token's anchor (Debian 13's package; Debian 12 has none): its provider
# preferred, the same PIN, on a token of its own in a SoftHSM directory of its own, because it
# makes every handshake's key pair on the token and leaves it there (a pair per handshake).
P11PROV_MODULE=$(openssl version -m | sed 's/^MODULESDIR: "\(.*\)"$/\1/')/pkcs11.so
if ! keyx_installed pkcs11-provider && apt-cache show pkcs11-provider >/dev/null 2>&1; then
    keyx_install_deps pkcs11-provider >&2
fi
if [ -f "$P11PROV_MODULE" ]; then
    mkdir "$work/anchor-tokens"
    printf '%s\n' "directories.tokendir = $work/anchor-tokens" "objectstore.backend = file" "log.level = ERROR" \
        >"$work/anchor-softhsm2.conf"
    SOFTHSM2_CONF=$work/anchor-softhsm2.conf softhsm2-util --init-token --free --label keyx-bench-anchor \
        --so-pin "$(openssl rand -hex 8)" --pin "$(cat "$work/pin")" >/dev/null
    printf '%s\n' "openssl_conf = openssl_init" "" "[openssl_init]" "providers = provider_sect" \
        "alg_section = algorithm_sect" "" "[algorithm_sect]" "default_properties = ?provider=pkcs11" \
        "" "[provider_sect]" "pkcs11 = pkcs11_sect" "default = default_sect" "" "[pkcs11_sect]" \
        "module = $P11PROV_MODULE" "pkcs11-module-path = $module" "pkcs11-module-token-pin = file:$work/pin" \
        "activate = 1" "" "[default_sect]" "activate = 1" >"$work/pkcs11-provider.cnf"
    TLS_CONFIGS+=("pkcs11-provider P-256 $work/pkcs11-provider.cnf")
else
    say "pkcs11-provider not installed ($P11PROV_MODULE): no pkcs11-provider row"
fi

# ---- TPM: swtpm with a persistent P-256 key -----------------------------------------------------
# swtpm serves one connection and has 3 transient slots, no resource manager: keyx and the raw
# ESYS rows share it in one process (tpm2-tss's swtpm TCTI connects per command, so they take
# turns). The persistent key (0x81000002) is made with tpm2-tools, which leave objects loaded:
# every step is followed by a flush.
# Below the ephemeral port range: the TCTI's connection per command leaves thousands of client
# ports in TIME_WAIT.
free_port_pair() {
    python3 -c '
import random, socket
for _ in range(200):
    p = random.randrange(10000, 32000)
    try:
        s = socket.socket(); s.bind(("127.0.0.1", p)); s.close()
        t = socket.socket(); t.bind(("127.0.0.1", p + 1)); t.close(); print(p); break
    except OSError:
        pass'
}
bench_tpm_setup() {
    local port pid tools
    command -v swtpm >/dev/null || keyx_die "swtpm not found (packages swtpm swtpm-tools)"
    command -v tpm2_createprimary >/dev/null || keyx_die "tpm2-tools not found (package tpm2-tools)"
    port=$(free_port_pair)
    [ -n "$port" ] || keyx_die "no two consecutive free TCP ports on 127.0.0.1 for swtpm"
    mkdir "$work/tpm"
    swtpm socket --tpm2 --tpmstate "dir=$work/tpm" \
        --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
        --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
        --flags not-need-init,startup-clear --log "file=$work/swtpm.log" </dev/null >/dev/null 2>&1 &
    pid=$!
    CLEANUP_PIDS+=("$pid")
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$((port + 1))") 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || keyx_die "swtpm exited: $(cat "$work/swtpm.log" 2>/dev/null)"
        sleep 0.1
    done
    TPM_TCTI=swtpm:host=127.0.0.1,port=$port
    say "swtpm on 127.0.0.1:$port (state $work/tpm), persistent P-256 key 0x81000002, RSA-2048 0x81000004, P-256 sign key 0x81000003"
    tools() { TPM2TOOLS_TCTI=$TPM_TCTI "$@" >/dev/null 2>"$work/tpm2-tools.log" ||
        keyx_die "$1 failed: $(cat "$work/tpm2-tools.log")"; }
    tools tpm2_createprimary -C o -G ecc256 -c "$work/srk.ctx"
    tools tpm2_flushcontext -t
    tools tpm2_create -C "$work/srk.ctx" -G ecc256:null \
        -a 'decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda' \
        -u "$work/k.pub" -r "$work/k.priv"
    tools tpm2_flushcontext -t
    tools tpm2_load -C "$work/srk.ctx" -u "$work/k.pub" -r "$work/k.priv" -c "$work/k.ctx"
    tools tpm2_evictcontrol -C o -c "$work/k.ctx" 0x81000002
    tools tpm2_flushcontext -t
    # RSA-2048 decrypt key, scheme NULL (OAEP chosen per call), for the RSA-OAEP decrypt rows
    tools tpm2_create -C "$work/srk.ctx" -G rsa2048:null:null \
        -a 'decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda' \
        -u "$work/r.pub" -r "$work/r.priv"
    tools tpm2_flushcontext -t
    tools tpm2_load -C "$work/srk.ctx" -u "$work/r.pub" -r "$work/r.priv" -c "$work/r.ctx"
    tools tpm2_evictcontrol -C o -c "$work/r.ctx" 0x81000004
    tools tpm2_flushcontext -t
    # P-256 sign key, scheme NULL (ECDSA-SHA256 chosen per call), for the ecdsa-sign rows
    tools tpm2_create -C "$work/srk.ctx" -G ecc256:null \
        -a 'sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda' \
        -u "$work/s.pub" -r "$work/s.priv"
    tools tpm2_flushcontext -t
    tools tpm2_load -C "$work/srk.ctx" -u "$work/s.pub" -r "$work/s.priv" -c "$work/s.ctx"
    tools tpm2_evictcontrol -C o -c "$work/s.ctx" 0x81000003
    tools tpm2_flushcontext -t
    tools tpm2_flushcontext -l
    tools tpm2_flushcontext -s
    write_cnf "$work/tpm.cnf" "backends = tpm" "tpm-tcti = $TPM_TCTI"
    write_cnf "$work/tpm-pool.cnf" "backends = tpm" "tpm-tcti = $TPM_TCTI" "tpm-pool = 4"
    TPM_ARGS=(--tpm-config "$work/tpm.cnf" --tpm-tcti "$TPM_TCTI" --tpm-handle 0x81000002
        --tpm-rsa-handle 0x81000004 --tpm-sign-handle 0x81000003)
    BENCH_ARGS+=("${TPM_ARGS[@]}")
    POOL_ARGS+=(--tpm-config "$work/tpm-pool.cnf" --tpm-tcti "$TPM_TCTI" --tpm-handle 0x81000002)
    # tpm2-openssl (the TPM rows' point of comparison) on the same swtpm, its provider ("tpm2") preferred in its
    # own library context; its TCTI from TPM2OPENSSL_TCTI (it ignores a TCTI in its config
    # section). It cannot share one process with keyx-tpm: keyx holds its parent and a key (two of
    # swtpm's three transient slots) and tpm2-openssl's key generation needs two (a primary and the
    # key): Esys_Create fails with 0x902. So a third keyx-bench run: tpm2-openssl beside raw ESYS.
    if [ -f "$TPM2_OPENSSL_MODULE" ]; then
        printf '%s\n' "openssl_conf = openssl_init" "" "[openssl_init]" "providers = provider_sect" \
            "alg_section = algorithm_sect" "" "[algorithm_sect]" "default_properties = ?provider=tpm2" \
            "" "[provider_sect]" "tpm2 = tpm2_sect" "default = default_sect" "" "[tpm2_sect]" \
            "module = $TPM2_OPENSSL_MODULE" "activate = 1" "" "[default_sect]" "activate = 1" \
            >"$work/tpm2-openssl.cnf"
        export TPM2OPENSSL_TCTI=$TPM_TCTI
        TPM2O_ARGS=(--tpm-config "$work/tpm.cnf" --tpm-tcti "$TPM_TCTI" --tpm-handle 0x81000002
            --tpm2-openssl-config "$work/tpm2-openssl.cnf")
        TLS_CONFIGS+=("tpm2-openssl P-256 $work/tpm2-openssl.cnf")
    else
        say "tpm2-openssl not installed ($TPM2_OPENSSL_MODULE): no tpm2-openssl rows"
    fi
    TLS_CONFIGS+=("keyx-tpm P-256 $work/tpm.cnf" "keyx-tpm-pool P-256 $work/tpm-pool.cnf")
}
bench_tpm_setup

# ---- keyx-bench ------------------------------------------------------------------------------
say "keyx-bench ${BENCH_ARGS[*]} $*"
bench_out=$("$bench_bin" "${BENCH_ARGS[@]}" "$@") || keyx_die "keyx-bench failed"
[ "$json" = 1 ] || printf '%s\n' "$bench_out"

# ---- pools: keygen+derive with tpm-pool = 4 and pkcs11-pool = 8 (a separate process) ---------
# The user's --only does not apply here (the pool cells are fixed); rounds, seconds and --json do.
pool_extra=()
skip=0
for a in "$@"; do
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    case $a in
    --only | --threads | --mem-ops) skip=1 ;;
    *) pool_extra+=("$a") ;;
    esac
done
# ---- tpm2-openssl: derive and keygen+derive beside raw ESYS (a separate process) --------------
tpm2o_out=null
if [ ${#TPM2O_ARGS[@]} -gt 0 ]; then
    say "tpm2-openssl: keyx-bench ${TPM2O_ARGS[*]}"
    tpm2o_out=$("$bench_bin" "${TPM2O_ARGS[@]}" --mem-ops 0 --count-ops 0 "${pool_extra[@]}" \
        --only '^(tpm2-openssl|raw-esys)/P-256/(keygen\+)?derive$') ||
        keyx_die "keyx-bench (tpm2-openssl) failed"
    if [ "$json" != 1 ]; then
        printf '\ntpm2-openssl (a separate run, same swtpm: it and keyx-tpm do not fit its three transient\n'
        printf 'slots in one process), beside raw ESYS of that run\n'
        printf '%s\n' "$tpm2o_out" | sed 1d
    fi
fi

say "pools: keyx-bench ${POOL_ARGS[*]} (keygen+derive)"
pool_out=$("$bench_bin" "${POOL_ARGS[@]}" --mem-ops 0 --count-ops 0 "${pool_extra[@]}" \
    --only '^(keyx-pkcs11|raw-pkcs11|keyx-tpm|raw-esys-sess|raw-esys)/P-256/keygen\+derive$') ||
    keyx_die "keyx-bench (pools) failed"
if [ "$json" != 1 ]; then
    printf '\nPools (a separate run: tpm-pool = 4, pkcs11-pool = 8; keyx-pkcs11 and keyx-tpm below are\n'
    printf 'keyx-pkcs11-pool and keyx-tpm-pool, beside the raw rows of the same run)\n'
    printf '%s\n' "$pool_out" | sed 1d
fi

# ---- TPM commands per operation: untimed runs through keyx-bench's counting proxy -------------
# keyx-tpm and raw ESYS in one run, tpm2-openssl beside raw ESYS in another (slots, as above).
say "TPM commands per operation: keyx-bench --count-tpm"
json_flag=()
[ "$json" != 1 ] || json_flag=(--json)
count_args=(--count-tpm --count-ops 50 --peers 8 "${json_flag[@]}")
tpm_count_out=$("$bench_bin" "${TPM_ARGS[@]}" "${count_args[@]}" --only '^(keyx-tpm|raw-esys)') ||
    keyx_die "keyx-bench --count-tpm failed"
tpm2o_count_out=null
if [ ${#TPM2O_ARGS[@]} -gt 0 ]; then
    tpm2o_count_out=$("$bench_bin" "${TPM2O_ARGS[@]}" "${count_args[@]}" \
        --only '^tpm2-openssl/P-256/(keygen\+)?derive$') ||
        keyx_die "keyx-bench --count-tpm (tpm2-openssl) failed"
fi
if [ "$json" != 1 ]; then
    printf '\n%s\n' "$tpm_count_out"
    [ "$tpm2o_count_out" = null ] || printf '%s\n' "$tpm2o_count_out" | sed 1,2d
fi

# ---- TLS handshakes per second ---------------------------------------------------------------
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# is_anchor NAME: the other projects' servers, measured beside keyx's (their failure is a figure)
is_anchor() {
    [ "$1" = tpm2-openssl ] || [ "$1" = pkcs11-provider ]
}

# tls_rate NAME GROUP CNF [CERT KEY]: handshakes/s of s_time -new against an s_server configured
# by CNF, both offering only GROUP; prints "NAME CONNECTIONS SECONDS RATE". The client always runs
# with the default provider alone. Runs in a command substitution (a subshell): it stops its own
# server on every path.
tls_rate() {
    local name=$1 group=$2 cnf=$3 cert=${4:-$work/ec.crt} key=${5:-$work/ec.key} port pid='' n t0 t1 out
    trap '[ -z "$pid" ] || { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }' EXIT
    port=$(free_port)
    # tpm2-openssl's context refuses "-groups P-256" (SSL_CONF_cmd fails); the client offers
    # P-256 alone, so the server picks it anyway
    local groups=(-groups "$group")
    [ "$name" != tpm2-openssl ] || groups=()
    local envs=()
    [ "$name" != pkcs11-provider ] || envs=(SOFTHSM2_CONF="$work/anchor-softhsm2.conf")
    env "${envs[@]}" OPENSSL_CONF="$cnf" openssl s_server -accept "127.0.0.1:$port" -cert "$cert" \
        -key "$key" "${groups[@]}" -quiet </dev/null >"$work/s_server-$name.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        if ! kill -0 "$pid" 2>/dev/null; then
            is_anchor "$name" || keyx_die "s_server ($name) exited: $(cat "$work/s_server-$name.log")"
            say "  $name's s_server did not start: $(head -3 "$work/s_server-$name.log" | tr '\n' ' ')"
            pid=
            echo "$name 0 0.00 0.0"
            return 0
        fi
        sleep 0.1
    done
    t0=$(date +%s.%N)
    out=$(OPENSSL_CONF=$work/client-$group.cnf timeout $((tls_seconds + 60)) openssl s_time \
        -connect "127.0.0.1:$port" -new -time "$tls_seconds" 2>&1) || true
    t1=$(date +%s.%N)
    kill -0 "$pid" 2>/dev/null || is_anchor "$name" ||
        keyx_die "s_server ($name) died: $(cat "$work/s_server-$name.log")"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
    n=$(printf '%s\n' "$out" | sed -n 's/^\([0-9][0-9]*\) connections in [0-9]* real seconds.*/\1/p')
    if [ -z "$n" ] || [ "$n" -eq 0 ]; then
        # an anchor is not the subject: its failure is a figure (0), with the cause
        is_anchor "$name" || keyx_die "s_time against $name made no connection: $out"
        say "  $name: no handshake completed: $(tail -3 "$work/s_server-$name.log" | tr '\n' ' ')"
        n=0
    fi
    awk -v name="$name" -v n="$n" -v t0="$t0" -v t1="$t1" \
        'BEGIN { printf "%s %d %.2f %.1f\n", name, n, t1 - t0, n / (t1 - t0) }'
}

tls_rows=()
if [ "$tls_seconds" -gt 0 ]; then
    OPENSSL_CONF=$work/default.cnf openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -nodes -keyout "$work/ec.key" -out "$work/ec.crt" -subj /CN=localhost -days 2 2>/dev/null
    # On OpenSSL 3.5 the hybrid ML-KEM groups beside their classical rows: the default
    # provider's hybrid, its classical half in keyx's backend (docs/tls-servers.md)
    if [ "$(openssl version | awk '{ split($2, v, "."); print (v[1] > 3 || (v[1] == 3 && v[2] >= 5)) }')" = 1 ]; then
        TLS_CONFIGS+=("default-x25519mlkem X25519MLKEM768 $work/default.cnf"
            "keyx-software-x25519mlkem X25519MLKEM768 $work/software.cnf"
            "keyx-pkcs11-p256mlkem SecP256r1MLKEM768 $work/pkcs11.cnf")
        [ -z "${TPM_TCTI:-}" ] || TLS_CONFIGS+=("keyx-tpm-p256mlkem SecP256r1MLKEM768 $work/tpm.cnf")
    fi

    # Certificate keys in the hardware: a P-256 key made by keyx on the token / as a persistent
    # TPM key (keyx reference files), its certificate issued by the default provider's ec.key
    # (x509 -force_pubkey: the hardware key never signs its own certificate).
    # hw_cert NAME CNF GENPKEY-OPTS...: writes $work/NAME.key and $work/NAME.crt
    hw_cert() {
        local name=$1 cnf=$2
        shift 2
        OPENSSL_CONF=$cnf openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 "$@" \
            -out "$work/$name.key" 2>"$work/$name.log" ||
            keyx_die "genpkey of the $name certificate key failed: $(cat "$work/$name.log")"
        OPENSSL_CONF=$cnf openssl pkey -in "$work/$name.key" -pubout -out "$work/$name.pub" ||
            keyx_die "cannot read the public key of $name"
        OPENSSL_CONF=$work/default.cnf openssl req -new -key "$work/ec.key" -subj /CN=localhost \
            -out "$work/$name.csr"
        OPENSSL_CONF=$work/default.cnf openssl x509 -req -in "$work/$name.csr" -CA "$work/ec.crt" \
            -CAkey "$work/ec.key" -force_pubkey "$work/$name.pub" -days 2 \
            -out "$work/$name.crt" 2>/dev/null || keyx_die "cannot issue the $name certificate"
    }
    hw_cert p11-certkey "$work/pkcs11.cnf" -pkeyopt keyx-backend:pkcs11 -pkeyopt keyx-label:bench-tls
    TLS_CONFIGS+=("keyx-pkcs11+certkey P-256 $work/pkcs11.cnf $work/p11-certkey.crt $work/p11-certkey.key"
        "keyx-pkcs11-pool+certkey P-256 $work/pkcs11-pool.cnf $work/p11-certkey.crt $work/p11-certkey.key")
    if [ -n "${TPM_TCTI:-}" ]; then
        hw_cert tpm-certkey "$work/tpm.cnf" -pkeyopt keyx-backend:tpm -pkeyopt keyx-persist:0x81000006
        TLS_CONFIGS+=("keyx-tpm+certkey P-256 $work/tpm.cnf $work/tpm-certkey.crt $work/tpm-certkey.key"
            "keyx-tpm-pool+certkey P-256 $work/tpm-pool.cnf $work/tpm-certkey.crt $work/tpm-certkey.key")
    fi

    # BENCH_TLS_ONLY: the servers whose name matches (default always: the /default column)
    if [ -n "${BENCH_TLS_ONLY:-}" ]; then
        selected=()
        for entry in "${TLS_CONFIGS[@]}"; do
            name=${entry%% *}
            if [ "$name" = default ] || [[ $name =~ $BENCH_TLS_ONLY ]]; then selected+=("$entry"); fi
        done
        TLS_CONFIGS=("${selected[@]}")
    fi
    # Each client offers its server's group only, so the server never needs a HelloRetryRequest.
    declare -A tls_group=()
    for entry in "${TLS_CONFIGS[@]}"; do
        read -r name group _ <<<"$entry"
        tls_group[$name]=$group
        printf '%s\n' "openssl_conf = openssl_init" "[openssl_init]" "ssl_conf = ssl_sect" \
            "[ssl_sect]" "system_default = tls_sect" "[tls_sect]" "Groups = $group" >"$work/client-$group.cnf"
    done

    # Proof that the hardware servers make and use their key shares there (the classical half of
    # a hybrid too): one short run of each with the audit log.
    # check_shares NAME GROUP CNF BACKEND
    check_shares() {
        local name=$1 group=$2 cnf=$3 backend=$4 log=$work/audit-$1.jsonl check conns gens derives saved=$tls_seconds
        say "checking with the audit log that $name handshakes generate and derive in $backend"
        tls_seconds=1
        check=$(KEYX_AUDIT_LOG=$log tls_rate "$name" "$group" "$cnf")
        tls_seconds=$saved
        conns=$(printf '%s' "$check" | awk '{print $2}')
        gens=$(grep -c "\"event\":\"keygen\",\"backend\":\"$backend\"" "$log" || true)
        derives=$(grep -c "\"event\":\"derive\",\"backend\":\"$backend\"" "$log" || true)
        say "  $conns handshakes: $gens keygens and $derives derives in $backend"
        if [ "$gens" -lt "$conns" ] || [ "$derives" -lt "$conns" ]; then
            keyx_die "$name TLS did not make its key shares in $backend ($gens keygens for $conns handshakes)"
        fi
    }
    [ -z "${tls_group[keyx-pkcs11]:-}" ] || check_shares keyx-pkcs11 P-256 "$work/pkcs11.cnf" pkcs11
    [ -z "${tls_group[keyx-pkcs11-remote]:-}" ] ||
        check_shares keyx-pkcs11-remote P-256 "$work/pkcs11-remote.cnf" pkcs11
    [ -z "${TPM_TCTI:-}" ] || [ -z "${tls_group[keyx-tpm]:-}" ] || check_shares keyx-tpm P-256 "$work/tpm.cnf" tpm
    if [ -n "${tls_group[keyx-pkcs11-p256mlkem]:-}" ]; then
        check_shares keyx-pkcs11-p256mlkem SecP256r1MLKEM768 "$work/pkcs11.cnf" pkcs11
        [ -z "${TPM_TCTI:-}" ] || check_shares keyx-tpm-p256mlkem SecP256r1MLKEM768 "$work/tpm.cnf" tpm
    fi

    # Interleaved rounds, as keyx-bench's: every server once per round, so that a slow phase of
    # the machine hits them alike; a server's figure is the median of its rounds.
    declare -A tls_runs=()
    # /proc/stat's cpu line: the ticks of all CPUs, the 8th field the hypervisor's "steal"
    read -r _ a b c d e f g h _ </proc/stat
    ticks0=$((a + b + c + d + e + f + g + h)) steal0=$h
    for round in $(seq "$tls_rounds"); do
        for entry in "${TLS_CONFIGS[@]}"; do
            say "TLS 1.3 handshakes/s, round $round/$tls_rounds, server: ${entry%% *} (${tls_seconds}s)"
            # shellcheck disable=SC2086 # "name cnf"
            row=$(tls_rate $entry)
            tls_runs[${entry%% *}]+="${row#* };"
        done
    done
    read -r _ a b c d e f g h _ </proc/stat
    tls_steal=$(awk -v t=$((a + b + c + d + e + f + g + h - ticks0)) -v s=$((h - steal0)) \
        'BEGIN { printf "%.1f", (t > 0 ? 100 * s / t : 0) }')
    # tls_rows: "NAME CONNECTIONS SECONDS MEDIAN MIN MAX RATES" (connections and seconds summed
    # over the rounds; RATES: the rounds' rates joined by commas)
    for entry in "${TLS_CONFIGS[@]}"; do
        name=${entry%% *}
        tls_rows+=("$name $(printf '%s' "${tls_runs[$name]}" | tr ';' '\n' | awk 'NF == 3 {
                n += $1; t += $2; r[++k] = $3 }
            END {
                for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (r[j] < r[i]) { x = r[i]; r[i] = r[j]; r[j] = x }
                med = k % 2 ? r[(k + 1) / 2] : (r[k / 2] + r[k / 2 + 1]) / 2
                list = r[1]; for (i = 2; i <= k; i++) list = list "," r[i]
                printf "%d %.2f %.1f %.1f %.1f %s\n", n, t, med, r[1], r[k], list }')")
    done
    # The TPM's own ceiling in this run: raw ESYS keygen + TPM2_ECDH_ZGen per second, what a TLS
    # server's key share costs the TPM at the least (keyx-tpm's handshakes beside it)
    if [ -n "${TPM_TCTI:-}" ]; then
        say "the TPM's ceiling: raw ESYS keygen+derive"
        tpm_ceiling=$("$bench_bin" "${TPM_ARGS[@]}" --only '^raw-esys/P-256/keygen\+derive$' --json \
            --rounds 3 --seconds 1 --mem-ops 0 --count-ops 0 --threads 1 |
            python3 -c 'import json, sys; print("%.1f" % json.load(sys.stdin)["cells"][0]["ops_per_s"])') ||
            keyx_die "keyx-bench (the TPM's ceiling) failed"
    fi
fi
tpm_ceiling=${tpm_ceiling:-}

# tls_ref NAME: "REFERENCE GOAL" for a hybrid row: the row it is compared with in this run and the
# least ratio to it that is the goal (the hybrid adds ML-KEM in software to the same hardware ECDH).
tls_ref() {
    case $1 in
    keyx-tpm-p256mlkem) echo "keyx-tpm 0.9" ;;
    keyx-pkcs11-p256mlkem) echo "keyx-pkcs11 0.9" ;;
    keyx-software-x25519mlkem) echo "default-x25519mlkem 0.95" ;;
    esac
}
# tls_median NAME: that row's median handshakes/s
tls_median() {
    local row
    for row in "${tls_rows[@]}"; do
        [ "${row%% *}" != "$1" ] || { awk '{ print $4 }' <<<"$row"; return; }
    done
}

# tls_target NAME: the throughput target for that server, or nothing: "ABSOLUTE SHARE ANCHOR...".
# ECDHE in the TPM 5x tpm2-openssl's 63/s, on the token 5x pkcs11-provider's 55/s.
# Neither anchor is measured here (tpm2-openssl completes no handshake without a resource
# manager; pkcs11-provider is not installed): shared/research took them on another day, when the
# default provider's server made 757/s and 530/s. SHARE is five times the anchor's share of that
# (63/757, 55/530), the target for keyx's share of this run's default server: the absolute rate
# moves with the host's load, the share does not.
tls_target() {
    case $1 in
    keyx-tpm*) echo "315 0.416 5x tpm2-openssl 63/s (default 757/s)" ;;
    keyx-pkcs11-remote) ;; # the anchor's share was taken on a local token
    keyx-pkcs11*) echo "275 0.519 5x pkcs11-provider 55/s (default 530/s)" ;;
    esac
}

if [ "$json" = 1 ]; then
    printf '{"tls_steal_pct": %s,\n "tpm_ceiling_keygen_derive_per_s": %s,\n "bench": %s,\n "pools": %s,\n "tpm2_openssl": %s,\n "tpm_commands": %s,\n "tpm2_openssl_commands": %s,\n "tls": [' \
        "${tls_steal:-null}" "${tpm_ceiling:-null}" "$bench_out" "$pool_out" "$tpm2o_out" "$tpm_count_out" "$tpm2o_count_out"
    sep=
    base=
    for row in "${tls_rows[@]}"; do
        # shellcheck disable=SC2086 # "name n seconds median min max rates"
        set -- $row
        [ -n "$base" ] || base=$4
        target=
        read -r g q a <<<"$(tls_target "$1")"
        if [ -n "$g" ]; then
            target=$(awk -v r="$4" -v b="$base" -v g="$g" -v q="$q" -v a="$a" 'BEGIN { s = b > 0 ? r / b : 0
                printf ", \"target\": %d, \"meets_target\": %s, \"target_share_of_default\": %s, \"share_of_default\": %.3f, \"meets_target_share\": %s, \"anchor\": \"%s\"",
                    g, (r >= g ? "true" : "false"), q, s, (s >= q ? "true" : "false"), a }')
        fi
        read -r ref goal <<<"$(tls_ref "$1")"
        if [ -n "$ref" ]; then
            target+=$(awk -v r="$4" -v b="$(tls_median "$ref")" -v ref="$ref" -v g="$goal" 'BEGIN {
                printf ", \"reference\": \"%s\", \"ratio_to_reference\": %.3f, \"goal_ratio\": %s, \"meets_goal\": %s",
                    ref, (b > 0 ? r / b : 0), g, ((b > 0 && r / b >= g) ? "true" : "false") }')
        fi
        # the remote token beside the local one: what the RPC costs a handshake
        [ "$1" != keyx-pkcs11-remote ] || [ -z "$(tls_median keyx-pkcs11)" ] ||
            target+=$(awk -v r="$4" -v l="$(tls_median keyx-pkcs11)" 'BEGIN {
                printf ", \"local\": \"keyx-pkcs11\", \"ratio_to_local\": %.3f", (l > 0 ? r / l : 0) }')
        case $1 in keyx-tpm | keyx-tpm-p256mlkem)
            [ -z "$tpm_ceiling" ] || target+=$(awk -v r="$4" -v c="$tpm_ceiling" 'BEGIN {
                printf ", \"share_of_tpm_ceiling\": %.3f, \"meets_tpm_ceiling_goal\": %s", r / c, (r / c >= 0.85 ? "true" : "false") }')
            d=$(tls_median default)
            [ -z "$tpm_ceiling" ] || [ "$1" != keyx-tpm ] || [ -z "$d" ] || target+=$(awk -v r="$4" -v c="$tpm_ceiling" -v d="$d" 'BEGIN {
                b = 1 / (1 / d + 1 / c); printf ", \"serial_bound_per_s\": %.1f, \"share_of_serial_bound\": %.3f", b, r / b }') ;;
        esac
        printf '%s\n  {"server": "%s", "group": "%s", "connections": %s, "seconds": %s, "handshakes_per_s": %s, "min": %s, "max": %s, "rounds": [%s]%s}' \
            "$sep" "$1" "${tls_group[$1]}" "$2" "$3" "$4" "$5" "$6" "$7" "$target"
        sep=,
    done
    printf '\n]}\n'
elif [ ${#tls_rows[@]} -gt 0 ]; then
    printf '\nTLS 1.3 handshakes per second (openssl s_time -new, the group shown; certificate key ECDSA P-256\n'
    printf 'in the default provider, or in the hardware for +certkey; client: default provider)\n'
    printf 'median of %d rounds of %d s, interleaved; host steal during them: %s %% of the CPU time\n' \
        "$tls_rounds" "$tls_seconds" "$tls_steal"
    printf '%-26s %-18s %11s %13s %15s %9s  %s\n' server group connections handshakes/s min-max "/default" target
    base=
    for row in "${tls_rows[@]}"; do
        # shellcheck disable=SC2086
        set -- $row
        [ -n "$base" ] || base=$4
        read -r g q a <<<"$(tls_target "$1")"
        awk -v s="$1" -v grp="${tls_group[$1]}" -v n="$2" -v r="$4" -v lo="$5" -v hi="$6" -v b="$base" -v g="$g" -v q="$q" -v a="$a" \
            'BEGIN { printf "%-26s %-18s %11d %13.1f %15s %9.3f  %s\n", s, grp, n, r, sprintf("%.1f-%.1f", lo, hi), r / b,
                         g == "" ? "-" : sprintf("%s: /default >= %.3f %s; >= %d/s %s", a, q,
                             r / b >= q ? "met" : "BELOW TARGET", g, r >= g ? "met" : "below") }'
    done
    printf '(target: five times the anchor'\''s share of the default server'\''s rate in its own run, from\n'
    printf 'shared/research; the absolute rate beside it moves with the host'\''s load)\n'
    hybrid=0
    for row in "${tls_rows[@]}"; do
        read -r ref goal <<<"$(tls_ref "${row%% *}")"
        [ -n "$ref" ] || continue
        [ "$hybrid" = 1 ] || printf '\nHybrid ML-KEM groups (OpenSSL 3.5) beside their classical rows of this run\n'
        hybrid=1
        awk -v s="${row%% *}" -v r="$(awk '{ print $4 }' <<<"$row")" -v b="$(tls_median "$ref")" -v ref="$ref" -v g="$goal" \
            'BEGIN { printf "%-26s %9.3f of %-20s goal >= %.2f: %s\n", s, (b > 0 ? r / b : 0), ref, g, ((b > 0 && r / b >= g) ? "met" : "BELOW GOAL") }'
    done
    r=$(tls_median keyx-pkcs11-remote)
    l=$(tls_median keyx-pkcs11)
    if [ -n "$r" ] && [ -n "$l" ]; then
        printf '\nRemote token (p11-kit RPC, unix socket) beside the local token, same run\n'
        awk -v r="$r" -v l="$l" 'BEGIN { printf "%-26s %9.3f of keyx-pkcs11 (%.1f/s against %.1f/s)\n",
            "keyx-pkcs11-remote", (l > 0 ? r / l : 0), r, l }'
    fi
    for pair in "keyx-pkcs11 pkcs11-provider" "keyx-tpm tpm2-openssl"; do
        read -r mine anchor <<<"$pair"
        a=$(tls_median "$anchor")
        [ -n "$a" ] || continue
        [ "${anchor_header:-0}" = 1 ] || printf '\nThe anchors measured in this run (handshakes/s)\n'
        anchor_header=1
        awk -v s="$mine" -v r="$(tls_median "$mine")" -v an="$anchor" -v a="$a" \
            'BEGIN { if (a > 0) printf "%-26s %9.1fx %s (%.1f/s)\n", s, r / a, an, a
                     else printf "%-26s %s completed no handshake\n", s, an }'
    done
    if [ -n "$tpm_ceiling" ]; then
        printf '\nThe TPM'\''s ceiling in this run: raw ESYS keygen + ECDH_ZGen %.1f/s\n' "$tpm_ceiling"
        for name in keyx-tpm keyx-tpm-p256mlkem; do
            r=$(tls_median "$name")
            [ -n "$r" ] || continue
            awk -v s="$name" -v r="$r" -v c="$tpm_ceiling" \
                'BEGIN { printf "%-26s %9.3f of the ceiling, goal >= 0.85: %s\n", s, r / c, ((r / c >= 0.85) ? "met" : "BELOW GOAL") }'
        done
        # s_time makes one handshake after another and s_server serves one at a time, so a
        # handshake takes the default server's time plus the TPM's time for its key share.
        d=$(tls_median default)
        r=$(tls_median keyx-tpm)
        if [ -n "$d" ] && [ -n "$r" ]; then
            awk -v d="$d" -v c="$tpm_ceiling" -v r="$r" 'BEGIN { b = 1 / (1 / d + 1 / c)
                printf "one handshake at a time (s_time, s_server): at most 1/(1/default + 1/ceiling) = %.1f/s,\n", b
                printf "%.3f of the ceiling with nothing of keyx'"'"'s own; keyx-tpm is %.3f of that bound\n", b / c, r / b }'
        fi
    fi
fi
