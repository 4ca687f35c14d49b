"""Structured (whole-group) pruning of keras_mgconv's layers with tfmot's machinery.

tfmot's block sparsity takes only 2D weights, and a grouped kernel is 4D. The
wrapper here is tfmot's `PruneLowMagnitude` (same schedule, mask, threshold,
`UpdatePruningStep` and `strip_pruning`) whose masks are computed per group.

Imports tensorflow_model_optimization and its pruning internals (the wrapper
and the mask computation have no public extension point): only
`keras_mgconv.optimization` imports this module, and only once it has checked
that the process runs tf_keras.
"""

import tensorflow as tf
from tensorflow_model_optimization.python.core.sparsity.keras import (
    prune_registry,
    pruning_impl,
    pruning_wrapper,
)

from keras_mgconv.layers import GroupedConv2D, MultigridConv2D


def can_prune(layer):
    """Whether tfmot's `prune_low_magnitude` accepts `layer` (its own test)."""
    return hasattr(layer, "get_prunable_weights") or prune_registry.PruneRegistry.supports(layer)


def can_prune_groups(layer):
    """Whether `layer` has groups that can go without silencing an output channel."""
    return isinstance(layer, MultigridConv2D) or (
        isinstance(layer, GroupedConv2D) and layer.residual
    )


def _group_pruned(layer):
    """The convolutions of a built `layer` (`can_prune_groups`) whose groups are pruned.

    A smoother or residual convolution with a zeroed group passes those channels
    through, a prolongation leaves them uncorrected, a restriction gives the
    coarsest level fewer channels to couple. A connector's or plain
    convolution's zeroed group would output zeros, on which a following
    BatchNormalization learns a moving variance near 0 and then, at inference,
    multiplies any difference by up to 1 / sqrt(epsilon).
    """
    if isinstance(layer, MultigridConv2D):
        return (*layer.restrictions, *layer.prolongations, *layer.smoothers)
    return (layer,)


class _GroupPruning(pruning_impl.Pruning):
    """tfmot's magnitude pruning, keeping the largest groups rather than weights.

    As tfmot's thresholding, it keeps `max(1, round(G * (1 - sparsity)))` of
    the G groups, but exactly that many: tied groups (transfers start with all
    weights equal, and those fed only by pruned channels get no gradient) are
    kept in group order rather than all.

    Args:
        groups: dict from each pruned kernel's `ref()` to its number of groups.
        **kwargs: `pruning_impl.Pruning`'s arguments.
    """

    def __init__(self, groups, **kwargs):
        super().__init__(**kwargs)
        self._groups = groups

    def _maybe_update_block_mask(self, weights):
        groups = self._groups[weights.ref()]
        kh, kw, group_inputs, filters = weights.shape
        blocks = tf.reshape(tf.abs(weights), (kh * kw * group_inputs, groups, filters // groups))
        pool = tf.reduce_max if self._block_pooling_type == "MAX" else tf.reduce_mean
        scores = pool(blocks, axis=(0, 2))
        sparsity = self._pruning_schedule(self._step_fn())[1]
        kept = tf.maximum(tf.cast(tf.round(groups * (1 - sparsity)), tf.int32), 1)
        kept_scores, kept_groups = tf.math.top_k(scores, k=kept)
        group_mask = tf.scatter_nd(kept_groups[:, tf.newaxis], tf.ones_like(kept_scores), [groups])
        mask = tf.broadcast_to(group_mask[tf.newaxis, :, tf.newaxis], blocks.shape)
        return kept_scores[-1], tf.reshape(mask, weights.shape)


class GroupPruneLowMagnitude(pruning_wrapper.PruneLowMagnitude):
    """tfmot's pruning wrapper for multigrid layers, pruning whole groups.

    Prunes the groups (blocks `(kh, kw, C_in / G, C_out / G)`) of the
    restrictions, prolongations and smoothers of a `MultigridConv2D`, or of a
    residual `GroupedConv2D`: zeroed, each leaves a path for its channels, so no
    output channel of the layer goes silent. Groups are scored by their mean
    absolute weight (`block_pooling_type="MAX"`: their largest), and all but the
    `max(1, round(G * (1 - sparsity)))` best are zeroed. The connector and the
    coarsest level keep all their weights.

    Args:
        layer: a `MultigridConv2D` or a residual `GroupedConv2D`.
        *args, **kwargs: `tfmot.sparsity.keras.prune_low_magnitude`'s.

    Raises:
        ValueError: for another layer.
    """

    def __init__(self, layer, *args, **kwargs):
        if not can_prune_groups(layer):
            raise ValueError(
                "Structured pruning prunes the groups of MultigridConv2D layers and "
                "residual GroupedConv2D layers, whose channels keep a path when a "
                f"group goes. Received: layer={layer.name!r} of type "
                f"{type(layer).__name__}."
            )
        super().__init__(layer, *args, **kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        groups = {conv.kernel.ref(): conv.groups for conv in _group_pruned(self.layer)}
        self.pruning_vars = [
            variables for variables in self.pruning_vars if variables[0].ref() in groups
        ]
        self.pruning_obj = _GroupPruning(
            groups=groups,
            training_step_fn=lambda: self.pruning_step,
            pruning_vars=self.pruning_vars,
            pruning_schedule=self.pruning_schedule,
            block_size=self.block_size,
            block_pooling_type=self.block_pooling_type,
        )


# What tfmot's `prune_scope` holds, plus the structured wrapper.
CUSTOM_OBJECTS = {
    "PruneLowMagnitude": pruning_wrapper.PruneLowMagnitude,
    "GroupPruneLowMagnitude": GroupPruneLowMagnitude,
}
