"""The KServe v2 ``inference.GRPCInferenceService`` messages, built from a table at import time.

Field names and numbers are those of the public ``grpc_predict_v2.proto`` (and of Triton's
``grpc_service.proto``, which extends it: ``InferParameter``'s double/uint64 choices and
``RepositoryIndex``), so stock clients such as ``tritonclient.grpc`` talk to it unchanged. The
descriptors live in a private pool: no generated code to keep in step with the protobuf runtime, and
no clash with a client's own copy of the same names in one process.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"
_F = descriptor_pb2.FieldDescriptorProto
_T = {"bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES, "int32": _F.TYPE_INT32,
      "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32, "uint64": _F.TYPE_UINT64, "float": _F.TYPE_FLOAT,
      "double": _F.TYPE_DOUBLE}
PARAMS = ("parameters", "map<InferParameter>")

# message -> [(field, type, number)]; "repeated X", "map<X>" (string keys), "oneof:NAME X";
# nested messages are named Outer.Inner, before Outer.
MESSAGES: dict[str, list[tuple[str, str, int]]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", "bool", 1)],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", "bool", 1)],
    "ModelReadyRequest": [("name", "string", 1), ("version", "string", 2)],
    "ModelReadyResponse": [("ready", "bool", 1)],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", "string", 1), ("version", "string", 2), ("extensions", "repeated string", 3)],
    "ModelMetadataRequest": [("name", "string", 1), ("version", "string", 2)],
    "ModelMetadataResponse.TensorMetadata": [("name", "string", 1), ("datatype", "string", 2),
                                             ("shape", "repeated int64", 3)],
    "ModelMetadataResponse": [("name", "string", 1), ("versions", "repeated string", 2), ("platform", "string", 3),
                              ("inputs", "repeated ModelMetadataResponse.TensorMetadata", 4),
                              ("outputs", "repeated ModelMetadataResponse.TensorMetadata", 5)],
    "InferParameter": [("bool_param", "oneof:parameter_choice bool", 1), ("int64_param", "oneof:parameter_choice int64", 2),
                       ("string_param", "oneof:parameter_choice string", 3),
                       ("double_param", "oneof:parameter_choice double", 4),
                       ("uint64_param", "oneof:parameter_choice uint64", 5)],
    "InferTensorContents": [("bool_contents", "repeated bool", 1), ("int_contents", "repeated int32", 2),
                            ("int64_contents", "repeated int64", 3), ("uint_contents", "repeated uint32", 4),
                            ("uint64_contents", "repeated uint64", 5), ("fp32_contents", "repeated float", 6),
                            ("fp64_contents", "repeated double", 7), ("bytes_contents", "repeated bytes", 8)],
    "ModelInferRequest.InferInputTensor": [("name", "string", 1), ("datatype", "string", 2),
                                           ("shape", "repeated int64", 3), (*PARAMS, 4),
                                           ("contents", "InferTensorContents", 5)],
    "ModelInferRequest.InferRequestedOutputTensor": [("name", "string", 1), (*PARAMS, 2)],
    "ModelInferRequest": [("model_name", "string", 1), ("model_version", "string", 2), ("id", "string", 3),
                          (*PARAMS, 4), ("inputs", "repeated ModelInferRequest.InferInputTensor", 5),
                          ("outputs", "repeated ModelInferRequest.InferRequestedOutputTensor", 6),
                          ("raw_input_contents", "repeated bytes", 7)],
    "ModelInferResponse.InferOutputTensor": [("name", "string", 1), ("datatype", "string", 2),
                                             ("shape", "repeated int64", 3), (*PARAMS, 4),
                                             ("contents", "InferTensorContents", 5)],
    "ModelInferResponse": [("model_name", "string", 1), ("model_version", "string", 2), ("id", "string", 3),
                           (*PARAMS, 4), ("outputs", "repeated ModelInferResponse.InferOutputTensor", 5),
                           ("raw_output_contents", "repeated bytes", 6)],
    "RepositoryIndexRequest": [("repository_name", "string", 1), ("ready", "bool", 2)],
    "RepositoryIndexResponse.ModelIndex": [("name", "string", 1), ("version", "string", 2), ("state", "string", 3),
                                           ("reason", "string", 4)],
    "RepositoryIndexResponse": [("models", "repeated RepositoryIndexResponse.ModelIndex", 1)],
}

# rpc -> (request, response)
METHODS = {name: (f"{name}Request", f"{name}Response") for name in
           ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
            "RepositoryIndex")}


def _field(msg: descriptor_pb2.DescriptorProto, path: str, name: str, spec: str, number: int, oneofs: dict) -> None:
    f = msg.field.add(name=name, number=number, label=_F.LABEL_OPTIONAL)
    if spec.startswith("oneof:"):
        group, spec = spec[6:].split(" ", 1)
        if group not in oneofs:
            oneofs[group] = len(msg.oneof_decl)
            msg.oneof_decl.add(name=group)
        f.oneof_index = oneofs[group]
    if spec.startswith("map<"):  # a map is a repeated nested XxxEntry message {key, value}
        value = spec[4:-1]
        entry = msg.nested_type.add(name="".join(p.capitalize() for p in name.split("_")) + "Entry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
        entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL, type=_F.TYPE_MESSAGE,
                        type_name=f".{PACKAGE}.{value}")
        f.label, f.type, f.type_name = _F.LABEL_REPEATED, _F.TYPE_MESSAGE, f".{PACKAGE}.{path}.{entry.name}"
        return
    if spec.startswith("repeated "):
        f.label, spec = _F.LABEL_REPEATED, spec[9:]
    if spec in _T:
        f.type = _T[spec]
    else:
        f.type, f.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{spec}"


def _build() -> dict[str, type]:
    fd = descriptor_pb2.FileDescriptorProto(name="graphopt_grpc_predict_v2.proto", package=PACKAGE, syntax="proto3")
    protos: dict[str, descriptor_pb2.DescriptorProto] = {}
    for full, fields in MESSAGES.items():
        outer, _, inner = full.partition(".")
        if outer not in protos:
            protos[outer] = fd.message_type.add(name=outer)
        msg = protos[outer]
        if inner:  # nested: its outer message is declared after it in the table
            msg = msg.nested_type.add(name=inner)
        oneofs: dict = {}
        for name, spec, number in fields:
            _field(msg, full, name, spec, number, oneofs)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return {full: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{full}"))
            for full in MESSAGES}


MESSAGE_CLASSES = _build()


def message(name: str) -> type:
    return MESSAGE_CLASSES[name]
