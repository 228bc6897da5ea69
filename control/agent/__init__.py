"""The host agent: beside every Triton, the only writer of that host's model repository.

One concern a module (like Seldon Core v2's agent, DESIGN.md "Hosts, agents and desired state"):

    errors.py      AgentError and its kinds
    pull.py        download + verify (size, sha256), resumable, staged then renamed into place
    repository.py  the host's repository layout, live config.pbtxt, candidates, retention
    smoke.py       the smoke checks a version passes before clients see it
    loader.py      candidate load + smoke, go live, restore, through Triton's repository API
    converge.py    one pass: desired targets -> decisions (pure) -> actions -> model status
    api.py         HTTP: /healthz, /ready, /metrics, /v1/status (token)
    main.py        the loop: read desired (ETag-conditional), converge, write status
"""
