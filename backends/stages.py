"""The stages after lowering: Relax rewrites and legalization, schedules, and the build (``compile.py``'s
stages 5 to 8).

``relax_passes`` chooses what graphopt's CPU schedules serve before legalization (integer convs and
matmuls on AMX/VNNI kernels, blocked conv layouts, Winograd, packed and quantized-weight matmuls) and
legalizes with graphopt's own vectorizable math (``fast_math``, ``layer_norm``); ``build`` runs TVM's
dataflow lowering and code generation.
"""

from __future__ import annotations

import os

from graphopt.backends.constants import (fold_elementwise_of_constants, fold_layout_of_constants,
                                         replace_empty_constants)
from graphopt.backends.lowering.control import bind_constant_arguments
from graphopt.backends.targets import TargetSpec


def relax_passes(mod, spec: TargetSpec, winograd: bool = False, precision: str = "fp32"):
    """``winograd``: graphopt's CPU schedules follow, so convs take the layouts and algorithms they
    serve: conv chains in the blocked channel layout, then 3x3 stride-1 convs as Winograd where it
    pays (Winograd reads the blocked layout, so blocking comes first; the weights' relayout folds in
    between)."""
    import tvm
    from graphopt.backends.schedules.blocked import LEGALIZE, to_blocked_layout
    from graphopt.backends.schedules.strided_pointwise import rewrite_strided_pointwise
    from tvm import relax

    cpu_rules = winograd and not spec.is_gpu
    if precision == "fp16":  # before legalization: dlight then picks tensor-core MMA for float16 matmuls
        from graphopt.backends.precision import to_fp16

        mod = to_fp16(mod)
    legalize = dict(LEGALIZE)
    if cpu_rules:
        from graphopt.backends.schedules import features_of
        from graphopt.backends.schedules.fast_math import legalize_map
        from graphopt.backends.schedules.packed_matmul import rewrite_packed_matmul
        from graphopt.backends.schedules.winograd import rewrite_winograd

        feats = features_of(spec)
        lanes = feats.lanes(32)
        from graphopt.backends.schedules import int8_conv, int8_matmul

        if int8_conv.available(spec):  # integer convs (QDQ models) to AMX-INT8 kernels, NCHW uint8
            mod = int8_conv.rewrite_int8_conv(mod, spec)
        mod = int8_matmul.rewrite_int8_matmul(mod, spec)  # MatMulInteger with a constant weight on VNNI
        # constants folded first: the layout's choice reads weights (a padded conv's, a broadcast's)
        mod = to_blocked_layout(fold_layout_of_constants(mod), lanes)
    mod = fold_layout_of_constants(mod)
    if cpu_rules:
        from graphopt.backends.schedules import amx_conv

        if amx_conv.available(spec):  # before Winograd: AMX's direct conv does more per cycle
            mod = amx_conv.rewrite_amx_conv(mod, feats.cores)
    mod = rewrite_strided_pointwise(mod)  # after the layout choice and AMX (which gathers strided pixels)
    if cpu_rules:
        mod = rewrite_winograd(mod)
        from graphopt.backends.schedules.dequant_matmul import rewrite_dequant_matmul

        mod = rewrite_dequant_matmul(mod, lanes)  # weight-only int8/int4 matmuls read the quantized weight
        # weights computed from constants (an affine int8 dequantization; a transposed embedding in an
        # If branch, which receives it as a parameter) are constants before the packed rewrite looks
        mod = fold_layout_of_constants(bind_constant_arguments(fold_elementwise_of_constants(mod)))
        mod = rewrite_packed_matmul(mod, lanes)
        from graphopt.backends.schedules.padded_matmul import rewrite_padded_matmul

        mod = rewrite_padded_matmul(mod, lanes)  # symbolic-dim matmuls of two activations, in whole tiles
        legalize.update(legalize_map())
        from graphopt.backends.schedules.layer_norm import legalize_layer_norm

        legalize["relax.nn.layer_norm"] = legalize_layer_norm(lanes)  # vector-wide partial sums
        from graphopt.backends.schedules.concat import legalize_concat

        tvm_concat = legalize.get("relax.concat") or tvm.ir.Op.get("relax.concat").get_attr("FLegalize")
        legalize["relax.concat"] = legalize_concat(lanes, tvm_concat)  # a KV cache's rows: contiguous copies
    from graphopt.backends.split_slices import split_to_slices

    # before FuseOps: each piece's slice fuses into its consumer's copy; repeated layout ops (the same
    # transpose of a key for a model output and for attention) computed once, so each fuses too
    mod = split_to_slices(relax.transform.EliminateCommonSubexpr()(mod))
    seq = [
        *relax.pipeline.library_dispatch_passes(spec.target),
        relax.transform.LegalizeOps(customize_legalize_map=legalize),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        *fold_branch_constants(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    with spec.target:
        return tvm.transform.Sequential(seq)(mod)


def fold_branch_constants():
    """Weights that ``main`` computed from constants (now folded) bound into If-branch functions, and
    folded there (``lowering.control.bind_constant_arguments``)."""
    import tvm
    from graphopt.backends.lowering.control import bind_constant_arguments
    from tvm import relax

    bind = tvm.transform.module_pass(lambda mod, _ctx: bind_constant_arguments(mod), opt_level=0,
                                     name="BindBranchConstants")
    return [bind, relax.transform.FoldConstant()]


def apply_tuning_db(mod, spec: TargetSpec, tuning_db: str | os.PathLike):
    from graphopt.backends.tuning import apply_database

    return apply_database(mod, spec.target, tuning_db)


def apply_schedules(mod, spec: TargetSpec, schedules: bool, choices=None):
    if schedules:
        from graphopt.backends.schedules import apply_default_schedules

        mod = apply_default_schedules(mod, spec, choices=choices)
    if spec.is_gpu:  # GPU code must be bound to threads: graphopt's GPU rules, then TVM's dlight rules
        from graphopt.backends.schedules.gpu_rules import apply_gpu_schedules

        with spec.target:
            mod = apply_gpu_schedules(mod, spec.target)
    return mod


def build(mod, spec: TargetSpec):
    import tvm
    from graphopt.backends.noalias import mark_single_buffer_noalias
    from tvm import relax

    # TVM's default pipeline minus the legalization already done (written out: in TVM 0.27
    # relax.pipeline.dataflow_lower_passes does not resolve for llvm targets).
    mod = replace_empty_constants(mod)
    t = spec.target
    rt = relax.transform
    lower = tvm.transform.Sequential([
        rt.RewriteDataflowReshape(), rt.ToNonDataflow(), rt.RemovePurityChecking(), rt.CallTIRRewrite(),
        rt.StaticPlanBlockMemory(),
        *([rt.RewriteCUDAGraph()] if spec.kind == "cuda" else []),
        rt.LowerAllocTensor(), rt.KillAfterLastUse(), rt.LowerRuntimeBuiltin(), rt.ComputePrimValue(),
        rt.VMShapeLower(), rt.AttachGlobalSymbol(),
        mark_single_buffer_noalias,  # after VMShapeLower: its shape functions (backends/noalias.py)
    ])
    with t:
        return tvm.compile(mod, target=t, relax_pipeline=lower)
