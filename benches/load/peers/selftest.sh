#!/usr/bin/env bash
# Self-test for the load ladder's peer proxies (HAProxy, Envoy, Node).
#
#   benches/load/peers/selftest.sh                  # all three
#   benches/load/peers/selftest.sh haproxy node     # a subset
#   KEYGATE_TOKEN=$(cargo run -q -- --config config/dev.toml dev-token) benches/load/peers/selftest.sh
#   SSE_GAP=20 benches/load/peers/selftest.sh       # SSE events 20 s apart (idle-timeout check)
#
# Renders each template the way the ladder does (literal placeholder replacement), starts
# a throwaway Python upstream that echoes request headers and serves an SSE stream, starts
# the peer on free ports, and checks: valid token -> 200 with X-User and no Authorization
# upstream; missing/garbage/wrong-signature/expired/not-yet-valid/wrong-aud/wrong-iss/
# HS256/none/no-exp tokens -> 401; array aud; spoofed X-User dropped; upstream connection
# reuse; SSE delivered event by event. Tokens are minted with openssl from the dev key
# (same header and claims as `keygate dev-token`); KEYGATE_TOKEN adds a keygate-minted one.
# Needs: python3, openssl, curl, and haproxy / envoy / node+npm for the peers under test.
# Exit status: 0 when every check passed.

set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
KEY="$REPO/config/dev/signing-key.pem"
JWKS="$REPO/config/dev/jwks.json"
ISSUER="http://127.0.0.1:8080/dev-issuer"
AUDIENCE="http://127.0.0.1:8080/mcp"
KID="keygate-dev"
SUB="selftest-user"
SSE_GAP="${SSE_GAP:-1}"

PEERS=("$@")
[ ${#PEERS[@]} -eq 0 ] && PEERS=(haproxy envoy node)

WORK="$(mktemp -d /tmp/keygate-peers-selftest.XXXXXX)"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

FAILS=0
pass() { printf '  PASS  %s\n' "$1"; }
fail() { printf '  FAIL  %s\n' "$1"; FAILS=$((FAILS + 1)); }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() { # port timeout_s
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1",int(sys.argv[1])),0.2).close()' "$1" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- keys and tokens
openssl rsa -in "$KEY" -pubout -out "$WORK/pubkey.pem" 2>/dev/null || { echo "cannot derive public key"; exit 1; }
openssl genrsa -out "$WORK/other-key.pem" 2048 2>/dev/null || { echo "cannot generate a key"; exit 1; }
JWKS_ONE_LINE="$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])),separators=(",",":")))' "$JWKS")"

b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }

# mint <header-json> <payload-json> [rsa-key | hs256:<secret-file> | none]
mint() {
  local h p sig signer="${3:-$KEY}"
  h="$(printf '%s' "$1" | b64url)"
  p="$(printf '%s' "$2" | b64url)"
  case "$signer" in
    none) sig="" ;;
    hs256:*) sig="$(printf '%s' "$h.$p" | python3 -c 'import hmac,hashlib,sys,base64; k=open(sys.argv[1],"rb").read(); print(base64.urlsafe_b64encode(hmac.new(k,sys.stdin.buffer.read(),hashlib.sha256).digest()).decode().rstrip("="))' "${signer#hs256:}")" ;;
    *) sig="$(printf '%s' "$h.$p" | openssl dgst -sha256 -sign "$signer" -binary | b64url)" ;;
  esac
  printf '%s.%s.%s' "$h" "$p" "$sig"
}

