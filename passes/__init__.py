"""lowbit passes. Importing this package registers every pass in REGISTRY."""
from .base import REGISTRY, Exact, Lossy, Pass, PassContext, PassFailure, PassResult  # noqa: F401
from . import fold_norms, fuse_rotations, insert_hadamard, learn_rotations, lower_kernels, quantize_activations, quantize_weights, scale_channels, shape_noise, split_outliers  # noqa: F401  (registration)
from .pipeline import PassManager, PipelineError, parse_pipeline, print_pipeline  # noqa: F401
from .recipes import DEFAULT_RECIPE, RECIPES  # noqa: F401
