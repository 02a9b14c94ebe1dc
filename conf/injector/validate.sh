#!/usr/bin/env bash
# Validates the injector's Kubernetes manifests against the Kubernetes API schemas, offline.
#
#   bash conf/injector/validate.sh [PATH/TO/pingsail-injector]
#
# Needs: pip install kubernetes-validate==1.37.0 (bundles the schemas; no network at run time).
# What is validated:
#   1. conf/injector/manifests/pingsail-injector.yaml (= the Helm chart rendered with default
#      values; `cargo test -p pingsail-injector --test chart` fails if the two differ), strict mode
#      (unknown fields rejected). The cert-manager Issuer/Certificate have no bundled schema: they
#      are reported as warnings and checked structurally by that chart test instead.
#   2. With a binary argument: kube-inject output for a set of Istio's reference inputs (Deployment,
#      Job, CronJob, Pod, StatefulSet, probes, traffic annotations, holdApplication), strict mode:
#      the injected pod templates must be valid Kubernetes objects.
#   3. A deliberately broken manifest must be rejected (the validator is really checking).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ref="$here/../../../shared/reference/istio/injection/pkg-kube-inject-testdata-inject"
k8s_version="1.33.0"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

command -v kubernetes-validate >/dev/null || { echo "validate.sh: kubernetes-validate not installed (pip install kubernetes-validate==1.37.0)" >&2; exit 2; }

kv() { kubernetes-validate --strict --quiet -k "$k8s_version" "$@"; }

echo "== manifests"
# Exit status is non-zero on any schema error; the two cert-manager kinds only warn.
kv "$here/manifests/pingsail-injector.yaml" || { echo "validate.sh: manifests failed validation" >&2; exit 1; }

if [ "${1:-}" != "" ]; then
  echo "== kube-inject output"
  for f in hello.yaml job.yaml cronjob.yaml pod.yaml statefulset.yaml hello-probes.yaml tcp-probes.yaml \
           traffic-annotations.yaml resource_annotations.yaml hello-probes-proxyHoldApplication-ProxyConfig.yaml \
           native-sidecar-opt-out.yaml daemonset.yaml; do
    "$1" kube-inject -f "$ref/$f" > "$tmp/$f"
    kv "$tmp/$f" || { echo "validate.sh: injected $f failed validation" >&2; exit 1; }
  done
fi

echo "== self-check: a broken manifest must fail"
cat > "$tmp/bad.yaml" <<'YAML'
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: bad}
webhooks:
- name: bad.example.io
  sideEffects: Sometimes
  admissionReviewVersions: [v1]
  clientConfig: {service: {name: x, namespace: y}}
  bogusField: true
YAML
if kv "$tmp/bad.yaml" >/dev/null 2>&1; then
  echo "validate.sh: the validator accepted a broken manifest" >&2; exit 1
fi
echo "validate.sh: ok"
