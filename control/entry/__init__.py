"""The site entry agent: beside one HAProxy of a site, it applies the weights the control plane decided
(`_control/traffic.json` in S3) through HAProxy's local runtime socket and reports what HAProxy has
(control/traffic/entries.py; docs/traffic.md "Site entries")."""
