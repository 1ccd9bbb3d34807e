"""KServe v2 / Open Inference Protocol endpoints, so standard clients (tritonclient) work.

Inputs of ``POST /v2/models/{name}/infer``: ``dense`` (FP32 ``[B, width]``) and, per
feature, ``<feature>.values`` (INT64 or INT32, all ids) and ``<feature>.lengths`` (INT32
``[B]``); a feature left out is empty bags. Output ``score`` (FP32 ``[B, 1]``). Tensors come
as JSON ``data`` or in the binary tensor extension (a JSON header of
``Inference-Header-Content-Length`` bytes followed by raw little-endian tensors); outputs
are binary when the request asks. The request parameter ``timeout`` (microseconds) shortens
the deadline. Errors use the protocol's ``{"error": "<message>"}``, from this sub-app's own
middleware; admission, deadlines, limits and Retry-After are ``gateway.state``'s, as for v1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from gateway.batcher import Routed
from gateway.requests import batch_from_arrays
from gateway.state import GATEWAY, Gateway, status_and_headers
from recserve import __version__
from recserve.contracts.batch import Batch
from recserve.contracts.errors import BadRequest, RecserveError, TooLarge
from recserve.rpc.deadline import Deadline, now_ms

log = logging.getLogger(__name__)

DTYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"),
}
HEADER = "Inference-Header-Content-Length"


def v2_error(exc: RecserveError) -> web.Response:
    field = f" (field {exc.field})" if exc.field else ""
    status, headers = status_and_headers(exc)
    return web.json_response(
        {"error": f"{exc.kind}: {exc.message}{field}"}, status=status, headers=headers
    )


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error of a KServe route in the protocol's shape."""
    try:
        return await handler(request)
    except RecserveError as exc:
        return v2_error(exc)
    except web.HTTPRequestEntityTooLarge:
        return v2_error(TooLarge("the body is larger than the gateway accepts", field="body"))
    except web.HTTPException as exc:
        return web.json_response({"error": exc.text or exc.reason}, status=exc.status)
    except ConnectionResetError:
        raise  # the client is gone: the main app counts it
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return v2_error(RecserveError("internal error; see the gateway log"))


def _model(request: web.Request) -> Gateway:
    gw = request.config_dict[GATEWAY]
    if request.match_info["model"] != gw.manifest.name:
        raise web.HTTPNotFound(text=f"unknown model {request.match_info['model']!r}")
    version = request.match_info.get("version")
    if version is not None and version != gw.manifest.version:
        raise web.HTTPNotFound(text=f"unknown version {version!r}")
    return gw


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(
        {"name": "recserve", "version": __version__, "extensions": ["binary_tensor_data"]}
    )


