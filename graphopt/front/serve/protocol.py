"""The Open Inference Protocol (KServe v2) over HTTP: requests in, responses out, errors named.

A request body is a JSON object, optionally followed by binary tensor data (the binary tensor
extension): the header ``Inference-Header-Content-Length`` then gives the length of the JSON part,
and every input sent in binary carries ``"parameters": {"binary_data_size": N}``, its bytes following
in input order. Outputs go back in binary when asked per output (``"binary_data": true``) or for
all (request parameter ``"binary_data_output": true``). Anything malformed raises ``ProtocolError``
with the HTTP status to answer and a message naming the field, input or output.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

# v2 datatype -> numpy dtype (little-endian, as the protocol's binary data is)
V2_TO_NP = {
    "BOOL": np.dtype("bool"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
NP_TO_V2 = {d.name: k for k, d in V2_TO_NP.items()}
HEADER_LENGTH = "Inference-Header-Content-Length"


class ProtocolError(Exception):
    """A request the server refuses: ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


def v2_datatype(np_dtype: str) -> str:
    return NP_TO_V2.get(np.dtype(np_dtype).name, str(np_dtype).upper())


def numpy_dtype(datatype, where: str) -> np.dtype:
    """The numpy dtype of a v2 datatype; BYTES and unknown names are refused."""
    if datatype == "BYTES":
        raise bad(f"{where}: BYTES (string) tensors are not supported; graphopt serves numeric tensors only")
    dtype = V2_TO_NP.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise bad(f"{where}: unknown datatype {datatype!r} (one of {', '.join(V2_TO_NP)})")
    return dtype


