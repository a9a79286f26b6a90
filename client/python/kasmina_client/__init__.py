"""kasmina_client: a thin Python client for kasminad (kasmina.v1 over gRPC).

Tensors go in and come out as numpy arrays; everything else is the protobuf messages of
kasmina.v1 (``kasmina_client.pb``, generated into ``kasmina_client._proto``), whose fields are
the proto's. Install it with ``pip install ./client/python`` (client/python/README.md), or put
``build/client/python`` (the CMake build fills it) on ``PYTHONPATH``::

    from kasmina_client import Client
    with Client("unix:/run/kasmina/kasminad.sock") as c:
        c.create_model("m1", permissive_gates=True)
        c.germinate("m1", "r0c1", "conv_light")
        logits = c.forward("m1", np.zeros((2, 3, 32, 32), np.float32))

Errors raise :class:`KasminaError` (a ``grpc.RpcError`` is never leaked), whose ``code`` is the
``grpc.StatusCode`` and ``ksm_error`` the engine's code name (``"KSM_ENOSLOT"``) when the server
sent one. A value the server accepted but that looks wrong (a ``val_accuracy`` of 0.87 where a
percentage is taken) or a default it took for a zero field comes back as a
:class:`KasminaWarning` (Python's ``warnings``; the server's ``kasmina-warning`` trailing
metadata).
"""

from __future__ import annotations

import collections
import os
import warnings
import zlib

import numpy as np

__version__ = "0.16.0"

try:
    import grpc
    from kasmina_client._proto.kasmina.v1 import kasmina_pb2 as pb
    from kasmina_client._proto.kasmina.v1 import kasmina_pb2_grpc as pb_grpc
    from kasmina_client._proto.grpc.health.v1 import health_pb2
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kasmina_client needs grpcio, protobuf and its generated stubs "
        "(kasmina_client._proto): install the wheel (pip install ./client/python) or build the "
        "project and put build/client/python on PYTHONPATH: " + str(e)
    ) from e

__all__ = [
    "__version__",
    "Client",
    "KasminaError",
    "KasminaWarning",
    "ForwardResult",
    "ConfigResult",
    "EvaluateResult",
    "ShapleyEstimate",
    "InteractionTerm",
    "tensor_from_numpy",
    "tensor_to_numpy",
    "default_target",
    "pb",
]

# ---------------------------------------------------------------------------------------------
# Tensors

_NP_OF_DTYPE = {
    pb.DTYPE_F32: np.dtype("<f4"),
    pb.DTYPE_F16: np.dtype("<f2"),
    pb.DTYPE_I64: np.dtype("<i8"),
    pb.DTYPE_I32: np.dtype("<i4"),
}
_DTYPE_NAMES = {
    "f32": pb.DTYPE_F32,
    "float32": pb.DTYPE_F32,
    "f16": pb.DTYPE_F16,
    "float16": pb.DTYPE_F16,
    "bf16": pb.DTYPE_BF16,
    "bfloat16": pb.DTYPE_BF16,
    "i64": pb.DTYPE_I64,
    "int64": pb.DTYPE_I64,
    "i32": pb.DTYPE_I32,
    "int32": pb.DTYPE_I32,
}
_ITEMSIZE = {pb.DTYPE_F32: 4, pb.DTYPE_F16: 2, pb.DTYPE_BF16: 2, pb.DTYPE_I64: 8, pb.DTYPE_I32: 4}


def _dtype(d):
    """A DType value from a DType int, a name ("f32", "bf16", ...) or a numpy dtype."""
    if d is None:
        return pb.DTYPE_UNSPECIFIED
    if isinstance(d, str):
        key = d.lower().replace("dtype_", "")
        if key not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {d!r}: use f32, f16, bf16, i64 or i32")
        return _DTYPE_NAMES[key]
    if isinstance(d, int):
        return d
    nd = np.dtype(d).newbyteorder("<")
    for k, v in _NP_OF_DTYPE.items():
        if nd == v:
            return k
    raise ValueError(f"numpy dtype {nd} has no kasmina dtype")


