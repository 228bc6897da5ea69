"""The smoke check a version passes before clients see it, and again right after it goes live.

A check is `fn(admin, name, version, version_dir, timeout_s)` and raises on failure; `name` is the
name under test (the candidate `<model>__candidate_v<N>` or the model itself). Which check a model
gets (`smoke_for`): a registered one; else `model_repository.smoke`'s stored request -- for the
ensemble itself, and run step by step for the ensemble's step models; else one inference with zero
inputs built from the model's config.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.http as th

from control.adapters.triton import TritonAdmin, TritonAdminError
from control.agent.repository import CANDIDATE_SUFFIX, ensemble_using

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


def _ensemble_smoke(mod) -> SmokeFn:
    """The stored search_ranking request and its reference answer (`<version dir>/smoke.json`),
    sent to whichever name is under test (candidate or live)."""
    def check(admin: TritonAdmin, name: str, version: int, version_dir: Path | None = None,
              timeout_s: float = 30.0) -> None:
        if version_dir is None or not (Path(version_dir) / "smoke.json").is_file():
            return default_smoke(admin, name, version, version_dir, timeout_s)
        inputs, expected = mod.smoke_request(version_dir)
        with admin.client(timeout_s) as c:
            res = c.infer(name, mod.to_infer_inputs(inputs, th), model_version=str(version))
        problems = mod.check_response({n: res.as_numpy(n) for n in mod.OUTPUTS}, expected)
        if problems:
            raise TritonAdminError("; ".join(problems))
    return check


def _step_smoke(mod) -> SmokeFn:
    """A step model of an ensemble: the ensemble's stored smoke request is run step by step through
    the loaded pipeline with the model under test (candidate or new version) in its place, and the
    end result must be a well-formed ranking. Without such an ensemble on the host: the generic check."""
    def check(admin: TritonAdmin, name: str, version: int, version_dir: Path | None = None,
              timeout_s: float = 30.0) -> None:
        model = name.split(CANDIDATE_SUFFIX, 1)[0]
        root = Path(version_dir).parent.parent if version_dir is not None else None
        ens, ens_dir = ensemble_using(root, model) if root is not None else (None, None)
        if ens is None:
            return default_smoke(admin, name, version, version_dir, timeout_s)
        inputs, _expected = mod.smoke_request(ens_dir)
        tensors = dict(inputs)
        pending = list(ens.ensemble_scheduling.step)
        with admin.client(timeout_s) as c:
            while pending:
                step = next((st for st in pending if all(v in tensors for v in st.input_map.values())), None)
                if step is None:
                    raise TritonAdminError(f"ensemble {ens.name}: steps {[st.model_name for st in pending]} "
                                           "cannot be fed (inputs missing)")
                pending.remove(step)
                ins = []
                for key, src in step.input_map.items():
                    arr = np.asarray(tensors[src])
                    dt = "BYTES" if arr.dtype == object else th.np_to_triton_dtype(arr.dtype)
                    i = th.InferInput(key, list(arr.shape), dt)
                    i.set_data_from_numpy(arr)
                    ins.append(i)
                is_target = step.model_name == model
                res = c.infer(name if is_target else step.model_name, ins,
                              model_version=str(version) if is_target else "",
                              outputs=[th.InferRequestedOutput(k) for k in step.output_map])
                for key, dst in step.output_map.items():
                    tensors[dst] = res.as_numpy(key)
        # Structure only (outputs present, shapes agree, scores ranked): the stored reference
        # answer belongs to the ensemble's version, and a retrained step legitimately changes it.
        # The ensemble's own smoke check, after its steps, compares against the reference.
        problems = mod.check_response({n: tensors.get(n) for n in mod.OUTPUTS}, None)
        if problems:
            raise TritonAdminError(f"the {ens.name} smoke request through {name} v{version}: " + "; ".join(problems))
    return check


def smoke_for(model: str) -> SmokeFn:
    if model in _REGISTERED:
        return _REGISTERED[model]
    try:
        # model_repository is optional on a host (an agent image may ship without it).
        mod = importlib.import_module("model_repository.smoke")
    except ImportError:
        return default_smoke
    if not hasattr(mod, "smoke_request"):
        return default_smoke
    if model == getattr(mod, "ENSEMBLE", None):
        return _ensemble_smoke(mod)
    return _step_smoke(mod)
