"""The table of real models graphopt's tests and benchmarks use, and where each one comes from.

* ``light:<name>``: the small image classifiers inside the ``onnx`` wheel
  (``onnx/backend/test/data/light/light_<name>.onnx``), opset 9, generated weights.
* ``rapidocr:<det|rec|cls>`` and ``silero:<variant>``: models shipped inside PyPI wheels,
  fetched with pip and checked against the sha256 recorded here.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One named model: where its ``.onnx`` file is and the input shapes it is usually run with."""

    spec: str
    member: str  # path of the .onnx file inside the wheel (or inside the onnx package)
    input_shapes: tuple[str, ...]
    package: str | None = None  # "name==version" for models fetched from PyPI; None: inside onnx
    sha256: str | None = None

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


_LIGHT_SHAPE = {
    "bvlc_alexnet": "data_0",
    "densenet121": "data_0",
    "inception_v1": "data_0",
    "inception_v2": "data_0",
    "resnet50": "gpu_0/data_0",
    "shufflenet": "gpu_0/data_0",
    "squeezenet": "data_0",
    "vgg19": "data_0",
    "zfnet512": "gpu_0/data_0",
}

RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
SILERO = "silero-vad==6.2.3"

# (spec, member, sha256, input shapes)
_PYPI: dict[str, tuple[tuple[str, str, str, tuple[str, ...]], ...]] = {
    RAPIDOCR: (
        ("rapidocr:det", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
         "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", ("x:1,3,640,640",)),
        ("rapidocr:rec", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
         "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", ("x:1,3,48,320",)),
        ("rapidocr:cls", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
         "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", ("x:1,3,48,192",)),
    ),
    SILERO: (
        ("silero:openvino_16k", "silero_vad/data/silero_vad_openvino_16k.onnx",
         "7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87", ("input:1,576", "state:2,1,128")),
        ("silero:16k_sequence", "silero_vad/data/silero_vad_16k_sequence.onnx",
         "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85", ("input:4,576", "h:1,1,128", "c:1,1,128")),
        ("silero:16k_op15", "silero_vad/data/silero_vad_16k_op15.onnx",
         "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49", ("input:1,576", "state:2,1,128")),
        ("silero:vad", "silero_vad/data/silero_vad.onnx",
         "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", ("input:1,576", "state:2,1,128")),
        ("silero:half", "silero_vad/data/silero_vad_half.onnx",
         "1e0b195ad4806595ef4466f419d16fca7e4afcfc6669b8c0b5f76ea87547c769", ("input:1,576", "state:2,1,128")),
        ("silero:op18_ifless", "silero_vad/data/silero_vad_op18_ifless.onnx",
         "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28", ("input:1,576", "state:2,1,128")),
    ),
}


def _build() -> dict[str, ModelEntry]:
    table: dict[str, ModelEntry] = {}
    for name, input_name in _LIGHT_SHAPE.items():
        spec = f"light:{name}"
        table[spec] = ModelEntry(
            spec, f"backend/test/data/light/light_{name}.onnx", (f"{input_name}:1,3,224,224",)
        )
    for package, rows in _PYPI.items():
        for spec, member, sha, shapes in rows:
            table[spec] = ModelEntry(spec, member, shapes, package, sha)
    return table


CATALOG: dict[str, ModelEntry] = _build()


def entries_of_package(package: str) -> list[ModelEntry]:
    return [e for e in CATALOG.values() if e.package == package]
