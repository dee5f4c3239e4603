"""graphopt's built-in passes, one file each.

``BUILTIN_PASSES`` is the one table of them: name -> (module, class, one-line description).
Modules are imported only when a pass is created, so importing graphopt stays cheap and nothing
is registered by import side effect.
"""

_P = "graphopt.passes."

BUILTIN_PASSES: dict[str, tuple[str, str, str]] = {
    # cleanup
    "remove_noops": (_P + "remove_noops", "RemoveNoopsPass", "remove Identity, inference Dropout, same-type Cast, same-shape Reshape, identity Transpose, zero Pad, x*1, x+0, full Slice"),
    "dead_code": (_P + "dead_code", "DeadCodeEliminationPass", "remove nodes, initializers and functions no output depends on"),
    "cse": (_P + "cse", "CommonSubexpressionEliminationPass", "merge identical constants and identical subgraphs of pure ops"),
    "parameter_sharing": (_P + "parameter_sharing", "ParameterSharingPass", "deduplicate bit-identical initializers and constants"),
    # weight normalization
    "freeze_initializers": (_P + "freeze_initializers", "FreezeInitializersPass", "initializers that are also graph inputs become fixed weights"),
    "fold_batchnorm": (_P + "fold_batchnorm", "FoldBatchNormPass", "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul"),
    "fold_weight_reparam": (_P + "fold_weight_reparam", "FoldWeightReparamPass", "fold weight-norm g*v/||v|| and Mul/Div/Add chains on constant weights"),
    "canonical_dtypes": (_P + "canonical_dtypes", "CanonicalDtypesPass", "store fp64/fp16 weights in the compute dtype where exact"),
    "weight_statistics": (_P + "weight_statistics", "WeightStatisticsPass", "annotate weights with per-tensor and per-channel min/max"),
    # compression
    "convert_weights": (_P + "convert_weights", "ConvertWeightsPass", "store float32 weights as fp16/bf16 with a Cast back (compute stays float32)"),
    "quantize_weights": (_P + "quantize_weights", "QuantizeWeightsPass", "weight-only block-wise int4/int8 for MatMul/Gemm (DequantizeLinear, or MatMulNBits for ORT)"),
    "equalize": (_P + "equalize", "EqualizePass", "cross-layer equalization of Conv -> Relu -> Conv weight ranges (exact)"),
    # folding and simplification
    "constant_folding": (_P + "constant_folding", "ConstantFoldingPass", "fold constant subgraphs, shape subgraphs included, bounded by output size"),
    "merge_chains": (_P + "merge_chains", "MergeChainsPass", "merge Transpose/Reshape chains, cancel Squeeze/Unsqueeze pairs"),
    "fuse_sibling_matmuls": (_P + "fuse_sibling_matmuls", "FuseSiblingMatMulsPass", "merge MatMuls that share their input and have constant weights (Q/K/V projections) into one MatMul and a Split"),
    "fuse_bias": (_P + "fuse_bias", "FuseBiasPass", "fuse Conv+Add(bias) and MatMul+Add into Gemm where exact"),
    # aggressive fusion
    "fuse_activations": (_P + "fuse_activations", "FuseActivationsPass", "recognise Gelu, HardSwish and Mish as single ops"),
    "fuse_layernorm": (_P + "fuse_layernorm", "FuseLayerNormPass", "recognise LayerNormalization"),
    "fuse_attention": (_P + "fuse_attention", "FuseAttentionPass", "recognise scaled dot-product attention"),
    "fuse_conv_activation": (_P + "fuse_conv_activation", "FuseConvActivationPass", "Conv[+Add]/Gemm + activation as ONNX Runtime's FusedConv/FusedGemm (target_runtime=ort)"),
    # compression (run by graphopt.compression.compress after the pipeline: they need calibration ranges or data)
    "quantize_qdq": (_P + "quantize_qdq", "QuantizeQDQPass", "static int8 QDQ around Conv/MatMul/Gemm from calibrated ranges (per-channel weights, int32 bias)"),
    "quantize_dynamic": (_P + "quantize_dynamic", "QuantizeDynamicPass", "int8-dynamic: MatMul/Gemm as DynamicQuantizeLinear + MatMulInteger, LSTM/GRU weights int8"),
    "adaround": (_P + "adaround", "AdaRoundPass", "learn each int8 weight's rounding (up or down) so layer outputs on calibration data match the float model's"),
    "bias_correction": (_P + "bias_correction", "BiasCorrectionPass", "shift int8 layers' biases by their mean error on calibration data"),
    "prune_channels": (_P + "prune_channels", "PruneChannelsPass", "remove the least important output channels of every channel dependency group (ratio), with every consumer"),
    "prune_magnitude": (_P + "prune_magnitude", "PruneMagnitudePass", "zero the smallest weights of Conv/Gemm/MatMul layers (per layer or global); shapes stay"),
    "reconstruct": (_P + "reconstruct", "ReconstructPass", "refit pruned layers by ridge least squares to the unpruned model's outputs on calibration data"),
}


def default_registry(*, plugins: bool = True):
    """A pass registry holding the built-in passes and, with ``plugins``, the installed plugins'."""
    from graphopt.core.pipeline import PassRegistry

    registry = PassRegistry()
    registry.add_builtins(BUILTIN_PASSES)
    if plugins:
        registry.add_entry_points()
    return registry
