#!/bin/sh
# Runs `triton-hybrid agent [--once]` (the arguments) with the agent's secrets read from the files of
# the pod's Secret volumes (mode 0400; the kubelet adds group read for the pod's fsGroup, which the
# agent's *_file check refuses, so the secrets are handed over as env of this process only).
# A missing file stops the container with cat's error instead of starting with an empty secret.
set -eu
d=/run/secrets/triton-hybrid
TRITON_HYBRID__S3__ACCESS_KEY_ID="$(cat "$d/s3-credentials/AWS_ACCESS_KEY_ID")"
TRITON_HYBRID__S3__SECRET_ACCESS_KEY="$(cat "$d/s3-credentials/AWS_SECRET_ACCESS_KEY")"
TRITON_HYBRID__AGENT__ADMIN_KEY="$(cat "$d/admin-key/TRITON_ADMIN_KEY")"
export TRITON_HYBRID__S3__ACCESS_KEY_ID TRITON_HYBRID__S3__SECRET_ACCESS_KEY TRITON_HYBRID__AGENT__ADMIN_KEY
# The token only in the sidecar (the init container serves no API and does not mount it).
if [ -d "$d/agent-token" ]; then
    TRITON_HYBRID__AGENT__TOKEN="$(cat "$d/agent-token/AGENT_TOKEN")"
    export TRITON_HYBRID__AGENT__TOKEN
fi
exec "$@"
