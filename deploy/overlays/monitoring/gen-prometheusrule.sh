#!/bin/sh
# Regenerates prometheusrule.yaml from rules.yaml.
set -e
cd "$(dirname "$0")"
{
  cat <<'HEAD'
# The alerts of rules.yaml for the Prometheus Operator. GENERATED: edit
# rules.yaml, then run ./gen-prometheusrule.sh; tests/tests/monitoring.rs
# fails if this spec and rules.yaml differ.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: bulkhead
  namespace: bulkhead-system
  labels:
    app.kubernetes.io/name: bulkhead
    # kube-prometheus-stack's default ruleSelector; adjust to your
    # Prometheus's ruleSelector.
    release: kube-prometheus-stack
spec:
HEAD
  grep -v '^#' rules.yaml | sed -e 's/^\(.\)/  \1/'
} > prometheusrule.yaml
