#!/usr/bin/env bash
# Without cert-manager: creates a CA and a serving certificate for the injector Service, stores
# them as the TLS Secret the Deployment mounts, and prints the caBundle for the webhook.
#
#   bash conf/injector/gen-certs.sh [NAMESPACE] [SERVICE] [SECRET]
#   helm install ... --set tls.mode=secret --set tls.caBundle="$(cat ca-bundle.b64)"
#
# Needs openssl and kubectl. Rotate by running it again and restarting nothing: the injector
# re-reads the mounted files when the Secret changes.
set -euo pipefail
ns="${1:-istio-system}"; svc="${2:-pingsail-injector}"; secret="${3:-pingsail-injector-tls}"
dir="$(mktemp -d)"; trap 'rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
  -subj "/CN=pingsail-injector-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$svc.$ns.svc" \
  -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
printf "subjectAltName=DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local\nextendedKeyUsage=serverAuth\n" "$svc" "$ns" "$svc" "$ns" > "$dir/ext"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 825 \
  -extfile "$dir/ext" -out "$dir/tls.crt" 2>/dev/null
kubectl -n "$ns" create secret tls "$secret" --cert="$dir/tls.crt" --key="$dir/tls.key" --dry-run=client -o yaml | kubectl apply -f -
base64 -w0 < "$dir/ca.crt" > ca-bundle.b64
echo "wrote ca-bundle.b64 (use as tls.caBundle)"
