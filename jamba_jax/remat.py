"""What a decoder layer keeps for the backward pass (`JambaConfig.remat_policy`), MaxText's way: the
layer is wrapped in `nn.remat` with a `jax.checkpoint` policy, and the tensors a policy may keep are
tagged with `checkpoint_name` where they are computed:

  attention_core  the attention's output and log-sum-exp, what its backward pass reads
                  (`common.attention.blockwise.CORE_NAME`; the Pallas path tags the same)
  moe_hidden      the experts' hidden activations act(x W_gate) * (x W_up) (`kernels.grouped_matmul`)

Policies:
  none                            no remat: the layer keeps every activation its backward pass reads
  full                            keeps only the layer's input; the backward pass recomputes the layer
  save_dots                       keeps the outputs of matmuls without batch dimensions (the projections,
                                  the MLP), recomputes the rest (norms, activations, the scan, attention)
  save_attention_and_moe_outputs  keeps the two tagged outputs: the backward pass recomputes the projections
                                  and the Mamba mixers, but not the attention loop or the experts' first matmuls

Under `scan_layers` the remat sits inside the scan body, where XLA's common-subexpression elimination
cannot merge the recomputation with the forward pass, so `prevent_cse=False` there (jax's advice for
remat inside scan) and True in the unrolled stack. XLA:CPU keeps the savings only in the scanned stack
(BENCHMARKS.md `remat_policies`).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from common.attention.blockwise import CORE_NAME
from jamba_jax.config import JambaConfig
from kernels.grouped_matmul import HIDDEN_NAME

_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_and_moe_outputs": jax.checkpoint_policies.save_only_these_names(CORE_NAME, HIDDEN_NAME),
}


def remat_layer(layer_cls: type[nn.Module], cfg: JambaConfig) -> type[nn.Module]:
    """`layer_cls` rematerialised as `cfg.remat_policy` says (the class itself for "none")."""
    if cfg.remat_policy == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
