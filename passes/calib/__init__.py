"""Layer-sequential calibration shared by GPTQ (quantize) and SparseGPT / Wanda / DSnoT (prune).

Interface::

    from surgery.passes.calib import calibrate_sequential, LinearStats

    def transform(modules: dict[str, nn.Module], stats: dict[str, LinearStats])
            -> dict[str, nn.Module] | None:
        # edit modules in place (e.g. module.weight.data[...] = ...) and/or return
        # {path: replacement} to swap modules (e.g. Linear -> QuantLinear)
        ...

    calibrate_sequential(model, calibration, targets, transform, progress=ctx.progress,
                         batch_size=8, true_sequential=False, gram=True, label="GPTQ")

- ``calibration``: (samples, ...) tensor; each batch of ``batch_size`` rows is fed as
  :func:`surgery.modelcall.forward_ids` (``model(input_ids=batch, use_cache=False)`` for HF
  models, else ``model(batch)``).
- ``targets``: {path relative to ``model``: module}; usually Linear layers (anything with
  ``in_features`` or a 2-D ``weight`` works).
- Blocks (:func:`find_blocks`): the ``nn.ModuleList`` of same-class children (HF ``model.layers``,
  BERT ``encoder.layer``) or the ``nn.Sequential`` holding the most targets. The inputs (args and
  kwargs: attention mask, position embeddings ...) of block 0 are captured by a pre-hook that
  stops the forward. Then for each block: statistics of its targets are accumulated over all
  batches with forward hooks, ``transform`` runs, and the block is re-run with the transformed
  weights to produce the next block's inputs. Only one block's activations are held at a time.
- Targets outside the blocks: those that run before block 0 are handled first; the rest (e.g.
  ``lm_head``), or everything when the model has no repeated blocks, in a final stage with full
  model forwards (so they see the outputs of the already transformed blocks).
- ``true_sequential``: within a block, targets are grouped by shared input in call order
  (LLaMA: q/k/v, then o, then gate/up, then down; BERT: query/key/value, attention output,
  intermediate, output) and each group is calibrated after the previous one was transformed.
- ``gram=False`` skips XᵀX (statistics keep sums and sums of squares only: enough for Wanda and
  DSnoT, much cheaper for wide layers).
- Statistics (:class:`LinearStats`): ``tokens``, ``samples``, ``sum``, ``sq_sum``, ``gram``;
  ``mean()``, ``var()``, ``col_norms()`` (||X_j||₂), ``hessian()`` (2/samples · XᵀX, float32).
- Progress: one task named ``label``, advanced once per block, its text naming the block.
- Hessian helpers (:mod:`surgery.passes.calib.hessian`): ``dead_columns``, ``add_damping``,
  ``act_order_perm``, ``inverse_cholesky_upper``, ``prepare_hessian``.
"""

from surgery.passes.calib.engine import calibrate_sequential, find_blocks, sequential_groups  # noqa: F401
from surgery.passes.calib.hessian import (HessianError, act_order_perm, add_damping,  # noqa: F401
                                          dead_columns, inverse_cholesky_upper, prepare_hessian)
from surgery.passes.calib.stats import LinearStats  # noqa: F401