NOW=$(date +%s)
HDR="{\"typ\":\"at+jwt\",\"alg\":\"RS256\",\"kid\":\"$KID\"}"
claims() { # aud iss exp nbf [sub-json]
  local sub="${5-\"$SUB\"}" sub_part=""
  [ -n "$sub" ] && sub_part=",\"sub\":$sub"
  local exp_part="" nbf_part=""
  [ -n "$3" ] && exp_part=",\"exp\":$3"
  [ -n "$4" ] && nbf_part=",\"nbf\":$4"
  printf '{"aud":%s,"client_id":"keygate-dev","iat":%s,"iss":"%s","jti":"selftest","scope":"twenty:read"%s%s%s}' \
    "$1" "$NOW" "$2" "$exp_part" "$nbf_part" "$sub_part"
}
AUD_JSON="\"$AUDIENCE\""
T_VALID="$(mint "$HDR" "$(claims "$AUD_JSON" "$ISSUER" $((NOW + 3600)) "$NOW")")"
T_NO_NBF="$(mint "$HDR" "$(claims "$AUD_JSON" "$ISSUER" $((NOW + 3600)) "")")"
T_AUD_ARRAY="$(mint "$HDR" "$(claims "[\"http://other.example/api\",\"$AUDIENCE\"]" "$ISSUER" $((NOW + 3600)) "$NOW")")"
T_WRONG_SIG="$(mint "$HDR" "$(claims "$AUD_JSON" "$ISSUER" $((NOW + 3600)) "$NOW")" "$WORK/other-key.pem")"
T_TAMPERED="${T_VALID%%.*}.$(claims "$AUD_JSON" "$ISSUER" $((NOW + 7200)) "$NOW" | b64url).${T_VALID##*.}"
T_EXPIRED="$(mint "$HDR" "$(claims "$AUD_JSON" "$ISSUER" $((NOW - 120)) $((NOW - 3720)))")"
T_NOT_YET="$(mint "$HDR" "$(claims "$AUD_JSON" "$ISSUER" $((NOW + 3600)) $((NOW + 600)))")"
T_NO_EXP="$(mint "$HDR" "$(claims "$AUD_JSON" "$ISSUER" "" "$NOW")")"
T_WRONG_AUD="$(mint "$HDR" "$(claims '"http://127.0.0.1:8080/other"' "$ISSUER" $((NOW + 3600)) "$NOW")")"
T_WRONG_ISS="$(mint "$HDR" "$(claims "$AUD_JSON" "$ISSUER/x" $((NOW + 3600)) "$NOW")")"
T_HS256="$(mint "{\"typ\":\"at+jwt\",\"alg\":\"HS256\",\"kid\":\"$KID\"}" "$(claims "$AUD_JSON" "$ISSUER" $((NOW + 3600)) "$NOW")" "hs256:$WORK/pubkey.pem")"
T_NONE="$(mint "{\"typ\":\"at+jwt\",\"alg\":\"none\",\"kid\":\"$KID\"}" "$(claims "$AUD_JSON" "$ISSUER" $((NOW + 3600)) "$NOW")" none)"
T_NO_SUB="$(mint "$HDR" "$(claims "$AUD_JSON" "$ISSUER" $((NOW + 3600)) "$NOW" "")")"

# ---------------------------------------------------------------- upstream
cat >"$WORK/upstream.py" <<'PY'
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/sse"):
            gap = float(self.path.partition("gap=")[2] or 1)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                if i:
                    time.sleep(gap)
                data = ("id: %d\ndata: event %d sent=%.6f\n\n" % (i, i, time.time())).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return
        lines = ["%s: %s" % (k.lower(), v) for k, v in self.headers.items()]
        lines.append("upstream-seen-port: %d" % self.client_address[1])
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
PY
UPSTREAM_PORT="$(free_port)"
python3 "$WORK/upstream.py" "$UPSTREAM_PORT" &
PIDS+=($!)
wait_port "$UPSTREAM_PORT" 10 || { echo "upstream did not start"; exit 1; }

# ---------------------------------------------------------------- rendering
render() { # template output KEY=VALUE...
  local tmpl="$1" out="$2"
  shift 2
  python3 - "$tmpl" "$out" "$@" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
for kv in sys.argv[3:]:
    k, v = kv.split("=", 1)
    text = text.replace("{{%s}}" % k, v)
left = sorted(set(re.findall(r"\{\{[A-Z_]+\}\}", text)))
if left:
    sys.exit("unreplaced placeholders: %s" % " ".join(left))
open(sys.argv[2], "w").write(text)
PY
}

# ---------------------------------------------------------------- checks
status_of() { # port token-or-empty [extra curl args...]
  local port="$1" token="$2"
  shift 2
  local auth=()
  [ -n "$token" ] && auth=(-H "Authorization: Bearer $token")
  curl -s -o "$WORK/body" -w '%{http_code}' --max-time 10 "${auth[@]}" "$@" "http://127.0.0.1:$port/echo"
}

