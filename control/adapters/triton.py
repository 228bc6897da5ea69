"""A thin adapter over Triton's HTTP repository and health API (DESIGN.md fact 6).

Repository calls (index, load, unload) carry the header ``admin-key: SECRET`` that Triton's
``--http-restricted-api=model-repository:admin-key=SECRET`` demands; the key is never logged or
put into an error message. Inference for smoke checks goes through tritonclient.http.
"""
from __future__ import annotations

import time

import numpy as np
import requests


class TritonAdminError(RuntimeError):
    """Triton refused or failed a repository call; the message names the instance and model."""


class TritonUnreachable(TritonAdminError):
    """The instance did not answer."""


_NP = {"TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
       "TYPE_UINT64": np.uint64, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
       "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
       "TYPE_STRING": np.object_}


class TritonAdmin:
    def __init__(self, name: str, http_url: str, admin_key: str | None, timeout: float = 120.0):
        self.name = name
        self.url = http_url.rstrip("/")
        self._headers = {"admin-key": admin_key} if admin_key else {}
        self.timeout = timeout

    @classmethod
    def for_instance(cls, settings, instance) -> "TritonAdmin":
        return cls(instance.name, instance.http_url, settings.triton.admin_key.get_secret_value())

    def _post(self, path: str, body: dict | None = None, timeout: float | None = None) -> requests.Response:
        try:
            return requests.post(f"{self.url}{path}", json=body or {}, headers=self._headers,
                                 timeout=timeout or self.timeout)
        except requests.RequestException as e:
            raise TritonUnreachable(f"Triton {self.name} ({self.url}) did not answer {path}: {type(e).__name__}") from None

    @staticmethod
    def _error(r: requests.Response) -> str:
        try:
            return r.json().get("error", r.text)
        except ValueError:
            return r.text[:500]

    # Health --------------------------------------------------------------------------------
    def server_ready(self, timeout: float = 2.0) -> bool:
        try:
            return requests.get(f"{self.url}/v2/health/ready", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False

    def server_live(self, timeout: float = 2.0) -> bool:
        try:
            return requests.get(f"{self.url}/v2/health/live", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False

    def model_ready(self, model: str, version: int | str | None = None, timeout: float = 5.0) -> bool:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "") + "/ready"
        try:
            return requests.get(f"{self.url}{path}", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False

    def wait_model_ready(self, model: str, version: int | str, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.model_ready(model, version):
                return True
            time.sleep(0.1)
        return False

    def model_config(self, model: str, version: int | str | None = None) -> dict:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "") + "/config"
        try:
            r = requests.get(f"{self.url}{path}", timeout=10)
        except requests.RequestException as e:
            raise TritonUnreachable(f"Triton {self.name} did not answer {path}: {type(e).__name__}") from None
        if r.status_code != 200:
            raise TritonAdminError(f"Triton {self.name}: config of {model} unavailable: {self._error(r)}")
        return r.json()

    # Repository API (admin key) -------------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[dict]:
        r = self._post("/v2/repository/index", {"ready": ready_only}, timeout=10)
        if r.status_code != 200:
            raise TritonAdminError(f"Triton {self.name}: repository index refused ({r.status_code}): {self._error(r)}")
        return r.json()

    def ready_versions(self, model: str) -> set[int]:
        out = set()
        for m in self.index():
            if m.get("name") == model and m.get("state") == "READY" and str(m.get("version", "")).isdigit():
                out.add(int(m["version"]))
        return out

    def load(self, model: str, config: dict | None = None) -> None:
        """Load (or reload) a model from the repository; blocks until Triton finished loading.
        Triton keeps the previously loaded versions serving until the new set is ready."""
        body = {}
        if config is not None:
            import json  # noqa: PLC0415
            body = {"parameters": {"config": json.dumps(config)}}
        r = self._post(f"/v2/repository/models/{model}/load", body)
        if r.status_code != 200:
            raise TritonAdminError(f"Triton {self.name}: loading {model} failed: {self._error(r)}")

    def unload(self, model: str, unload_dependents: bool = False) -> None:
        body = {"parameters": {"unload_dependents": True}} if unload_dependents else {}
        r = self._post(f"/v2/repository/models/{model}/unload", body)
        if r.status_code != 200:
            raise TritonAdminError(f"Triton {self.name}: unloading {model} failed: {self._error(r)}")

    # Inference for smoke checks ------------------------------------------------------------
    def infer_zeros(self, model: str, version: int | str | None = None) -> dict:
        """One inference with zero (or empty-string) inputs shaped from the model's config;
        returns {output name: array}. Raises TritonAdminError on any failure."""
        import tritonclient.http as th  # noqa: PLC0415
        from tritonclient.utils import InferenceServerException  # noqa: PLC0415

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
        host = self.url.split("://", 1)[-1]
        try:
            with th.InferenceServerClient(host, network_timeout=30.0, connection_timeout=5.0) as c:
                res = c.infer(model, inputs, model_version=str(version) if version is not None else "",
                              outputs=outputs or None)
        except InferenceServerException as e:
            raise TritonAdminError(f"Triton {self.name}: inference on {model} v{version} failed: {e.message()}") from None
        except Exception as e:  # noqa: BLE001 - connection problems
            raise TritonAdminError(f"Triton {self.name}: inference on {model} v{version} failed: {type(e).__name__}: {e}") from None
        return {o["name"]: res.as_numpy(o["name"]) for o in cfg.get("output", [])}
