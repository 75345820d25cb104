#!/usr/bin/env bash
# keyx in two minutes: installs the Debian packages it needs (KEYX_DEMO_PACKAGES in scripts/lib.sh:
# what building keyx.so and the steps below use, none of the test suite's tools), builds keyx.so,
# then shows its three backends with the unchanged openssl tool and an openssl.cnf that prefers keyx:
#   1. software: an ECDH P-256 exchange and a TLS 1.3 handshake (s_server/s_client on 127.0.0.1);
#   2. PKCS#11: a SoftHSM2 token made here; `genpkey` makes a token key written as a KEYX KEY
#      reference file, pkcs11-tool lists it, its ECDH secret equals the peer's, and a TLS 1.3
#      server whose certificate key is that token key makes and uses its ECDHE key share on the
#      token;
#   3. TPM: a swtpm started here on 127.0.0.1; `genpkey` makes a persistent TPM key, its secret
#      equals the peer's, and a TLS 1.3 server with that certificate key has its ECDHE key share
#      in the TPM;
#   after each step, the audit trail keyx wrote for it (event, backend, algorithm, group, result).
# The peer side (other party's key and derive, TLS client, test CA) is OpenSSL's default provider
# alone. Everything (token, TPM state, keys, logs) lives in a temporary directory that is removed,
# and swtpm and s_server stopped, when the script ends, also on failure or Ctrl-C.
#   scripts/demo.sh                         # build/ (BUILD_DIR=... for another build directory)
#   BUILD_DIR=build-dev scripts/demo.sh --no-build   # an existing build as it is, installs nothing
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build=$(keyx_abs "${BUILD_DIR:-build}")
if [ "${1:-}" = --no-build ]; then
    [ -f "$build/keyx.so" ] || keyx_die "$build/keyx.so not found (build it, or run without --no-build)"
else
    keyx_install_deps "${KEYX_DEMO_PACKAGES[@]}"
    keyx_build "$build" keyx >/dev/null
fi
for cmd in openssl python3 swtpm softhsm2-util pkcs11-tool tpm2_getcap; do
    command -v "$cmd" >/dev/null || keyx_die "$cmd not found: install ${KEYX_DEMO_PACKAGES[*]}"
done
softhsm_module=/usr/lib/softhsm/libsofthsm2.so
[ -f "$softhsm_module" ] || keyx_die "$softhsm_module not found: install softhsm2"

