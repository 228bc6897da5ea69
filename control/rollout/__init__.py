"""Model version rollout: the canary phase machine (phases.py, pure), the canary analysis
(analysis.py, pure), per-model Triton metrics (signals.py), the loop that writes S3 desired state
(controller.py) and its audit (audit.py). docs/rollout.md describes the phases, reasons and knobs."""
