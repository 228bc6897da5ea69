#!/bin/sh
# Runs the control plane (the arguments) with its secrets read from the files of the pod's Secret
# volume (mode 0400), handed over as env of this process only. Route53 (DNS between the site entries)
# uses the same principal as S3 (deploy/iam/control-plane-policy.json).
# A missing file stops the container with cat's error instead of starting with an empty secret.
set -eu
d=/run/secrets/triton-hybrid/control
TRITON_HYBRID__S3__ACCESS_KEY_ID="$(cat "$d/AWS_ACCESS_KEY_ID")"
TRITON_HYBRID__S3__SECRET_ACCESS_KEY="$(cat "$d/AWS_SECRET_ACCESS_KEY")"
TRITON_HYBRID__CONTROL__ROUTE53__ACCESS_KEY_ID="$TRITON_HYBRID__S3__ACCESS_KEY_ID"
TRITON_HYBRID__CONTROL__ROUTE53__SECRET_ACCESS_KEY="$TRITON_HYBRID__S3__SECRET_ACCESS_KEY"
TRITON_HYBRID__CONTROL__ADMIN_TOKEN="$(cat "$d/ADMIN_TOKEN")"
export TRITON_HYBRID__S3__ACCESS_KEY_ID TRITON_HYBRID__S3__SECRET_ACCESS_KEY TRITON_HYBRID__CONTROL__ADMIN_TOKEN
export TRITON_HYBRID__CONTROL__ROUTE53__ACCESS_KEY_ID TRITON_HYBRID__CONTROL__ROUTE53__SECRET_ACCESS_KEY
exec "$@"
