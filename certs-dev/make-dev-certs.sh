#!/usr/bin/env bash
# Throw-away dev certificates for kmi, made with the openssl CLI. Nothing here is secret or
# committed: everything goes to certs-dev/out/ (git-ignored), keys 0600 in a 0700 directory.
#
# kmi makes its own KMI root and infrastructure CA (`kmi kdc init`); these files are the
# *outside* world for trying kmi by hand: a customer's private CA for the CSR/upload flow, and
# local HTTPS origins for the proxy (one good, two it must block).
#
# Usage:
#   certs-dev/make-dev-certs.sh [all]                # make everything (skips files that exist)
#   certs-dev/make-dev-certs.sh --force [all]        # remake everything
#   certs-dev/make-dev-certs.sh sign-csr FILE [DAYS] # sign a kmi intermediate CSR with the dev customer root
#                                                    #   -> OUT/<FILE basename>.signed.pem (default 365 days)
#   certs-dev/make-dev-certs.sh clean                # delete OUT
#
# OUT is certs-dev/out unless KMI_DEV_CERTS_OUT is set.
#
# Made in OUT:
#   customer-root.pem / .key       stand-in for a customer's private root CA (ECDSA P-256, 2 years)
#   origin-ca.pem / .key           CA for local test origins: add it to the proxy's extra trusted CAs
#   origin-localhost.pem / .key    server cert for localhost, 127.0.0.1, ::1 from origin-ca (30 days)
#   origin-localhost.chain.pem     origin-localhost.pem followed by origin-ca.pem
#   origin-selfsigned.pem / .key   self-signed localhost cert: the proxy must show a block page
#   origin-wrongname.pem / .key    from origin-ca, but for wrong.invalid: the proxy must block it too
set -euo pipefail
umask 077

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${KMI_DEV_CERTS_OUT:-$here/out}"
force=0
if [[ "${1:-}" == "--force" ]]; then force=1; shift; fi
cmd="${1:-all}"

command -v openssl >/dev/null || { echo "make-dev-certs: openssl not found on PATH" >&2; exit 1; }

need() { [[ $force == 1 || ! -s "$OUT/$1" ]]; }

serial() { echo "0x$(openssl rand -hex 16 | sed 's/^./4/')"; } # positive, 16 bytes

# root NAME SUBJECT DAYS [extra -addext args...]
root() {
  local name=$1 subj=$2 days=$3; shift 3
  need "$name.pem" || return 0
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$OUT/$name.key" -out "$OUT/$name.pem" -days "$days" -subj "$subj" -set_serial "$(serial)" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" "$@" 2>/dev/null
  echo "made $OUT/$name.pem"
}

# leaf NAME CA SUBJECT SAN DAYS
leaf() {
  local name=$1 ca=$2 subj=$3 san=$4 days=$5
  need "$name.pem" || return 0
  local ext="$OUT/$name.ext"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" "subjectAltName=$san" "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" >"$ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$OUT/$name.key" \
    -out "$OUT/$name.csr" -subj "$subj" 2>/dev/null
  openssl x509 -req -in "$OUT/$name.csr" -CA "$OUT/$ca.pem" -CAkey "$OUT/$ca.key" -set_serial "$(serial)" \
    -days "$days" -extfile "$ext" -out "$OUT/$name.pem" 2>/dev/null
  rm -f "$OUT/$name.csr" "$ext"
  echo "made $OUT/$name.pem"
}

make_all() {
  mkdir -p "$OUT" && chmod 700 "$OUT"
  root customer-root "/O=Dev Customer Inc/CN=Dev Customer Root CA" 730
  root origin-ca "/O=kmi dev/CN=kmi dev origin CA" 365
  leaf origin-localhost origin-ca "/CN=localhost" "DNS:localhost,IP:127.0.0.1,IP:::1" 30
  cat "$OUT/origin-localhost.pem" "$OUT/origin-ca.pem" >"$OUT/origin-localhost.chain.pem"
  if need origin-selfsigned.pem; then
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -keyout "$OUT/origin-selfsigned.key" -out "$OUT/origin-selfsigned.pem" -days 30 -subj "/CN=localhost" \
      -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
    echo "made $OUT/origin-selfsigned.pem"
  fi
  leaf origin-wrongname origin-ca "/CN=wrong.invalid" "DNS:wrong.invalid" 30
  chmod 600 "$OUT"/*.key
  echo "dev certificates are in $OUT (throw-away; never use them outside a dev machine)"
}

sign_csr() {
  local csr=${1:?usage: make-dev-certs.sh sign-csr FILE [DAYS]} days=${2:-365}
  [[ -s "$OUT/customer-root.pem" ]] || make_all >/dev/null
  openssl req -in "$csr" -noout -verify 2>/dev/null || { echo "make-dev-certs: $csr is not a valid CSR" >&2; exit 1; }
  local base out ext
  base="$(basename "$csr")"; out="$OUT/${base%.*}.signed.pem"; ext="$OUT/.intermediate.ext"
  printf '%s\n' "basicConstraints=critical,CA:TRUE,pathlen:0" "keyUsage=critical,digitalSignature,keyCertSign,cRLSign" \
    "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" >"$ext"
  openssl x509 -req -in "$csr" -CA "$OUT/customer-root.pem" -CAkey "$OUT/customer-root.key" -set_serial "$(serial)" \
    -days "$days" -extfile "$ext" -out "$out" 2>/dev/null
  rm -f "$ext"
  chmod 644 "$out"
  echo "$out"
}

case "$cmd" in
  all) make_all ;;
  sign-csr) shift; sign_csr "$@" ;;
  clean) rm -rf "$OUT"; echo "removed $OUT" ;;
  *) echo "usage: make-dev-certs.sh [--force] [all | sign-csr FILE [DAYS] | clean]" >&2; exit 2 ;;
esac
