#!/bin/sh
# Runs `triton-hybrid entry` (the arguments) with the entry agent's secrets read from the files of
# the pod's Secret volume (mode 0400), handed over as env of this process only.
# A missing file stops the container with cat's error instead of starting with an empty secret.
set -eu
d=/run/secrets/triton-hybrid/entry
TRITON_HYBRID__S3__ACCESS_KEY_ID="$(cat "$d/AWS_ACCESS_KEY_ID")"
TRITON_HYBRID__S3__SECRET_ACCESS_KEY="$(cat "$d/AWS_SECRET_ACCESS_KEY")"
TRITON_HYBRID__ENTRY__TOKEN="$(cat "$d/ENTRY_TOKEN")"
export TRITON_HYBRID__S3__ACCESS_KEY_ID TRITON_HYBRID__S3__SECRET_ACCESS_KEY TRITON_HYBRID__ENTRY__TOKEN
exec "$@"
