"""Disaster-recovery drills (issue 8): break one part of a running stack on purpose, under a steady
client load, and measure detection, recovery, failed requests and per-site traffic.

    runner.py     drill stack (Tritons, HAProxy, optional control daemon), open-loop load, observer
    faults.py     the injectors: signals, link down/up, delay, restarts
    netns.py      network namespace + veth pair for a site (partition, latency)
    scenarios.py  one class per scenario: setup, inject, lift, targets
    report.py     analysis -> report.json, report.md, timeline.png
    cli.py        `triton-hybrid drill SCENARIO|all`
"""
