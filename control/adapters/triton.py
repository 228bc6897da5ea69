"""A thin adapter over Triton's health and repository API, through tritonclient.http (DESIGN.md fact 6).

Repository calls (index, load, unload) carry the header ``admin-key: SECRET`` that Triton's
``--http-restricted-api=model-repository:admin-key=SECRET`` demands; the key is never logged or
put into an error message. A client is made per call: tritonclient.http's client is not
thread-safe and the control plane calls from scheduler threads.
"""
from __future__ import annotations

import json

import numpy as np
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from control.mirror.manifest import version_of
from control.waiting import WaitTimeout, wait_until


class TritonAdminError(RuntimeError):
    """Triton refused or failed a repository call; the message names the instance and model."""


class TritonUnreachable(TritonAdminError):
    """The instance did not answer."""


_NP = {"TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
       "TYPE_UINT64": np.uint64, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
       "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
       "TYPE_STRING": np.object_}


def ready_versions_of(index: list[dict], model: str | None = None) -> dict[str, set[int]]:
    """{model: versions READY} from a repository index (one parser for every caller)."""
    out: dict[str, set[int]] = {}
    for m in index:
        version = version_of(str(m.get("version", "")))
        if m.get("state") == "READY" and version is not None and model in (None, m.get("name")):
            out.setdefault(m["name"], set()).add(version)
    return out


class TritonAdmin:
    def __init__(self, name: str, http_url: str, admin_key: str | None, timeout: float = 120.0):
        self.name = name
        self.url = http_url.rstrip("/")
        self.host = self.url.split("://", 1)[-1]
        self._headers = {"admin-key": admin_key} if admin_key else {}
        self.timeout = timeout

    def client(self, timeout: float | None = None) -> th.InferenceServerClient:
        t = timeout or self.timeout
        return th.InferenceServerClient(self.host, connection_timeout=min(t, 5.0), network_timeout=t)

    def _call(self, what: str, fn, timeout: float | None = None):
        """Run fn(client); a refusal becomes TritonAdminError, no answer TritonUnreachable."""
        try:
            with self.client(timeout) as c:
                return fn(c)
        except InferenceServerException as e:
            raise TritonAdminError(f"Triton {self.name}: {what} refused: {e.message()}") from None
        except Exception as e:  # noqa: BLE001 - socket/timeout errors of the HTTP client
            raise TritonUnreachable(f"Triton {self.name} ({self.url}) did not answer ({what}): "
                                    f"{type(e).__name__}") from None

    def _check(self, what: str, fn, timeout: float) -> bool:
        try:
            return bool(self._call(what, fn, timeout))
        except TritonAdminError:
            return False

    # Health --------------------------------------------------------------------------------
    def server_ready(self, timeout: float = 2.0) -> bool:
        return self._check("ready", lambda c: c.is_server_ready(), timeout)

    def server_live(self, timeout: float = 2.0) -> bool:
        return self._check("live", lambda c: c.is_server_live(), timeout)

    def model_ready(self, model: str, version: int | str | None = None, timeout: float = 5.0) -> bool:
        v = "" if version is None else str(version)
        return self._check(f"ready of {model}", lambda c: c.is_model_ready(model, v), timeout)

    def wait_model_ready(self, model: str, version: int | str, timeout: float = 60.0) -> bool:
        try:
            return wait_until(lambda: self.model_ready(model, version), timeout, f"{model} v{version} ready on {self.name}")
        except WaitTimeout:
            return False

    def model_config(self, model: str, version: int | str | None = None) -> dict:
        v = "" if version is None else str(version)
        return self._call(f"config of {model}", lambda c: c.get_model_config(model, v), timeout=10)

    # Repository API (admin key) -------------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[dict]:
        idx = self._call("repository index", lambda c: c.get_model_repository_index(headers=self._headers), timeout=10)
        return [m for m in idx if not ready_only or m.get("state") == "READY"]

    def ready_versions(self, model: str) -> set[int]:
        return ready_versions_of(self.index(), model).get(model, set())

    def load(self, model: str, config: dict | None = None) -> None:
        """Load (or reload) a model from the repository; blocks until Triton finished loading.
        Triton keeps the previously loaded versions serving until the new set is ready."""
        cfg = None if config is None else json.dumps(config)
        self._call(f"loading {model}", lambda c: c.load_model(model, headers=self._headers, config=cfg))

    def unload(self, model: str, unload_dependents: bool = False) -> None:
        self._call(f"unloading {model}",
                   lambda c: c.unload_model(model, headers=self._headers, unload_dependents=unload_dependents))

    # Inference for smoke checks ------------------------------------------------------------
    def infer_zeros(self, model: str, version: int | str | None = None) -> dict:
        """One inference with zero (or empty-string) inputs shaped from the model's config;
        returns {output name: array}. Raises TritonAdminError on any failure."""
        cfg = self.model_config(model, version)
        batch = int(cfg.get("max_batch_size", 0) or 0)
        inputs = []
        for spec in cfg.get("input", []):
            dims = [1 if int(d) < 0 else int(d) for d in spec.get("dims", [])]
            shape = ([1] if batch > 0 else []) + dims
            dt = spec.get("data_type", "TYPE_FP32")
            if dt not in _NP:
                raise TritonAdminError(f"smoke check of {model}: input {spec.get('name')} has type {dt} that the "
                                       "generic check cannot build; register a smoke check for this model")
            arr = np.full(shape, b"", dtype=np.object_) if dt == "TYPE_STRING" else np.zeros(shape, dtype=_NP[dt])
            inp = th.InferInput(spec["name"], shape, dt.removeprefix("TYPE_").replace("STRING", "BYTES"))
            inp.set_data_from_numpy(arr, binary_data=True)
            inputs.append(inp)
        outputs = [th.InferRequestedOutput(o["name"], binary_data=True) for o in cfg.get("output", [])]
        try:
            with self.client(30.0) as c:
                res = c.infer(model, inputs, model_version=str(version) if version is not None else "",
                              outputs=outputs or None)
        except InferenceServerException as e:
            raise TritonAdminError(f"Triton {self.name}: inference on {model} v{version} failed: {e.message()}") from None
        except Exception as e:  # noqa: BLE001 - connection problems
            raise TritonAdminError(f"Triton {self.name}: inference on {model} v{version} failed: {type(e).__name__}: {e}") from None
        return {o["name"]: res.as_numpy(o["name"]) for o in cfg.get("output", [])}