def _f32_to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns, rounded to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(a, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    out = rounded.astype("<u2")
    out[nan] = ((bits[nan] >> 16) | 0x40).astype("<u2")
    return out


def tensor_from_numpy(a, dtype=None):
    """A kasmina.v1.Tensor from an array-like.

    dtype None keeps the array's own: float32, float16, int64, int32 map one to one; float64 is
    sent as F32 and other integer kinds as I64. dtype "bf16" converts floats to bfloat16 (round
    to nearest even); any other dtype casts first.
    """
    arr = np.asarray(a)
    if dtype is None:
        if arr.dtype == np.float64:
            d = pb.DTYPE_F32
        elif arr.dtype.kind in "iub" and not (arr.dtype.kind == "i" and arr.dtype.itemsize in (4, 8)):
            d = pb.DTYPE_I64
        else:
            d = _dtype(arr.dtype)
    else:
        d = _dtype(dtype)
    if d == pb.DTYPE_BF16:
        data = _f32_to_bf16_bits(arr.astype(np.float32)).tobytes()
    elif d in _NP_OF_DTYPE:
        data = np.ascontiguousarray(arr, dtype=_NP_OF_DTYPE[d]).tobytes()
    else:
        raise ValueError(f"dtype {dtype!r} cannot be sent")
    return pb.Tensor(dtype=d, shape=[int(s) for s in arr.shape], data=data)


def tensor_to_numpy(t, bf16_as_float32=True):
    """A numpy array (a copy) from a kasmina.v1.Tensor; BF16 becomes float32 (exact)."""
    if t.dtype not in _ITEMSIZE:
        raise ValueError(f"tensor dtype {t.dtype} is not a kasmina dtype")
    shape = tuple(int(s) for s in t.shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"tensor shape {shape} has a negative dimension")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(t.data) != n * _ITEMSIZE[t.dtype]:
        raise ValueError(
            f"tensor data is {len(t.data)} bytes, expected {n * _ITEMSIZE[t.dtype]} for "
            f"shape {list(shape)}"
        )
    if t.dtype == pb.DTYPE_BF16:
        bits = np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16
        arr = bits.view(np.float32) if bf16_as_float32 else np.frombuffer(t.data, "<u2")
    else:
        arr = np.frombuffer(t.data, dtype=_NP_OF_DTYPE[t.dtype])
    return arr.reshape(shape).astype(arr.dtype.newbyteorder("="), copy=True)


# ---------------------------------------------------------------------------------------------
# Enums from names

def _enum(enum_type, prefix, v, what):
    if v is None:
        return 0
    if isinstance(v, str):
        name = v.upper()
        if not name.startswith(prefix):
            name = prefix + name
        try:
            return enum_type.Value(name)
        except ValueError:
            names = ", ".join(n[len(prefix):].lower() for n in enum_type.keys())
            raise ValueError(f"{what} {v!r} is not one of {names}") from None
    return int(v)


def _stage(v):
    return 0 if v in (None, "next") else _enum(pb.Stage, "STAGE_", v, "stage")


def _curve(v):
    return _enum(pb.AlphaCurve, "ALPHA_CURVE_", v, "curve")


def _algorithm(v):
    return _enum(pb.AlphaAlgorithm, "ALPHA_ALGORITHM_", v, "alpha algorithm")


def _gate(v):
    return _enum(pb.GateLevel, "GATE_", v, "gate")


def _attribution(v):
    return _enum(pb.AttributionMode, "ATTRIBUTION_", v, "attribution")


def stage_name(v):
    """STAGE_TRAINING -> "TRAINING"."""
    return pb.Stage.Name(v).replace("STAGE_", "")


# ---------------------------------------------------------------------------------------------
# Errors and results

class KasminaError(Exception):
    """A failed call: code (grpc.StatusCode), details (the server's sentence), ksm_error."""

    def __init__(self, code, details, ksm_error=None, method=None):
        self.code = code
        self.details = details
        self.ksm_error = ksm_error
        self.method = method
        name = code.name if hasattr(code, "name") else str(code)
        super().__init__(f"{method or 'call'}: {details} ({ksm_error or '-'}, {name})")


class KasminaWarning(UserWarning):
    """The server accepted a call and said something about it (docs/logging.md#warnings)."""


ForwardResult = collections.namedtuple("ForwardResult", "output model_generation compute_ns")
ConfigResult = collections.namedtuple("ConfigResult", "name loss accuracy correct total logits")
EvaluateResult = collections.namedtuple(
    "EvaluateResult", "results model_generation compute_ns shapley interactions",
    defaults=((), ()))
# Attribution (docs/evaluate.md#attribution), accuracy points.
ShapleyEstimate = collections.namedtuple("ShapleyEstimate",
                                         "slot_id mean std n_samples algorithm marginal")
InteractionTerm = collections.namedtuple("InteractionTerm", "slot_a slot_b interaction")


def default_target():
    """The daemon's default socket: $XDG_RUNTIME_DIR/kasmina/kasminad.sock, or
    /run/kasmina/kasminad.sock for root; KASMINA_ADDR overrides both."""
    env = os.environ.get("KASMINA_ADDR")
    if env:
        return "unix:" + env if env.startswith("/") else env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() != 0 and xdg:
        return f"unix:{xdg}/kasmina/kasminad.sock"
    return "unix:/run/kasmina/kasminad.sock"


# ---------------------------------------------------------------------------------------------
# The client

class Client:
    """A connection to kasminad. Every method is one RPC with a deadline (``timeout`` seconds,
    per call overridable with ``timeout=``); a failure raises :class:`KasminaError`."""

    def __init__(self, target=None, timeout=30.0, token=None, max_message=64 << 20,
                 wait_for_ready=False, credentials=None):
        self.target = target or default_target()
        self.max_message = max_message
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        opts = [
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
        ]
        if credentials is not None:
            self._channel = grpc.secure_channel(self.target, credentials, options=opts)
        else:
            self._channel = grpc.insecure_channel(self.target, options=opts)
        self._metadata = (("authorization", "Bearer " + token),) if token else None
        self._stub = pb_grpc.KasminaStub(self._channel)
        self._health = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, name, fn, req, timeout=None):
        try:
            reply, call = fn.with_call(req, timeout=timeout or self.timeout,
                                       metadata=self._metadata,
                                       wait_for_ready=self.wait_for_ready)
        except grpc.RpcError as e:
            raise _error(e, name) from None
        for k, v in call.trailing_metadata() or ():
            if k == "kasmina-warning":
                warnings.warn(f"{name}: {v}", KasminaWarning, stacklevel=3)
        return reply

    # ---- server ----

    def server_info(self, timeout=None):
        return self._call("GetServerInfo", self._stub.GetServerInfo, pb.GetServerInfoRequest(),
                          timeout)

    def health(self, service="", timeout=None):
        """"SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        r = self._call("Check", self._health, health_pb2.HealthCheckRequest(service=service),
                       timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    # ---- models ----

    def create_model(self, model_id="", topology="cnn", cnn=None, transformer=None, slots=(),
                     device="", dtype=None, init_seed=0, permissive_gates=False,
                     auto_forward_gates=(), timeout=None):
        """cnn / transformer: dicts of CnnHostSpec / TransformerHostSpec fields (absent =
        defaults); topology picks the host when neither is given."""
        req = pb.CreateModelRequest(model_id=model_id, slots=list(slots), device=device,
                                    dtype=_dtype(dtype), init_seed=init_seed,
                                    permissive_gates=permissive_gates,
                                    auto_forward_gates=[_gate(g) for g in auto_forward_gates])
        if transformer is not None or (cnn is None and topology == "transformer"):
            req.transformer.CopyFrom(pb.TransformerHostSpec(**(transformer or {})))
        else:
            req.cnn.CopyFrom(pb.CnnHostSpec(**(cnn or {})))
        return self._call("CreateModel", self._stub.CreateModel, req, timeout)

    def get_model(self, model_id, timeout=None):
        return self._call("GetModel", self._stub.GetModel, pb.GetModelRequest(model_id=model_id),
                          timeout)

    def list_models(self, timeout=None):
        return list(self._call("ListModels", self._stub.ListModels, pb.ListModelsRequest(),
                               timeout).models)

    def delete_model(self, model_id, timeout=None):
        """Returns the bytes freed."""
        return self._call("DeleteModel", self._stub.DeleteModel,
                          pb.DeleteModelRequest(model_id=model_id), timeout).freed_bytes

    def load_weights(self, model_id, safetensors, strict=False, stream=None, chunk_bytes=2 << 20,
                     timeout=None):
        """safetensors: the file's bytes or a path. stream: True sends it in CRC-32-checked
        chunks (LoadWeightsStream, any size), False in one LoadWeights message (at most the
        daemon's max-message-bytes and this client's max_message), None (the default) streams
        when one message is too small for it."""
        if isinstance(safetensors, (str, os.PathLike)):
            with open(safetensors, "rb") as f:
                safetensors = f.read()
        blob = bytes(safetensors)
        from kasmina_client.esper import check_not_torch_save

        check_not_torch_save(blob)  # TorchSaveFileError (a ValueError) names the conversion
        if stream is None:
            stream = len(blob) + 1024 > self.max_message
            if not stream:
                try:
                    return self.load_weights(model_id, blob, strict, False, chunk_bytes, timeout)
                except KasminaError as e:
                    if e.code != grpc.StatusCode.RESOURCE_EXHAUSTED or \
                            "max-message-bytes" not in (e.details or ""):
                        raise
                    stream = True
        if stream:
            chunk_bytes = min(chunk_bytes, self.max_message - 4096)
            return self._call("LoadWeightsStream", self._stub.LoadWeightsStream,
                              _chunks(blob, model_id, strict, chunk_bytes), timeout)
        return self._call("LoadWeights", self._stub.LoadWeights,
                          pb.LoadWeightsRequest(model_id=model_id, safetensors=blob,
                                                strict=strict), timeout)

    def export_weights(self, model_id, slots=(), include_host=False, stream=None, timeout=None):
        """The state_dict as safetensors bytes. slots: only these slots' tensors and extra state
        (esper's Governor snapshots), plus the host's when include_host. stream: True receives it
        in CRC-32-checked chunks (ExportWeightsStream, any size), False in one ExportWeights
        message (at most the daemon's max-reply-bytes and this client's max_message), None (the
        default) streams, or uses the unary call with a daemon that lacks the stream."""
        req = pb.ExportWeightsRequest(model_id=model_id, slots=list(slots),
                                      include_host=include_host)
        if stream is False:
            return self._call("ExportWeights", self._stub.ExportWeights, req,
                              timeout).safetensors
        try:
            # chunks that fit this client's message limit (2 MiB by default)
            req.chunk_bytes = max(4096, min(2 << 20, self.max_message - 4096))
            chunks = self._stub.ExportWeightsStream(
                req, timeout=timeout or self.timeout, metadata=self._metadata,
                wait_for_ready=self.wait_for_ready)
            return _join_chunks(chunks)
        except grpc.RpcError as e:
            if stream is None and e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return self.export_weights(model_id, slots, include_host, False, timeout)
            raise _error(e, "ExportWeightsStream") from None

    def move_model(self, model_id, device="", dtype=None, timeout=None):
        return self._call("MoveModel", self._stub.MoveModel,
                          pb.MoveModelRequest(model_id=model_id, device=device,
                                              dtype=_dtype(dtype)), timeout)

    # ---- lifecycle ----

    def germinate(self, model_id, slot_id, blueprint_id, seed_id="", blend_algorithm_id="",
                  blend_tempo_epochs=0, alpha_algorithm=None, alpha_target=None, init_seed=0,
                  timeout=None):
        req = pb.GerminateRequest(model_id=model_id, slot_id=slot_id, blueprint_id=blueprint_id,
                                  seed_id=seed_id, blend_algorithm_id=blend_algorithm_id,
                                  blend_tempo_epochs=blend_tempo_epochs,
                                  alpha_algorithm=_algorithm(alpha_algorithm), init_seed=init_seed)
        if alpha_target is not None:
            req.alpha_target = alpha_target
        return self._call("Germinate", self._stub.Germinate, req, timeout)

    def advance_stage(self, model_id, slot_id, target=None, timeout=None):
        """Returns (GateResult, SlotReport); target None = the next stage."""
        r = self._call("AdvanceStage", self._stub.AdvanceStage,
                       pb.AdvanceStageRequest(model_id=model_id, slot_id=slot_id,
                                              target=_stage(target)), timeout)
        return r.gate, r.slot

    def prune(self, model_id, slot_id, reason="", initiator="", timeout=None):
        """Returns (accepted, SlotReport)."""
        r = self._call("Prune", self._stub.Prune,
                       pb.PruneRequest(model_id=model_id, slot_id=slot_id, reason=reason,
                                       initiator=initiator), timeout)
        return r.accepted, r.slot

    def schedule_prune(self, model_id, slot_id, steps, curve=None, steepness=None, reason="",
                       initiator="", timeout=None):
        req = pb.SchedulePruneRequest(model_id=model_id, slot_id=slot_id, steps=steps,
                                      curve=_curve(curve), reason=reason, initiator=initiator)
        if steepness is not None:
            req.steepness = steepness
        r = self._call("SchedulePrune", self._stub.SchedulePrune, req, timeout)
        return r.accepted, r.slot

    def set_alpha_target(self, model_id, slot_id, alpha_target, steps=0, curve=None,
                         steepness=None, alpha_algorithm=None, timeout=None):
        req = pb.SetAlphaTargetRequest(model_id=model_id, slot_id=slot_id,
                                       alpha_target=alpha_target, steps=steps, curve=_curve(curve),
                                       alpha_algorithm=_algorithm(alpha_algorithm))
        if steepness is not None:
            req.steepness = steepness
        r = self._call("SetAlphaTarget", self._stub.SetAlphaTarget, req, timeout)
        return r.accepted, r.slot

    def set_alpha(self, model_id, slot_id, alpha, timeout=None):
        return self._call("SetAlpha", self._stub.SetAlpha,
                          pb.SetAlphaRequest(model_id=model_id, slot_id=slot_id, alpha=alpha),
                          timeout)

    def step_epoch(self, model_id, slot_id="", timeout=None):
        return list(self._call("StepEpoch", self._stub.StepEpoch,
                               pb.StepEpochRequest(model_id=model_id, slot_id=slot_id),
                               timeout).slots)

    def record_metrics(self, model_id, slot_id, val_accuracy=None,
                       counterfactual_contribution=None, gradient_norm=None,
                       gradient_health=None, has_vanishing=None, has_exploding=None,
                       seed_gradient_norm_ratio=None, epoch=None, max_epochs=None,
                       interaction_sum=None, boost_received=None, upstream_alpha_sum=None,
                       downstream_alpha_sum=None, clear_auto_pruned=False,
                       use_collected_gradients=False, timeout=None):
        """Each argument given is applied (esper's order); None leaves it out."""
        req = pb.RecordMetricsRequest(model_id=model_id, slot_id=slot_id,
                                      clear_auto_pruned=clear_auto_pruned,
                                      use_collected_gradients=use_collected_gradients)
        for name, v in (("val_accuracy", val_accuracy),
                        ("counterfactual_contribution", counterfactual_contribution),
                        ("epoch", epoch), ("max_epochs", max_epochs),
                        ("interaction_sum", interaction_sum), ("boost_received", boost_received),
                        ("upstream_alpha_sum", upstream_alpha_sum),
                        ("downstream_alpha_sum", downstream_alpha_sum)):
            if v is not None:
                setattr(req, name, v)
        for name, v in (("gradient_norm", gradient_norm), ("gradient_health", gradient_health),
                        ("has_vanishing", has_vanishing), ("has_exploding", has_exploding),
                        ("seed_gradient_norm_ratio", seed_gradient_norm_ratio)):
            if v is not None:
                setattr(req.gradients, name, v)
        return self._call("RecordMetrics", self._stub.RecordMetrics, req, timeout)

    def configure_slot(self, model_id, slot_id="", isolate_gradients=None,
                       auto_forward_gates=None, timeout=None):
        """Per-slot settings esper changes at run time (SeedSlot.isolate_gradients,
        SeedSlot.auto_forward_gates: gates "G1", "G2", "G3"; () = none). None keeps a setting;
        slot_id "" = every slot. Returns the configured slots' reports."""
        req = pb.ConfigureSlotRequest(model_id=model_id, slot_id=slot_id)
        if isolate_gradients is not None:
            req.isolate_gradients = bool(isolate_gradients)
        if auto_forward_gates is not None:
            req.auto_forward_gates.SetInParent()
            req.auto_forward_gates.gates.extend(_gate(g) for g in auto_forward_gates)
        return list(self._call("ConfigureSlot", self._stub.ConfigureSlot, req, timeout).slots)

    def slot_reports(self, model_id, slot_id="", timeout=None):
        return list(self._call("GetSlotReports", self._stub.GetSlotReports,
                               pb.GetSlotReportsRequest(model_id=model_id, slot_id=slot_id),
                               timeout).slots)

    def watch_events(self, model_id="", after_sequence=0, timeout=None):
        """An iterator of LifecycleEvent messages in emission order. timeout (seconds) ends the
        stream (no error) when it expires; None waits for ever. Call .cancel() on the iterator
        (or break out and drop it) to stop early."""
        stream = self._stub.WatchEvents(
            pb.WatchEventsRequest(model_id=model_id, after_sequence=after_sequence),
            timeout=timeout, metadata=self._metadata, wait_for_ready=self.wait_for_ready)
        return _EventStream(stream)

    # ---- compute ----

    def forward(self, model_id, x, stream="", output_dtype=None, full=False, timeout=None):
        """The blended forward of x (CNN [B,C,H,W] float32; transformer [B,T] int64/int32).
        Returns the output array, or a ForwardResult with full=True."""
        r = self._call("Forward", self._stub.Forward,
                       pb.ForwardRequest(model_id=model_id, input=tensor_from_numpy(x),
                                         stream=stream, output_dtype=_dtype(output_dtype)),
                       timeout)
        out = tensor_to_numpy(r.output)
        return ForwardResult(out, r.model_generation, r.compute_ns) if full else out

    def fused_forward(self, model_id, x, overrides, stream="", output_dtype=None, full=False,
                      timeout=None):
        """esper's fused_forward: x holds K*B rows; overrides maps slot_id -> one alpha per
        row."""
        req = pb.FusedForwardRequest(
            model_id=model_id, input=tensor_from_numpy(x), stream=stream,
            output_dtype=_dtype(output_dtype),
            overrides=[pb.AlphaOverride(slot_id=s, alpha=[float(a) for a in np.ravel(v)])
                       for s, v in overrides.items()])
        r = self._call("FusedForward", self._stub.FusedForward, req, timeout)
        out = tensor_to_numpy(r.output)
        return ForwardResult(out, r.model_generation, r.compute_ns) if full else out

    def evaluate(self, model_id, x, targets, configs=None, generate_standard=False,
                 return_logits=False, stream="", attribution=None, shapley_samples=0,
                 attribution_seed=0, timeout=None):
        """Counterfactual evaluation. configs: {name: {slot_id: alpha}} (or a list of (name,
        dict) pairs to keep an order); neither configs nor generate_standard = one config
        "main", the model as it is (as kasminactl evaluate). Returns an EvaluateResult whose results are
        ConfigResult(name, loss, accuracy, correct, total, logits-or-None).

        attribution ("auto", "exact", "permutation", or None) adds seed attribution over the
        live seeds from the same pass: EvaluateResult.shapley is a list of
        ShapleyEstimate(slot_id, mean, std, n_samples, algorithm, marginal) and .interactions
        (exact only) of InteractionTerm(slot_a, slot_b, interaction), in accuracy points.
        shapley_samples (0 = 20) and attribution_seed drive "permutation"
        (docs/evaluate.md#attribution)."""
        if configs is None and not generate_standard:
            configs = {"main": {}}  # the model as it is, like kasminactl evaluate
        items = configs.items() if isinstance(configs, dict) else (configs or [])
        req = pb.EvaluateRequest(
            model_id=model_id, input=tensor_from_numpy(x), targets=tensor_from_numpy(targets),
            configs=[pb.AlphaConfig(name=n, alpha={k: float(v) for k, v in (a or {}).items()})
                     for n, a in items],
            generate_standard=generate_standard, return_logits=return_logits, stream=stream,
            attribution=_attribution(attribution), shapley_samples=shapley_samples,
            attribution_seed=attribution_seed)
        r = self._call("Evaluate", self._stub.Evaluate, req, timeout)
        res = [ConfigResult(c.name, c.loss, c.accuracy, c.correct, c.total,
                            tensor_to_numpy(c.logits) if c.HasField("logits") else None)
               for c in r.results]
        sh = [ShapleyEstimate(e.slot_id, e.mean, e.std, e.n_samples, e.algorithm, e.marginal)
              for e in r.shapley]
        it = [InteractionTerm(t.slot_a, t.slot_b, t.interaction) for t in r.interactions]
        return EvaluateResult(res, r.model_generation, r.compute_ns, sh, it)

    # ---- training (docs/training.md) ----

    def configure_training(self, model_id, host=None, seed=None, max_grad_norm=None,
                           gradient_telemetry_stride=None, gradient_ratio_ema=None,
                           vanishing_threshold=None, exploding_threshold=None,
                           reset_optimizer_state=False, timeout=None):
        """Changes what is given (host/seed: dicts of lr, momentum, weight_decay, dampening,
        nesterov); None keeps the value in force. Returns the TrainingConfig now in force."""
        req = pb.ConfigureTrainingRequest(model_id=model_id,
                                          reset_optimizer_state=reset_optimizer_state)
        for field, d in (("host", host), ("seed", seed)):
            for k, v in (d or {}).items():
                setattr(getattr(req, field), k, v)
        for name, v in (("max_grad_norm", max_grad_norm),
                        ("gradient_telemetry_stride", gradient_telemetry_stride),
                        ("gradient_ratio_ema", gradient_ratio_ema),
                        ("vanishing_threshold", vanishing_threshold),
                        ("exploding_threshold", exploding_threshold)):
            if v is not None:
                setattr(req, name, v)
        return self._call("ConfigureTraining", self._stub.ConfigureTraining, req, timeout)

    def train_step(self, model_id, x, y, slots=(), collect_gradients=None, stream="",
                   timeout=None):
        """One TrainStep on the batch x (as forward) with targets y (int64 class or token ids).
        Returns the TrainStepResponse (loss, correct, total, train_step, statistics)."""
        req = pb.TrainStepRequest(model_id=model_id, input=tensor_from_numpy(x),
                                  targets=tensor_from_numpy(y, "i64"), stream=stream,
                                  slots=list(slots))
        if collect_gradients is not None:
            req.collect_gradients = bool(collect_gradients)
        return self._call("TrainStep", self._stub.TrainStep, req, timeout)

    def checkpoint(self, model_id="", timeout=None):
        """Makes training progress durable (weights, BatchNorm buffers, momentum buffers,
        train_step) for model_id, or every model when it is "". Returns {model_id: train_step
        now durable}. FAILED_PRECONDITION from a daemon run with --no-persist."""
        r = self._call("Checkpoint", self._stub.Checkpoint,
                       pb.CheckpointRequest(model_id=model_id), timeout)
        return dict(r.checkpoint_step)

    # ---- statistics ----

    def memory_stats(self, device="", timeout=None):
        return list(self._call("GetMemoryStats", self._stub.GetMemoryStats,
                               pb.GetMemoryStatsRequest(device=device), timeout).devices)

    def cache_stats(self, model_id="", timeout=None):
        return list(self._call("GetCacheStats", self._stub.GetCacheStats,
                               pb.GetCacheStatsRequest(model_id=model_id), timeout).caches)

    def empty_cache(self, device="", timeout=None):
        return list(self._call("EmptyCache", self._stub.EmptyCache,
                               pb.EmptyCacheRequest(device=device), timeout).devices)


def _chunks(blob, model_id, strict, chunk_bytes):
    """The WeightsChunk messages of a LoadWeightsStream."""
    if not blob:
        raise KasminaError(grpc.StatusCode.INVALID_ARGUMENT,
                           "the safetensors blob must not be empty", "KSM_EINVAL",
                           "LoadWeightsStream")
    total, crc = len(blob), zlib.crc32(blob)
    view = memoryview(blob)
    for off in range(0, total, max(1, int(chunk_bytes))):
        data = bytes(view[off:off + chunk_bytes])
        c = pb.WeightsChunk(offset=off, data=data, crc32=zlib.crc32(data))
        if off == 0:
            c.model_id, c.total_bytes, c.strict = model_id, total, strict
        if off + len(data) == total:
            c.blob_crc32 = crc
        yield c


def _join_chunks(chunks):
    """The blob of an ExportWeightsStream, its chunks' order and CRC-32s checked."""
    parts, have, total, crc, last = [], 0, None, 0, None
    for c in chunks:
        if total is None:
            total = c.total_bytes
        if c.offset != have or not c.data or have + len(c.data) > total:
            raise KasminaError(grpc.StatusCode.INTERNAL,
                               f"the export stream's chunk at {c.offset} does not follow the "
                               f"{have} of {total} bytes received", "KSM_EFORMAT",
                               "ExportWeightsStream")
        if zlib.crc32(c.data) != c.crc32:
            raise KasminaError(grpc.StatusCode.DATA_LOSS,
                               f"the export stream's chunk at {c.offset} failed its CRC-32",
                               "KSM_EBADMSG", "ExportWeightsStream")
        parts.append(c.data)
        crc = zlib.crc32(c.data, crc)
        have += len(c.data)
        last = c
    if total is None or have != total:
        raise KasminaError(grpc.StatusCode.INTERNAL,
                           f"the export stream ended after {have} of {total} bytes",
                           "KSM_EFORMAT", "ExportWeightsStream")
    if crc != last.blob_crc32:
        raise KasminaError(grpc.StatusCode.DATA_LOSS, "the exported blob failed its CRC-32",
                           "KSM_EBADMSG", "ExportWeightsStream")
    return b"".join(parts)


class _EventStream:
    """Iterates a WatchEvents stream; a deadline or a cancel ends it quietly."""

    def __init__(self, stream):
        self._stream = stream

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._stream)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                raise StopIteration from None
            raise _error(e, "WatchEvents") from None

    def cancel(self):
        self._stream.cancel()


def _error(e, method):
    ksm = None
    try:
        for k, v in e.trailing_metadata() or ():
            if k == "kasmina-error":
                ksm = v
    except Exception:  # pragma: no cover - a channel-level failure has no metadata
        pass
    return KasminaError(e.code(), e.details(), ksm, method)