expect_status() { # name port token expected [curl args...]
  local name="$1" port="$2" token="$3" want="$4" got
  shift 4
  got="$(status_of "$port" "$token" "$@")"
  if [ "$got" = "$want" ]; then pass "$name -> $got"; else fail "$name -> $got (want $want)"; fi
}

check_forwarded() { # name port token
  local name="$1" port="$2" token="$3" got
  got="$(status_of "$port" "$token" -H "X-User: spoofed")"
  if [ "$got" != 200 ]; then fail "$name -> $got (want 200)"; return; fi
  if grep -qi '^authorization:' "$WORK/body"; then fail "$name: upstream saw Authorization"; return; fi
  local users
  users="$(grep -i '^x-user:' "$WORK/body" | tr '\n' '|')"
  if [ "$users" = "x-user: $SUB|" ]; then
    pass "$name -> 200, upstream saw X-User: $SUB only, no Authorization"
  else
    fail "$name: upstream X-User headers: '${users}'"
  fi
}

check_reuse() { # port
  local port="$1" i ports
  for i in 1 2 3 4 5 6; do
    [ "$(status_of "$port" "$T_VALID")" = 200 ] && grep '^upstream-seen-port:' "$WORK/body"
  done >"$WORK/ports"
  ports="$(sort -u "$WORK/ports" | wc -l)"
  if [ "$(wc -l <"$WORK/ports")" -ne 6 ]; then
    fail "connection reuse: not every request got a 200"
  elif [ "$ports" -le 2 ]; then
    pass "6 requests on 6 client connections used $ports upstream connection(s)"
  else
    fail "6 requests used $ports upstream connections (no pooling?)"
  fi
}

check_sse() { # port
  # Each event carries its send time; through the peer it must arrive within 100 ms
  # (a buffering proxy delivers them all at the end; a corking one adds ~200 ms each).
  local port="$1"
  python3 - "$port" "$T_VALID" "$SSE_GAP" >"$WORK/sse" <<'PY'
import re, socket, sys, time
port, token, gap = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sock = socket.create_connection(("127.0.0.1", port), timeout=float(gap) * 3 + 10)
sock.sendall(("GET /sse?gap=%s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
              "Accept: text/event-stream\r\nConnection: close\r\n\r\n" % (gap, token)).encode())
buf, seen = b"", 0
try:
    while seen < 3:
        data = sock.recv(65536)
        if not data:
            break
        now = time.time()
        buf += data
        for sent in re.findall(rb"sent=([0-9.]+)\n", buf)[seen:]:
            print("%.0f" % ((now - float(sent)) * 1000))
            seen += 1
except OSError:
    pass
PY
  local delays
  delays="$(paste -sd, "$WORK/sse")"
  if [ "$(wc -l <"$WORK/sse")" -eq 3 ] && awk '$1 > 100 { bad = 1 } END { exit bad }' "$WORK/sse"; then
    pass "SSE: 3 events ${SSE_GAP}s apart, each delivered within ${delays} ms of being sent"
  else
    fail "SSE events delayed or buffered (delays: ${delays:-none} ms)"
  fi
}

run_cases() { # port peer
  local port="$1" peer="$2"
  check_forwarded "valid token (+ spoofed X-User)" "$port" "$T_VALID"
  check_forwarded "valid token without nbf" "$port" "$T_NO_NBF"
  if [ -n "${KEYGATE_TOKEN:-}" ]; then
    local kg_sub
    kg_sub="$(printf '%s' "$KEYGATE_TOKEN" | cut -d. -f2 | tr '_-' '/+' | python3 -c 'import sys,base64,json; s=sys.stdin.read().strip(); print(json.loads(base64.b64decode(s+"="*(-len(s)%4)))["sub"])')"
    SUB="$kg_sub" check_forwarded "keygate dev-token (sub $kg_sub)" "$port" "$KEYGATE_TOKEN"
  fi
  check_forwarded "aud as array [other, audience]" "$port" "$T_AUD_ARRAY"
  expect_status "no Authorization" "$port" "" 401
  expect_status "Basic credentials" "$port" "" 401 -H "Authorization: Basic dXNlcjpwYXNz"
  expect_status "garbage bearer" "$port" "not.a.jwt" 401
  expect_status "wrong signature (other key)" "$port" "$T_WRONG_SIG" 401
  expect_status "tampered payload" "$port" "$T_TAMPERED" 401
  expect_status "expired" "$port" "$T_EXPIRED" 401
  expect_status "nbf in the future" "$port" "$T_NOT_YET" 401
  expect_status "no exp" "$port" "$T_NO_EXP" 401
  expect_status "wrong aud" "$port" "$T_WRONG_AUD" 401
  expect_status "wrong iss" "$port" "$T_WRONG_ISS" 401
  expect_status "alg HS256 keyed with the public key" "$port" "$T_HS256" 401
  expect_status "alg none" "$port" "$T_NONE" 401
  if [ "$peer" = envoy ]; then
    # jwt_authn has no required-claims option: forwarded, without X-User (documented)
    local got
    got="$(status_of "$port" "$T_NO_SUB")"
    if [ "$got" = 200 ] && ! grep -qi '^x-user:' "$WORK/body"; then
      pass "no sub -> 200 without X-User (known Envoy difference)"
    else
      fail "no sub -> $got"
    fi
  else
    expect_status "no sub" "$port" "$T_NO_SUB" 401
  fi
  check_reuse "$port"
  check_sse "$port"
}

