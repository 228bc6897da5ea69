"""Shared by the search_ranking ensemble's Python-backend models. The repository build copies this
file next to each one's model.py (with tokenizer.py / ranking.py where a step needs them), so a
version directory is self-contained; model.py's first line puts its own directory on sys.path.

    params = model_parameters(args)                    # the config's string parameters
    responses = respond(requests, handle, "ranker")    # handle(request) -> list of pb_utils.Tensor
    class TritonPythonModel(Step): ...                 # initialize -> setup(params, args); execute -> handle
    raise BadRequest("...")                            # from handle: HTTP 400 / gRPC INVALID_ARGUMENT
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class BadRequest(ValueError):
    """The client's fault: the request fails alone with INVALID_ARG, the server carries on."""


def bad_request(message):
    """A Triton error for one request; INVALID_ARG makes it HTTP 400 / gRPC INVALID_ARGUMENT."""
    try:
        return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):  # older Python backends: no error codes
        return pb_utils.TritonError(message)


def model_parameters(args):
    """(model config dict, {parameter: string value}) from TritonPythonModel.initialize's args."""
    config = json.loads(args["model_config"])
    return config, {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def flag(params, key, default=False):
    return str(params.get(key, str(default))).strip().lower() in ("1", "true", "yes", "on")


def error_response(step, e):
    """A response that fails one request: ValueError -> bad request, anything else -> internal error."""
    if isinstance(e, ValueError):
        return pb_utils.InferenceResponse(output_tensors=[], error=bad_request(f"bad request: {e}"))
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"{step} failed: {e!r}"))


def respond(requests, handle, step):
    """One response per request: handle(request) -> output tensors; one request's failure never
    takes the others (or the model) down."""
    out = []
    for request in requests:
        try:
            out.append(pb_utils.InferenceResponse(output_tensors=handle(request)))
        except Exception as e:  # noqa: BLE001
            out.append(error_response(step, e))
    return out


class Step:
    """Base of a step's TritonPythonModel: initialize hands the config's string parameters to
    setup(params, args); execute answers request by request with handle(request) (a step that
    batches a whole execute call overrides execute)."""

    name = None   # the step, as error messages name it: `class TritonPythonModel(Step, name="ranker")`

    def __init_subclass__(cls, name=None, **kw):
        super().__init_subclass__(**kw)
        cls.name = name

    def initialize(self, args):
        _, params = model_parameters(args)
        self.setup(params, args)

    def setup(self, params, args):
        raise NotImplementedError

    def handle(self, request):
        raise NotImplementedError

    def execute(self, requests):
        return respond(requests, self.handle, self.name)


def load_intents(here):
    """intents.json of the version dir `here`: the category names, as a BYTES array by intent index."""
    with open(os.path.join(here, "intents.json")) as f:
        return np.array([str(n).encode() for n in json.load(f)], dtype=object)


def candidate_counters(args, model):
    """(unknown ids, duplicate ids) counters of a step that looks candidates up, labelled with the
    model name (`model` where Triton does not say) and version."""
    labels = {"model": args.get("model_name", model), "version": str(args.get("model_version", ""))}
    return (counter("search_ranking_unknown_candidates_total",
                    "Candidate ids not in the feature snapshot, ranked with cold-start features", labels),
            counter("search_ranking_duplicate_candidates_total",
                    "Duplicate candidate ids dropped (each id is ranked once)", labels))


def input_array(request, name):
    """The input as a numpy array (None when an optional input is absent)."""
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def request_inputs(request):
    """{input name: numpy array (a view of Triton's buffer)} of one request, in one pass:
    get_input_tensor_by_name lists and scans every input on each call."""
    return {t.name(): t.as_numpy() for t in request.inputs()}


def request_top_k(request, default, values=None):
    """top_k from the optional TOP_K input (`values`, the request's TOP_K array, where the caller
    has it), else the request parameter `top_k`, else `default`."""
    if values is None:
        values = input_array(request, "TOP_K")
    if values is not None:
        values = values.reshape(-1)
        if values.size == 0:
            raise BadRequest("TOP_K is empty")
        return int(values[0])
    raw = request.parameters()
    # most requests carry no parameters ("{}"): no JSON parse for them
    params = json.loads(raw) if raw and raw != "{}" else {}
    k = params.get("top_k", default)
    if isinstance(k, bool) or not isinstance(k, (int, str)):
        raise BadRequest(f"request parameter top_k must be an integer, got {k!r}")
    try:
        return int(k)
    except ValueError:
        raise BadRequest(f"request parameter top_k must be an integer, got {k!r}") from None


def decode_queries(raw, max_query_bytes):
    """QUERY (BYTES [B,1]) -> list of str; empty, blank, over-long or non-UTF-8: BadRequest."""
    queries = []
    for i, q in enumerate(raw.reshape(-1)):
        data = q if isinstance(q, bytes) else str(q).encode("utf-8")
        if len(data) > max_query_bytes:
            raise BadRequest(f"QUERY[{i}] has {len(data)} bytes; the maximum is {max_query_bytes}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"QUERY[{i}] is not valid UTF-8") from None
        if not text.strip():
            raise BadRequest(f"QUERY[{i}] is empty")
        queries.append(text)
    return queries


_FAMILIES = {}   # a MetricFamily must outlive its Metric objects: kept for the life of the stub


class Counter:
    """A Triton custom metric counter (exposed on Triton's /metrics next to its own metrics). Where
    the Python backend has no custom metrics, or an increment fails, the step serves on without."""

    def __init__(self, name, description, labels):
        self.metric = None
        try:
            family = _FAMILIES.get(name)
            if family is None:
                family = _FAMILIES[name] = pb_utils.MetricFamily(name=name, description=description,
                                                                 kind=pb_utils.MetricFamily.COUNTER)
            self.metric = family.Metric(labels=labels)
        except Exception:  # noqa: BLE001
            self.metric = None

    def increment(self, n):
        if self.metric is not None and n:
            try:
                self.metric.increment(n)
            except Exception:  # noqa: BLE001 - a metric never fails a request
                pass


def counter(name, description, labels):
    return Counter(name, description, labels)


def onnx_session(path, params):
    """An onnxruntime CPU session with the config's thread counts (1 intra-op thread by default:
    Triton runs several models and requests side by side)."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle intra-op threads sleep instead of spinning: the cores are shared with Triton, the other
    # step and the clients.
    options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "0"))
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_graph(here, params):
    """(session of the config's `onnx_file` in the version dir `here`, batch_rows): batch_rows is
    false for a graph whose rows are not independent of the batch (dynamic INT8 quantization)."""
    return (onnx_session(os.path.join(here, params.get("onnx_file", "model.onnx")), params),
            flag(params, "batch_rows", True))
