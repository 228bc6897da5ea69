"""The smoke check a version passes before clients see it, and again right after it goes live.

A check is `fn(admin, name, version, version_dir, timeout_s)` and raises on failure; `name` is the
name under test (the candidate `<model>__candidate_v<N>` or the model itself). Which check a model
gets (`smoke_for`): a registered one; else `model_repository.smoke`'s stored request -- for the
ensemble itself, and run step by step for the ensemble's step models; else one inference with zero
inputs built from the model's config.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.http as th

from control.adapters.triton import TritonAdmin, TritonAdminError
from control.agent.repository import CANDIDATE_SUFFIX, ensemble_using
from model_repository import smoke as repo_smoke

SmokeFn = Callable[[TritonAdmin, str, int, "Path | None", float], None]

_REGISTERED: dict[str, SmokeFn] = {}


def register_smoke(model: str, fn: SmokeFn) -> None:
    """A smoke check for `model`: fn(admin, name_to_call, version, version_dir, timeout_s) raises on failure."""
    _REGISTERED[model] = fn


def default_smoke(admin: TritonAdmin, name: str, version: int, version_dir: Path | None = None,
                  timeout_s: float = 30.0) -> None:
    """Ready + one inference with zero inputs built from the model's config."""
    if not admin.model_ready(name, version):
        raise TritonAdminError(f"{name} v{version} is not ready on {admin.name}")
    admin.infer_zeros(name, version)


def _ensemble_smoke(admin: TritonAdmin, name: str, version: int, version_dir: Path | None = None,
                    timeout_s: float = 30.0) -> None:
    """The stored search_ranking request and its reference answer (`<version dir>/smoke.json`),
    sent to whichever name is under test (candidate or live)."""
    if version_dir is None or not (Path(version_dir) / "smoke.json").is_file():
        return default_smoke(admin, name, version, version_dir, timeout_s)
    inputs, expected = repo_smoke.smoke_request(version_dir)
    with admin.client(timeout_s) as c:
        res = c.infer(name, repo_smoke.to_infer_inputs(inputs, th), model_version=str(version))
    problems = repo_smoke.check_response({n: res.as_numpy(n) for n in repo_smoke.OUTPUTS}, expected)
    if problems:
        raise TritonAdminError("; ".join(problems))


def _step_smoke(admin: TritonAdmin, name: str, version: int, version_dir: Path | None = None,
                timeout_s: float = 30.0) -> None:
    """A step model of an ensemble: the ensemble's stored smoke request is run step by step through
    the loaded pipeline with the model under test (candidate or new version) in its place, and the
    end result must be a well-formed ranking. Without such an ensemble on the host: the generic check."""
    model = name.split(CANDIDATE_SUFFIX, 1)[0]
    root = Path(version_dir).parent.parent if version_dir is not None else None
    ens, ens_dir = ensemble_using(root, model) if root is not None else (None, None)
    if ens is None:
        return default_smoke(admin, name, version, version_dir, timeout_s)
    inputs, _expected = repo_smoke.smoke_request(ens_dir)
    tensors = dict(inputs)
    pending = list(ens.ensemble_scheduling.step)
    with admin.client(timeout_s) as c:
        while pending:
            step = next((st for st in pending if all(v in tensors for v in st.input_map.values())), None)
            if step is None:
                raise TritonAdminError(f"ensemble {ens.name}: steps {[st.model_name for st in pending]} "
                                       "cannot be fed (inputs missing)")
            pending.remove(step)
            ins = repo_smoke.to_infer_inputs({k: np.asarray(tensors[src]) for k, src in step.input_map.items()}, th)
            is_target = step.model_name == model
            res = c.infer(name if is_target else step.model_name, ins,
                          model_version=str(version) if is_target else "",
                          outputs=[th.InferRequestedOutput(k) for k in step.output_map])
            for key, dst in step.output_map.items():
                tensors[dst] = res.as_numpy(key)
    # Structure only (outputs present, shapes agree, scores ranked): the stored reference
    # answer belongs to the ensemble's version, and a retrained step legitimately changes it.
    # The ensemble's own smoke check, after its steps, compares against the reference.
    problems = repo_smoke.check_response({n: tensors.get(n) for n in repo_smoke.OUTPUTS}, None)
    if problems:
        raise TritonAdminError(f"the {ens.name} smoke request through {name} v{version}: " + "; ".join(problems))


def smoke_for(model: str) -> SmokeFn:
    if model in _REGISTERED:
        return _REGISTERED[model]
    return _ensemble_smoke if model == repo_smoke.ENSEMBLE else _step_smoke