stop() { # pid
  kill "$1" 2>/dev/null
  wait "$1" 2>/dev/null
}

# ---------------------------------------------------------------- peers
for peer in "${PEERS[@]}"; do
  LISTEN_PORT="$(free_port)"
  echo "== $peer (127.0.0.1:$LISTEN_PORT -> upstream 127.0.0.1:$UPSTREAM_PORT)"
  case "$peer" in
    haproxy)
      render "$HERE/haproxy.cfg.tmpl" "$WORK/haproxy.cfg" \
        LISTEN_PORT="$LISTEN_PORT" UPSTREAM_PORT="$UPSTREAM_PORT" ISSUER="$ISSUER" \
        AUDIENCE="$AUDIENCE" PUBKEY_PEM="$WORK/pubkey.pem" BIND_OPTIONS="" MAXCONN=9000 || { fail "render"; continue; }
      haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
      ;;
    envoy)
      ADMIN_PORT="$(free_port)"
      render "$HERE/envoy.yaml.tmpl" "$WORK/envoy.yaml" \
        LISTEN_PORT="$LISTEN_PORT" UPSTREAM_PORT="$UPSTREAM_PORT" ADMIN_PORT="$ADMIN_PORT" \
        ISSUER="$ISSUER" AUDIENCE="$AUDIENCE" CODEC=HTTP1 TRANSPORT_SOCKET="" EXTRA_CLUSTERS="" \
        JWKS_SOURCE="local_jwks: {inline_string: '$JWKS_ONE_LINE'}" || { fail "render"; continue; }
      envoy -c "$WORK/envoy.yaml" --concurrency 1 -l error --disable-hot-restart \
        >"$WORK/envoy.log" 2>&1 &
      ;;
    node)
      if [ ! -d "$HERE/node/node_modules" ]; then
        (cd "$HERE/node" && npm ci --omit=dev --no-audit --no-fund >"$WORK/npm.log" 2>&1) ||
          { fail "npm ci (see $WORK/npm.log)"; cat "$WORK/npm.log"; continue; }
      fi
      (cd "$HERE/node" && exec env LISTEN_PORT="$LISTEN_PORT" UPSTREAM_PORT="$UPSTREAM_PORT" \
        ISSUER="$ISSUER" AUDIENCE="$AUDIENCE" JWKS_FILE="$JWKS" NODE_ENV=production \
        node server.js) >"$WORK/node.log" 2>&1 &
      ;;
    *)
      fail "unknown peer $peer"
      continue
      ;;
  esac
  pid=$!
  PIDS+=("$pid")
  if ! wait_port "$LISTEN_PORT" 30; then
    fail "$peer did not start listening"
    cat "$WORK/$peer.log"
    stop "$pid"
    continue
  fi
  run_cases "$LISTEN_PORT" "$peer"
  stop "$pid"
  if [ -s "$WORK/$peer.log" ]; then
    echo "  ($peer output:)"
    sed 's/^/    /' "$WORK/$peer.log" | head -20
  fi
done

echo
if [ "$FAILS" -eq 0 ]; then
  echo "selftest: all checks passed"
else
  echo "selftest: $FAILS check(s) FAILED"
fi
[ "$FAILS" -eq 0 ]
