"""The default pipeline, written out once. ``-On`` runs every step whose level is <= n.

Why this order:
1. Cleanup first (-O1): removing no-ops, dead nodes and duplicate subexpressions/parameters is cheap,
   always exact, and shrinks what every later pass has to look at. It iterates to a bounded fixpoint
   because each removal exposes more (an Identity removed makes two Casts adjacent, and so on).
2. Weight normalization (-O2) before constant folding. It starts by freezing weights that old exports
   also list as graph inputs (overridable defaults that no pass may touch): a deployed model's weights
   are fixed. Then folding BatchNorm and weight
   reparameterizations into the weights turns whole chains into constants, and canonical dtypes
   make identical weights byte-identical, so parameter sharing and CSE then find them.
3. Constant folding (bounded) then the simplification fixpoint: folding shape subgraphs turns
   computed Reshape/Expand targets into constants, which is what lets no-op Reshapes, Transpose and
   Reshape chains and Squeeze/Unsqueeze pairs be recognised and cancelled; each cancellation can
   create new constant subgraphs, hence the loop.
4. Sibling and bias fusion (-O2) after simplification, when Conv/MatMul and their Add are adjacent:
   MatMuls sharing an input merge first (one wider product, then a Split), so that the merged
   MatMul + Add is what bias fusion sees.
5. Pattern fusion (-O3) last among rewrites: Gelu, LayerNorm, HardSwish, Mish and attention are
   matched on the canonical, simplified form, so each rule has one shape to look for. Conv/Gemm +
   activation (ONNX Runtime's FusedConv/FusedGemm, only for ``target_runtime="ort"``) comes after
   them, when every activation has its final form.
6. A final cleanup removes what the fusions left dead, and weight statistics are recorded last,
   on the weights as they will be deployed.
"""

from __future__ import annotations

from graphopt.core.pipeline.runner import Fixpoint, Step

CLEANUP = Fixpoint(
    "cleanup",
    (
        Step("remove_noops", 1),
        Step("dead_code", 1),
        Step("cse", 1),
        Step("parameter_sharing", 1),
    ),
    level=1,
)

DEFAULT_PIPELINE = (
    CLEANUP,
    Step("freeze_initializers", 2),  # weights listed as graph inputs are fixed from here on
    Step("fold_weight_reparam", 2),  # first: BatchNorm folds only into a constant weight
    Step("fold_batchnorm", 2),
    Step("canonical_dtypes", 2),
    Fixpoint(
        "simplify",
        (
            Step("constant_folding", 2),
            Step("remove_noops", 2),
            Step("merge_chains", 2),
            Step("cse", 2),
            Step("dead_code", 2),
        ),
        level=2,
    ),
    # -O3 folds weights that old exports generate at run time (ConstantOfShape of a big shape): the
    # saved file grows by their bytes, so -O2 keeps its 1 MiB bound, and -O3 bounds it at 1 GiB a tensor.
    Step("constant_folding", 3, options=(("max_output_bytes", 1 << 30),)),
    Step("fuse_sibling_matmuls", 2),  # before fuse_bias: a merged rank-2 MatMul + Add still becomes a Gemm
    Step("fuse_bias", 2),
    Step("fuse_activations", 3),
    Step("fuse_layernorm", 3),
    Step("fuse_attention", 3),
    Step("fuse_conv_activation", 3),  # last: activations are in their final (fused) form
    Fixpoint("final_cleanup", (Step("dead_code", 1), Step("parameter_sharing", 1)), level=1),
    Step("weight_statistics", 2),
)


def pipeline_pass_names() -> list[str]:
    names: list[str] = []
    for step in DEFAULT_PIPELINE:
        for s in step.steps if isinstance(step, Fixpoint) else (step,):
            if s.name not in names:
                names.append(s.name)
    return names
