"""Fisher-weighted model merging (Matena & Raffel, NeurIPS 2022).

- `diagonal_fisher`: exact / sampled / empirical diagonal Fisher from per-example gradients,
  also of Hugging Face models (dict batches, ``.logits``, causal LMs per token);
- `fisher_merge`, `average_merge`: merges of state dicts through `meanwise.average`;
- `search_coefficients`: the paper's grid / Dirichlet search for merge coefficients;
- `merge_checkpoints`: a streaming merge of safetensors / sharded / torch checkpoints, also the
  `meanwise merge CONFIG.yaml` command.
"""

from meanwise.merging.checkpoints import load_state_dict, open_checkpoint, save_safetensors
from meanwise.merging.fisher import FISHER_MODES, diagonal_fisher, select_parameters
from meanwise.merging.merge import (
    CoefficientSearch,
    MergeOptions,
    average_merge,
    candidate_coefficients,
    fisher_merge,
    merge_options,
    search_coefficients,
)
from meanwise.merging.streaming import MergeSummary, merge_checkpoints

__all__ = [
    "diagonal_fisher",
    "FISHER_MODES",
    "select_parameters",
    "fisher_merge",
    "average_merge",
    "MergeOptions",
    "merge_options",
    "search_coefficients",
    "candidate_coefficients",
    "CoefficientSearch",
    "merge_checkpoints",
    "MergeSummary",
    "open_checkpoint",
    "load_state_dict",
    "save_safetensors",
]
