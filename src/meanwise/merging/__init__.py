"""Model merging: Fisher-weighted (Matena & Raffel, NeurIPS 2022), plain and task arithmetic.

- `diagonal_fisher`: exact / sampled / empirical diagonal Fisher from per-example gradients,
  also of Hugging Face models (dict batches, ``.logits``, causal LMs per token);
- merge methods, one registered class each (`PlainAverage`, `FisherWeighted`, `TaskArithmetic`;
  `register_method` adds one), all run by one validated path, `iter_merged`;
- `fisher_merge`, `average_merge`, `merge_states`: merges of state dicts in memory, the Fisher
  options given as one `MergeOptions`;
- `search_coefficients`: the paper's grid / Dirichlet search for merge coefficients;
- `merge_checkpoints`: the same merges streamed over safetensors / sharded / torch checkpoints,
  also the `meanwise merge CONFIG.yaml` command.
"""

from meanwise.merging.checkpoints import load_state_dict, open_checkpoint, save_safetensors
from meanwise.merging.fisher import FISHER_MODES, diagonal_fisher, select_parameters
from meanwise.merging.merge import (
    CoefficientSearch,
    average_merge,
    candidate_coefficients,
    fisher_merge,
    merge_states,
    search_coefficients,
)
from meanwise.merging.methods import (
    FisherWeighted,
    MergeMethod,
    PlainAverage,
    TaskArithmetic,
    merge_methods,
    register_method,
)
from meanwise.merging.options import MergeOptions
from meanwise.merging.pipeline import iter_merged
from meanwise.merging.streaming import MergeSummary, merge_checkpoints

__all__ = [
    "diagonal_fisher",
    "FISHER_MODES",
    "select_parameters",
    "fisher_merge",
    "average_merge",
    "merge_states",
    "MergeOptions",
    "MergeMethod",
    "PlainAverage",
    "FisherWeighted",
    "TaskArithmetic",
    "register_method",
    "merge_methods",
    "iter_merged",
    "search_coefficients",
    "candidate_coefficients",
    "CoefficientSearch",
    "merge_checkpoints",
    "MergeSummary",
    "open_checkpoint",
    "load_state_dict",
    "save_safetensors",
]
