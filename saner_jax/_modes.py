"""The values of the core's string-valued mode arguments.

Kept free of JAX, so that the training CLI can offer them as choices (and
print ``--help``) without importing it.
"""

# How sharpness_aware_grad perturbs under a mesh: one perturbation from the
# all-reduced gradient ("synced"), or one per device from its own shard.
PERTURBATION_MODES = ("synced", "per_device")