work=$(mktemp -d "${TMPDIR:-/tmp}/keyx-demo.XXXXXX")
server_pid=
tls_pid=
swtpm_pid=
stop() { # stop PID: ends a process this script started
    [ -n "$1" ] || return 0
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
cleanup() {
    stop "$server_pid"
    stop "$swtpm_pid"
    exec 3>&- 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cd "$work"

# Only the openssl.cnf files below configure keyx: no KEYX_* overrides from the caller.
unset OPENSSL_MODULES
for var in $(compgen -e); do
    case $var in KEYX_*) unset "$var" ;; esac
done
export SOFTHSM2_CONF=$work/softhsm2.conf TSS2_LOG=all+none

# tool CMD...: a program that is not keyx (token and TPM tools, swtpm, python3) runs with the peer's
# openssl.cnf (SoftHSM, pkcs11-tool and swtpm use libcrypto: keyx stays out of them) and without the
# sanitizer runtimes a sanitized keyx.so needs in the openssl processes (the test suite preloads them).
tool() {
    env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS OPENSSL_CONF="$work/peer.cnf" "$@"
}

# The peer: only OpenSSL's default provider, whatever /etc/ssl/openssl.cnf says.
echo "# empty: the default provider only" >peer.cnf
peer() {
    OPENSSL_CONF=$work/peer.cnf openssl "$@"
}

# keyx_cnf NAME SETTINGS...: NAME.cnf, an openssl.cnf preferring keyx with these keyx settings
# (the first one "backends = ..."), the audit log NAME.jsonl, and the TLS groups those backends
# serve (docs/tls-servers.md, "Choosing the TLS groups").
keyx_cnf() {
    local name=$1 setting groups
    shift
    groups=$(keyx_tls_groups "${1#backends = }")
    echo "    TLS groups for these backends: Groups = $groups"
    {
        cat <<EOF
openssl_conf = openssl_init

[openssl_init]
providers = provider_sect
alg_section = algorithm_sect
ssl_conf = ssl_sect

[ssl_sect]
system_default = tls_sect

[tls_sect]
# only groups the backends serve: OpenSSL 3.5 negotiates every provider's groups
Groups = $groups

[algorithm_sect]
# keyx wins wherever it implements the algorithm; the default provider does the rest
default_properties = ?provider=keyx

[provider_sect]
keyx = keyx_sect
default = default_sect

[default_sect]
activate = 1

[keyx_sect]
module = $build/keyx.so
activate = 1
audit-log = $work/$name.jsonl
EOF
        for setting in "$@"; do
            echo "$setting"
        done
    } >"$name.cnf"
}

indent() {
    sed 's/^/    /'
}

sha() { # sha FILE: the first 16 hex digits of its SHA-256 (secrets are never shown)
    peer dgst -sha256 -r "$1" | cut -c1-16
}

# same_secret WHAT A B: both files hold the same secret, or the demo fails.
same_secret() {
    local a b
    a=$(sha "$2")
    b=$(sha "$3")
    echo "    SHA-256 of the secrets: $a... (keyx), $b... (peer, default provider)"
    [ "$a" = "$b" ] || keyx_die "$1: keyx and the peer derived different secrets"
    echo "    secrets match: $1 ($(stat -c %s "$2") bytes; only their hashes are shown)"
}

# ECDH between KEY (read through keyx with $OPENSSL_CONF) and a fresh default-provider peer key.
derive_with_peer() {
    local what=$1 key=$2
    peer genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out peer.pem
    peer pkey -in peer.pem -pubout -out peer.pub
    openssl pkey -in "$key" -pubout -out key.pub
    openssl pkeyutl -derive -inkey "$key" -peerkey peer.pub -out keyx.secret
    peer pkeyutl -derive -inkey peer.pem -peerkey key.pub -out peer.secret
    same_secret "$what" keyx.secret peer.secret
    rm -f keyx.secret peer.secret
}

free_port() {
    tool python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# s_server ends a connection when its stdin ends: give it a pipe that stays open.
mkfifo server.in
exec 3<>server.in

# tls WHAT CERT KEY: one TLS 1.3 handshake, s_server through keyx ($OPENSSL_CONF) with CERT/KEY,
# s_client with the default provider only (offering P-256), verifying CERT against ca.crt.
tls() {
    local what=$1 cert=$2 key=$3 port
    port=$(free_port)
    # A fresh log: the last step's one says ACCEPT until this server's redirection truncates it.
    rm -f server.log client.log
    echo "    \$ openssl s_server -tls1_3 -cert $cert -key $key   (client: s_client, default provider only)"
    openssl s_server -accept "127.0.0.1:$port" -naccept 1 -tls1_3 -cert "$cert" -key "$key" \
        <server.in >server.log 2>&1 &
    server_pid=$!
    for _ in $(seq 100); do
        grep -q '^ACCEPT' server.log 2>/dev/null && break
        kill -0 "$server_pid" 2>/dev/null || { cat server.log; keyx_die "s_server did not start"; }
        sleep 0.1
    done
    grep -q '^ACCEPT' server.log || keyx_die "s_server not accepting on port $port"
    timeout 30 env OPENSSL_CONF="$work/peer.cnf" openssl s_client -connect "127.0.0.1:$port" \
        -servername localhost -groups P-256 -CAfile ca.crt -verify_return_error </dev/null \
        >client.log 2>&1 || { cat client.log server.log; keyx_die "$what: TLS handshake failed"; }
    timeout 30 tail --pid="$server_pid" -f /dev/null || true
    tls_pid=$server_pid
    server_pid=
    grep -E '^(New, |Server Temp Key|Peer Temp Key|Peer signature type|Verify return code)' client.log | indent
    grep -q '^Verify return code: 0 (ok)' client.log || keyx_die "$what: certificate not verified"
    echo "    TLS 1.3 handshake completed: $what"
}

# A throwaway CA of the default provider; certificates for localhost.
peer req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt \
    -subj "/CN=keyx demo CA" -days 1 -addext basicConstraints=critical,CA:TRUE 2>/dev/null
software_cert() { # software_cert NAME: NAME.key and NAME.crt, a software key
    peer genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key"
    peer req -new -key "$1.key" -subj /CN=localhost |
        peer x509 -req -CA ca.crt -CAkey ca.key -set_serial "0x$(peer rand -hex 8)" -days 1 \
            -out "$1.crt" 2>/dev/null
}
# hardware_cert NAME KEY: NAME.crt for KEY's public key, signed by the CA (the CA never sees KEY).
hardware_cert() {
    openssl pkey -in "$2" -pubout -out "$1.pub"
    peer x509 -new -force_pubkey "$1.pub" -subj /CN=localhost -CA ca.crt -CAkey ca.key \
        -set_serial "0x$(peer rand -hex 8)" -days 1 -out "$1.crt"
}

# server_cert NAME KEY WHERE: the TLS server's certificate is NAME.crt, for KEY itself: keyx signs
# with KEY (`dgst -sign`, verified by the default provider), and the CA certifies its public key.
server_cert() {
    local name=$1 key=$2 where=$3
    echo "keyx demo" >msg
    if ! openssl dgst -sha256 -sign "$key" -out msg.sig msg; then
        keyx_die "keyx cannot sign with $where ($key)"
    fi
    openssl pkey -in "$key" -pubout -out "$name.sign.pub"
    peer dgst -sha256 -verify "$name.sign.pub" -signature msg.sig msg >/dev/null ||
        keyx_die "the default provider does not verify the signature made with $where"
    echo "    dgst -sha256 -sign $key: signed with $where, verified by the default provider"
    hardware_cert "$name" "$key"
    echo "    certificate key: $key, $where (certificate from a throwaway default-provider CA)"
    rm -f msg msg.sig
}

# audit NAME: the audit events of NAME.jsonl, one line per process, backend, algorithm and group
# with how many events of each kind (in the order of first appearance) and whether all succeeded.
# The process is the step's last TLS server (pid $tls_pid) or one of the step's openssl commands.
audit() {
    echo "    audit trail ($1.jsonl):"
    tool python3 - "$work/$1.jsonl" "$tls_pid" <<'PY' | indent
import json, sys
rows, failed = {}, []
for line in open(sys.argv[1]):
    e = json.loads(line)
    who = "s_server" if str(e["pid"]) == sys.argv[2] else "commands"
    k = (who, e.get("backend", "-"), e.get("alg", "-"), e.get("group", "-"))
    events = rows.setdefault(k, {})
    events[e["event"]] = events.get(e["event"], 0) + 1
    if not e["ok"]:
        failed.append("{} {} {}: FAILED: {}".format(who, e["event"], e.get("backend", "-"), e.get("error", "")))
for k, events in sorted(rows.items(), key=lambda kv: kv[0][0] == "s_server"):
    print("  {:<9} {:<9} {:<3} {:<6} {}".format(*k, ", ".join(f"{ev} {n}" for ev, n in events.items())))
print("  " + ("\n  ".join(failed) if failed else "every event ok"))
PY
}

# ---------------------------------------------------------------------------------------------
keyx_cnf software "backends = software"
export OPENSSL_CONF=$work/software.cnf
keyx_say "keyx is loaded from $build/keyx.so"
openssl list -providers | grep -E '^  [a-z]|name' | indent

keyx_say "1. software backend: ECDH P-256 and a TLS 1.3 handshake"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out alice.pem
derive_with_peer "software key" alice.pem
software_cert sw
tls "software ECDHE key share" sw.crt sw.key
audit software

# ---------------------------------------------------------------------------------------------
keyx_say "2. PKCS#11: a SoftHSM2 token in $work"
mkdir tokens
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$work" \
    >softhsm2.conf
pin=$(peer rand -hex 8) # a throwaway token's PIN, never shown
(
    umask 077
    printf '%s' "$pin" >pin
)
tool softhsm2-util --init-token --free --label keyx-demo --pin "$pin" --so-pin "$(peer rand -hex 8)" \
    >/dev/null
keyx_cnf pkcs11 "backends = pkcs11" "pkcs11-module = $softhsm_module" \
    "pkcs11-token = pkcs11:token=keyx-demo" "pkcs11-pin = file:$work/pin"
export OPENSSL_CONF=$work/pkcs11.cnf
echo "    \$ openssl genpkey -algorithm EC -pkeyopt group:P-256 -pkeyopt keyx-backend:pkcs11 -pkeyopt keyx-label:demo-srv -out srv.pem"
openssl genpkey -algorithm EC -pkeyopt group:P-256 -pkeyopt keyx-backend:pkcs11 \
    -pkeyopt keyx-label:demo-srv -out srv.pem
head -n 2 srv.pem | indent
echo "    ... (a reference: where the key is and its public key, nothing secret)"
openssl pkey -in srv.pem -text -noout | grep -E '^(NIST CURVE|private key):' | indent
echo "    \$ pkcs11-tool --list-objects (the token's own view)"
tool pkcs11-tool --module "$softhsm_module" --token-label keyx-demo --login --pin "$pin" \
    --list-objects 2>/dev/null | grep -E '^[A-Z]|^ *(label|Usage|Access):' | indent
derive_with_peer "token key (ECDH on the token)" srv.pem
server_cert p11 srv.pem "the token key"
tls "ECDHE key share made and used on the token" p11.crt srv.pem
audit pkcs11

# ---------------------------------------------------------------------------------------------
keyx_say "3. TPM 2.0: swtpm on 127.0.0.1, state in $work"
# A port P with P+1 free too (swtpm's control port), below the ephemeral range as in
# tests/fixture_swtpm.py: swtpm's TCTI leaves many client ports in TIME_WAIT.
tpm_port=$(tool python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
hi = max(10002, min(low, 32768)) - 2
for _ in range(200):
    p = random.randrange(10000, hi)
    try:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", p))
            b.bind(("127.0.0.1", p + 1))
        print(p)
        break
    except OSError:
        pass
PY
)
[ -n "$tpm_port" ] || keyx_die "no two consecutive free TCP ports on 127.0.0.1 for swtpm"
mkdir tpm
# In the demo's process group (no --daemon), so that whoever kills the group kills swtpm too; $!
# is swtpm itself (env execs it; a shell function here would leave a subshell's pid).
env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS OPENSSL_CONF="$work/peer.cnf" swtpm socket --tpm2 --tpmstate "dir=$work/tpm" \
    --server "type=tcp,port=$tpm_port,bindaddr=127.0.0.1" \
    --ctrl "type=tcp,port=$((tpm_port + 1)),bindaddr=127.0.0.1" \
    --flags not-need-init,startup-clear --log "file=$work/tpm/swtpm.log" </dev/null &
swtpm_pid=$!
tcti=swtpm:host=127.0.0.1,port=$tpm_port
swtpm_up() { # its control port accepts (the TPM port is left alone: swtpm serves one connection)
    tool python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' \
        "$((tpm_port + 1))" 2>/dev/null
}
for _ in $(seq 100); do
    swtpm_up && break
    kill -0 "$swtpm_pid" 2>/dev/null || { cat tpm/swtpm.log 2>/dev/null; keyx_die "swtpm did not start"; }
    sleep 0.1
done
swtpm_up || keyx_die "swtpm not listening on 127.0.0.1:$((tpm_port + 1)) after 10 s"
echo "    swtpm pid $swtpm_pid, tpm-tcti = $tcti"
keyx_cnf tpm "backends = tpm" "tpm-tcti = $tcti"
export OPENSSL_CONF=$work/tpm.cnf
echo "    \$ openssl genpkey -algorithm EC -pkeyopt group:P-256 -pkeyopt keyx-persist:0x81000010 -out tpm-srv.pem"
openssl genpkey -algorithm EC -pkeyopt group:P-256 -pkeyopt keyx-persist:0x81000010 -out tpm-srv.pem
head -n 1 tpm-srv.pem | indent
openssl pkey -in tpm-srv.pem -text -noout | grep -E '^private key:' | indent
handles=$(tool env TPM2TOOLS_TCTI="$tcti" tpm2_getcap handles-persistent | tr -d -- '- ' | paste -sd ' ')
echo "    persistent handles (tpm2_getcap): $handles"
case " $handles " in *" 0x81000010 "*) ;; *) keyx_die "tpm2_getcap does not list 0x81000010" ;; esac
derive_with_peer "TPM key (TPM2_ECDH_ZGen)" tpm-srv.pem
server_cert tpm tpm-srv.pem "the TPM key"
tls "ECDHE key share made and used in the TPM" tpm.crt tpm-srv.pem
audit tpm

echo
echo "    Every key generation, load, derive, signature and free went through keyx; no secret is logged."