async def model_metadata(request: web.Request) -> web.Response:
    gw = _model(request)
    m = gw.manifest
    inputs = [{"name": "dense", "datatype": "FP32", "shape": [-1, m.dense_width]}]
    for feature, _ in m.features():
        inputs.append({"name": f"{feature}.values", "datatype": "INT64", "shape": [-1]})
        inputs.append({"name": f"{feature}.lengths", "datatype": "INT32", "shape": [-1]})
    return web.json_response(
        {
            "name": m.name,
            "versions": [m.version],
            "platform": "recserve",
            "inputs": inputs,
            "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}],
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    gw = _model(request)
    return _readiness({"name": gw.manifest.name, "ready": gw.serving})


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    return _readiness({"ready": request.config_dict[GATEWAY].serving})


def _readiness(doc: dict[str, Any]) -> web.Response:
    ok = doc["ready"]
    return web.json_response(doc, status=200 if ok else 503, headers=None if ok else RETRY)


RETRY = {"Retry-After": "1"}


def parse_infer(
    body: bytes, header_len: int | None, gw: Gateway, arrived_ms: float
) -> tuple[Batch, Deadline, bool]:
    """(batch, deadline, binary output wanted) from an infer request."""
    head = body if header_len is None else body[:header_len]
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request header is not valid JSON: {exc}", field="body") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise BadRequest("the request needs a list of inputs", field="inputs")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("parameters must be an object", field="parameters")
    asked = params.get("timeout")  # microseconds
    if asked is not None and type(asked) in (int, float):
        asked = asked / 1e3
    deadline = gw.deadline(asked, "parameters.timeout", arrived_ms)
    binary_out = bool(params.get("binary_data_output"))
    for out in doc.get("outputs") or []:
        if isinstance(out, dict) and (out.get("parameters") or {}).get("binary_data"):
            binary_out = True
    offset = header_len or 0
    tensors: dict[str, np.ndarray] = {}
    for i, t in enumerate(doc["inputs"]):
        where = f"inputs[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise BadRequest(f"{where} needs a name", field=where)
        name, dtype = t["name"], DTYPES.get(str(t.get("datatype")))
        shape: Any = t.get("shape")  # a list of sizes once _count has checked it
        if dtype is None:
            raise BadRequest(f"{name}: datatype must be one of {', '.join(DTYPES)}", field=name)
        count = _count(shape)
        if count < 0:
            raise BadRequest(f"{name}: shape must be a list of sizes", field=name)
        if count * dtype.itemsize > len(body):
            raise BadRequest(f"{name}: shape {shape} is larger than the body", field=name)
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size != count * dtype.itemsize or offset + size > len(body):
                raise BadRequest(
                    f"{name}: binary_data_size does not match its shape or the body", field=name
                )
            arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
            offset += size
        else:
            data = t.get("data")
            if not isinstance(data, list):
                raise BadRequest(f"{name}: data is missing", field=name)
            try:
                arr = np.asarray(
                    np.array(data, dtype=np.float64 if dtype.kind == "f" else np.int64).reshape(-1),
                    dtype=dtype,
                )
            except (ValueError, TypeError, OverflowError):
                raise BadRequest(f"{name}: data must be {count} numbers", field=name) from None
            if arr.size != count:
                raise BadRequest(f"{name}: {arr.size} values for shape {shape}", field=name)
        tensors[name] = arr if len(shape) == 1 else arr.reshape(shape)
    dense = tensors.pop("dense", None)
    if dense is None:
        raise BadRequest("the dense input is missing", field="dense")
    values: dict[str, np.ndarray] = {}
    lengths: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        feature, _, part = name.rpartition(".")
        if part == "values" and feature:
            values[feature] = arr
        elif part == "lengths" and feature:
            lengths[feature] = arr
        else:
            raise BadRequest(
                f"unknown input {name!r} (dense, <feature>.values, <feature>.lengths)", field=name
            )
    sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for feature, arr in values.items():
        lens = lengths.get(feature)
        if lens is None or arr.dtype.kind != "i" or lens.dtype.kind != "i":
            raise BadRequest(
                f"{feature} needs integer .values and .lengths", field=f"{feature}.lengths"
            )
        sparse[feature] = (arr, lens.reshape(-1))
    for feature in lengths:
        if feature not in values:
            raise BadRequest(f"{feature}.lengths has no {feature}.values",
                             field=f"{feature}.lengths")  # fmt: skip
    batch = batch_from_arrays(dense, sparse, gw.manifest, gw.limits)
    gw.check_limits(batch)
    return batch, deadline, binary_out


def _count(shape: Any) -> int:
    """The element count of a tensor's ``shape`` (a list of sizes), or -1 when it is not
    one; Python integers, so a huge shape does not wrap around."""
    if type(shape) is not list:
        return -1
    count = 1
    for d in shape:
        if type(d) is not int or d < 0:
            return -1
        count *= d
    return count


async def infer(request: web.Request) -> web.Response:
    gw = _model(request)
    body = await gw.read_body(request)
    arrived = now_ms()  # the deadline runs from here, the executor's queue included
    raw_len = request.headers.get(HEADER)
    header_len = int(raw_len) if raw_len and raw_len.isdigit() else None
    if header_len is not None and header_len > len(body):
        raise BadRequest(f"{HEADER} exceeds the body", field=HEADER)

    def parse() -> tuple[Batch, Deadline, bool, Routed | None]:
        with gw.metrics.cpu("parse"):
            batch, deadline, binary = parse_infer(body, header_len, gw, arrived)
        return batch, deadline, binary, gw.batcher.route_alone(batch)

    loop = asyncio.get_running_loop()
    batch, deadline, binary, routed = await loop.run_in_executor(gw.executor, parse)
    scores, version = await gw.batcher.score(batch, deadline, routed)
    out = np.ascontiguousarray(scores, dtype="<f4").reshape(-1, 1)
    meta: dict[str, Any] = {
        "model_name": gw.manifest.name,
        "model_version": gw.manifest.version,
        "parameters": {"version": version},  # the online-update version scored at
    }
    if binary:
        meta["outputs"] = [
            {
                "name": "score",
                "datatype": "FP32",
                "shape": list(out.shape),
                "parameters": {"binary_data_size": out.nbytes},
            }
        ]
        head = orjson.dumps(meta)
        return web.Response(
            body=head + out.tobytes(),
            content_type="application/octet-stream",
            headers={HEADER: str(len(head))},
        )
    meta["outputs"] = [
        {
            "name": "score",
            "datatype": "FP32",
            "shape": list(out.shape),
            "data": out.reshape(-1).astype(float).tolist(),
        }
    ]
    return web.json_response(meta)


def create_app() -> web.Application:
    """The KServe v2 routes, mounted by the main app under ``/v2``."""
    app = web.Application(middlewares=[errors])
    app.router.add_get("", server_metadata)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/models/{model}", model_metadata)
    app.router.add_get("/models/{model}/versions/{version}", model_metadata)
    app.router.add_get("/models/{model}/ready", model_ready)
    app.router.add_get("/models/{model}/versions/{version}/ready", model_ready)
    app.router.add_post("/models/{model}/infer", infer)
    app.router.add_post("/models/{model}/versions/{version}/infer", infer)
    return app