def check_shape(shape, where: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def from_bytes(data: bytes, dtype: np.dtype, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A tensor from its raw little-endian bytes; the length must be what the shape needs."""
    need = elements(shape) * dtype.itemsize
    if len(data) != need:
        raise bad(f"{where}: {len(data)} bytes of data, shape {list(shape)} of {NP_TO_V2[dtype.name]} needs {need}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def from_list(data, dtype: np.dtype, shape: tuple[int, ...], where: str, field: str = "'data'") -> np.ndarray:
    """A tensor from JSON data (flat or nested, row-major); the element count must fit the shape."""
    kind = NP_TO_V2[dtype.name]
    if not isinstance(data, list):
        raise bad(f"{where}: {field} must be a list, got {type(data).__name__}")
    try:
        flat = np.asarray(data).ravel()
    except (ValueError, TypeError, OverflowError) as e:
        raise bad(f"{where}: {field} is not a regular list of numbers ({' '.join(str(e).split()[:12])})") from None
    if flat.size:
        if flat.dtype.kind not in "biuf" or (flat.dtype.kind == "b") != (dtype.kind == "b"):
            want = "true/false" if dtype.kind == "b" else "numbers"
            raise bad(f"{where}: {field} must hold {want} for {kind}, got values of type {flat.dtype.name}")
        if dtype.kind in "iu":
            if flat.dtype.kind == "f":
                raise bad(f"{where}: {field} holds fractional numbers for the integer datatype {kind}")
            info = np.iinfo(dtype)
            if int(flat.min()) < info.min or int(flat.max()) > info.max:
                raise bad(f"{where}: {field} holds values outside the range of {kind}")
    if flat.size != elements(shape):
        raise bad(f"{where}: {field} has {flat.size} elements, shape {list(shape)} needs {elements(shape)}")
    return flat.astype(dtype).reshape(shape)


@dataclasses.dataclass
class InferInput:
    name: str
    datatype: str
    array: np.ndarray


@dataclasses.dataclass
class InferRequest:
    """A decoded request: arrays by input, the outputs asked for (None: all) and how to send them."""

    id: str
    inputs: list[InferInput]
    outputs: list[tuple[str, bool]] | None  # (name, binary)
    binary_output: bool = False


def _params(obj: dict, where: str) -> dict:
    p = obj.get("parameters", {})
    if not isinstance(p, dict):
        raise bad(f"{where}: 'parameters' must be an object, got {type(p).__name__}")
    return p


def _flag(params: dict, key: str, where: str, default: bool = False) -> bool:
    v = params.get(key, default)
    if not isinstance(v, bool):
        raise bad(f"{where}: parameter '{key}' must be true or false, got {v!r}")
    return v


def parse_header(text: bytes) -> dict:
    try:
        obj = json.loads(text)
    except UnicodeDecodeError:
        raise bad(f"request body is not UTF-8 JSON (binary tensor data needs the {HEADER_LENGTH} header)") from None
    except json.JSONDecodeError as e:
        raise bad(f"request body is not valid JSON ({e})") from None
    except RecursionError:
        raise bad("request body is not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise bad(f"request body must be a JSON object, got {type(obj).__name__}")
    return obj


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """Decode an HTTP infer request body (JSON, or JSON + binary tensors when ``header_length`` is given)."""
    if header_length is None:
        header, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise bad(f"{HEADER_LENGTH} {header_length!r} is not a number") from None
        if not 0 < n <= len(body):
            raise bad(f"{HEADER_LENGTH} {n} does not fit the body of {len(body)} bytes (truncated?)")
        header, binary = body[:n], memoryview(body)[n:]
    obj = parse_header(header)
    where = "request"
    request_params = _params(obj, where)
    for key in ("classification",):
        if key in request_params:
            raise bad(f"request: parameter '{key}' is not supported")
    req_id = obj.get("id", "")
    if not isinstance(req_id, str):
        raise bad(f"request: 'id' must be a string, got {req_id!r}")
    items = obj.get("inputs")
    if not isinstance(items, list) or not items:
        raise bad("request: 'inputs' must be a non-empty list of tensors")
    inputs, offset, seen = [], 0, set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad(f"request: inputs[{i}] must be an object with a string 'name'")
        name = item["name"]
        where = f"input '{name}'"
        if name in seen:
            raise bad(f"{where} is given twice")
        seen.add(name)
        dtype = numpy_dtype(item.get("datatype"), where)
        shape = check_shape(item.get("shape"), where)
        size = _params(item, where).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise bad(f"{where}: 'binary_data_size' must be a non-negative integer, got {size!r}")
            if "data" in item:
                raise bad(f"{where}: has both 'data' and 'binary_data_size'")
            if offset + size > len(binary):
                raise bad(f"{where}: binary_data_size {size}, but only {len(binary) - offset} bytes of binary "
                          "data remain (truncated body?)")
            arr = from_bytes(binary[offset:offset + size], dtype, shape, where)
            offset += size
        elif "data" in item:
            arr = from_list(item["data"], dtype, shape, where)
        else:
            raise bad(f"{where}: has neither 'data' nor 'parameters.binary_data_size'")
        inputs.append(InferInput(name, item["datatype"], arr))
    if offset != len(binary):
        raise bad(f"request: {len(binary) - offset} bytes of binary data after the last binary tensor")
    outputs = obj.get("outputs")
    binary_output = _flag(request_params, "binary_data_output", "request")
    wanted = None
    if outputs is not None:
        if not isinstance(outputs, list):
            raise bad("request: 'outputs' must be a list")
        wanted = []
        for i, o in enumerate(outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise bad(f"request: outputs[{i}] must be an object with a string 'name'")
            p = _params(o, f"output '{o['name']}'")
            if "classification" in p:
                raise bad(f"output '{o['name']}': the classification extension is not supported")
            wanted.append((o["name"], _flag(p, "binary_data", f"output '{o['name']}'", binary_output)))
    return InferRequest(req_id, inputs, wanted, binary_output)


def encode_response(model: str, version: str, req_id: str, outputs: list[tuple[str, np.ndarray, bool]]):
    """The response body and, when any output is binary, the JSON header's length (else None)."""
    tensors, blobs = [], []
    for name, arr, binary in outputs:
        t = {"name": name, "datatype": v2_datatype(arr.dtype.name), "shape": list(arr.shape)}
        if binary:
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = arr.ravel().tolist()
        tensors.append(t)
    body = {"model_name": model, "model_version": version, "outputs": tensors}
    if req_id:
        body["id"] = req_id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
