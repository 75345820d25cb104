#!/usr/bin/env bash
# keyx in two minutes: installs missing Debian packages, builds keyx, then, with an openssl.cnf
# that prefers keyx (software backend):
#   1. an ECDH P-256 exchange between Alice and Bob, keys generated and secrets derived in keyx;
#   2. a TLS 1.3 handshake, openssl s_server and s_client on 127.0.0.1;
#   3. the audit trail keyx wrote for all of it.
# Everything happens in a temporary directory that is removed at the end.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

keyx_install_deps "${KEYX_PACKAGES[@]}"
build=$(keyx_abs "${BUILD_DIR:-build}")
keyx_build "$build" >/dev/null

work=$(mktemp -d "${TMPDIR:-/tmp}/keyx-demo.XXXXXX")
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    exec 3>&- 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

cat >openssl.cnf <<EOF
openssl_conf = openssl_init

[openssl_init]
providers = provider_sect
alg_section = algorithm_sect

[algorithm_sect]
# keyx wins wherever it implements the algorithm; the default provider does the rest
default_properties = ?provider=keyx

[provider_sect]
keyx = keyx_sect
default = default_sect

[keyx_sect]
module = $build/keyx.so
activate = 1
backends = software
audit-log = $work/audit.jsonl

[default_sect]
activate = 1
EOF
export OPENSSL_CONF=$work/openssl.cnf
unset OPENSSL_MODULES KEYX_BACKENDS KEYX_AUDIT_LOG KEYX_DEBUG KEYX_EPHEMERAL_MAX_USES

keyx_say "keyx is loaded from $build/keyx.so"
openssl list -providers | sed 's/^/    /'

keyx_say "1. ECDH P-256: Alice and Bob each make a key pair and derive the shared secret"
for who in alice bob; do
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$who.pem"
    openssl pkey -in "$who.pem" -pubout -out "$who.pub.pem"
done
openssl pkeyutl -derive -inkey alice.pem -peerkey bob.pub.pem -out alice.secret
openssl pkeyutl -derive -inkey bob.pem -peerkey alice.pub.pem -out bob.secret
a=$(openssl dgst -sha256 -r alice.secret | cut -d' ' -f1)
b=$(openssl dgst -sha256 -r bob.secret | cut -d' ' -f1)
echo "    SHA-256 of Alice's secret: $a"
echo "    SHA-256 of Bob's secret:   $b"
[ "$a" = "$b" ] || keyx_die "Alice and Bob derived different secrets"
echo "    same secret on both sides ($(stat -c %s alice.secret) bytes; only its hash is shown)"

keyx_say "2. TLS 1.3: s_server and s_client on 127.0.0.1"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key \
    -out server.crt -subj /CN=localhost -days 1 2>/dev/null
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# s_server ends a connection when its stdin ends: give it a pipe that stays open.
mkfifo server.in
exec 3<>server.in
openssl s_server -accept "127.0.0.1:$port" -naccept 1 -cert server.crt -key server.key \
    <server.in >server.log 2>&1 &
server_pid=$!
for _ in $(seq 100); do
    grep -q '^ACCEPT' server.log 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { cat server.log; keyx_die "s_server did not start"; }
    sleep 0.1
done
grep -q '^ACCEPT' server.log || keyx_die "s_server not accepting on port $port"
timeout 30 openssl s_client -connect "127.0.0.1:$port" -servername localhost -CAfile server.crt \
    -verify_return_error </dev/null >client.log 2>&1 || { cat client.log; keyx_die "TLS handshake failed"; }
timeout 30 tail --pid="$server_pid" -f /dev/null || true
server_pid=
grep -E '^(New, |Server Temp Key|Peer signature type|Verify return code)' client.log | sed 's/^/    /'

keyx_say "3. the audit trail keyx wrote (pid, event, algorithm, group, key id, result)"
python3 - "$work/audit.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    print("    {ts} pid={pid:<7} {event:<7} {backend:<9} {alg:<6} {group:<10} key={key} {res}".format(
        ts=e["ts"], pid=e["pid"], event=e["event"], backend=e.get("backend", "-"),
        alg=e.get("alg", "-"), group=e.get("group", "-"), key=e.get("key", "-"),
        res="ok" if e["ok"] else "FAILED: " + e.get("error", "")))
PY
echo
echo "    Every key generation, import, derive and free went through keyx; no secret is logged."
