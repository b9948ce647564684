#!/usr/bin/env bash
# The manual certificate path, for clusters that forbid a workload from writing its own Secret and webhook
# configurations. Install with the manual-certs overlay (MODEL_CACHE_MANAGE_CERTS=false), then run this.
#
#   certs/generate.sh [--out DIR] [--days N] [--also-trust CA_FILE ...] [--apply]
#
# It makes a private CA and a serving certificate for the model-cache Service with `model-cache-webhook certs`,
# writes DIR/secret.yaml (the kubernetes.io/tls Secret model-cache-tls) and DIR/cabundle-patch.json (a JSON
# patch setting the caBundle of the one webhook in each configuration), and prints the kubectl commands that
# install them; --apply runs those commands against the current kubectl context instead.
#
# --also-trust keeps other CAs in the caBundle for a rotation without downtime: pass the CA being replaced and
# the webhook configurations trust both while the pods pick up the new certificate; DIR/cabundle-final-patch.json
# then drops the old CA (see certs/README.md).
#
# Environment: MODEL_CACHE_WEBHOOK (default model-cache-webhook) and KUBECTL (default kubectl) name the programs.
set -euo pipefail

SERVICE=model-cache
NAMESPACE=model-cache-system
SECRET=model-cache-tls
CONFIGURATION=model-cache
WEBHOOK=${MODEL_CACHE_WEBHOOK:-model-cache-webhook}
KUBECTL=${KUBECTL:-kubectl}

usage() {
  # The comment block at the top of this file.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}

out=$(dirname "$0")/out  # git-ignored
days=365
apply=false
also_trust=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
    --days) [ $# -ge 2 ] || usage; days=$2; shift 2 ;;
    --also-trust) [ $# -ge 2 ] || usage; also_trust+=("$2"); shift 2 ;;
    --apply) apply=true; shift ;;
    -h|--help) usage ;;
    *) echo "generate.sh: unknown argument $1" >&2; usage ;;
  esac
done
for ca in ${also_trust[@]+"${also_trust[@]}"}; do
  [ -f "$ca" ] || { echo "generate.sh: --also-trust $ca: no such file" >&2; exit 2; }
done

# The private key is written here: keep it out of other users' reach.
umask 077
mkdir -p "$out"

# ca.crt, tls.crt, tls.key (the CA key is never written: rotation makes a new CA).
"$WEBHOOK" certs --service "$SERVICE" --namespace "$NAMESPACE" --out "$out" --days "$days" >/dev/null

"$KUBECTL" create secret tls "$SECRET" --namespace "$NAMESPACE" \
  --cert "$out/tls.crt" --key "$out/tls.key" --dry-run=client -o yaml >"$out/secret.yaml"

# base64 of the PEM, on one line (portable: GNU base64 wraps, BSD base64 has no -w).
b64() { base64 <"$1" | tr -d '\n'; }
# JSON patch "add" also replaces an existing caBundle. Each configuration has exactly one webhook.
write_patch() {
  printf '[{"op":"add","path":"/webhooks/0/clientConfig/caBundle","value":"%s"}]\n' "$(b64 "$1")" >"$2"
}

cat "$out/ca.crt" ${also_trust[@]+"${also_trust[@]}"} >"$out/ca-bundle.pem"
write_patch "$out/ca-bundle.pem" "$out/cabundle-patch.json"
if [ ${#also_trust[@]} -gt 0 ]; then
  write_patch "$out/ca.crt" "$out/cabundle-final-patch.json"
fi

# The caBundle first: while it trusts the old and the new CA, neither the old nor the new serving certificate
# is rejected, whichever the pods serve at the moment.
step() {
  if [ "$apply" = true ]; then
    echo "+ $*"
    "$@"
  else
    echo "  $*"
  fi
}

echo "wrote $out/ca.crt $out/tls.crt $out/tls.key $out/secret.yaml $out/cabundle-patch.json"
[ "$apply" = true ] || echo "install with:"
step "$KUBECTL" patch mutatingwebhookconfiguration "$CONFIGURATION" --type=json --patch-file "$out/cabundle-patch.json"
step "$KUBECTL" patch validatingwebhookconfiguration "$CONFIGURATION" --type=json --patch-file "$out/cabundle-patch.json"
step "$KUBECTL" apply -f "$out/secret.yaml"
if [ ${#also_trust[@]} -gt 0 ]; then
  echo "once every webhook pod serves the new certificate (the pods re-read it within about two minutes), drop the old CA:"
  apply=false
  step "$KUBECTL" patch mutatingwebhookconfiguration "$CONFIGURATION" --type=json --patch-file "$out/cabundle-final-patch.json"
  step "$KUBECTL" patch validatingwebhookconfiguration "$CONFIGURATION" --type=json --patch-file "$out/cabundle-final-patch.json"
fi
