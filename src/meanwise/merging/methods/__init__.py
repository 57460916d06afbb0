"""Merge methods, one small registered class per file (see `base`).

Importing this package registers the built-in methods: ``average`` (`PlainAverage`), ``fisher``
(`FisherWeighted`) and ``task_arithmetic`` (`TaskArithmetic`). A new method is a new file here
and one import line below.
"""

from meanwise.merging.methods.base import (
    MergeMethod,
    TensorReads,
    accumulation_dtype,
    merge_methods,
    method_class,
    register_method,
)
from meanwise.merging.methods.fisher_weighted import FisherWeighted
from meanwise.merging.methods.plain_average import PlainAverage
from meanwise.merging.methods.task_arithmetic import TaskArithmetic

__all__ = [
    "MergeMethod",
    "TensorReads",
    "accumulation_dtype",
    "merge_methods",
    "method_class",
    "register_method",
    "PlainAverage",
    "FisherWeighted",
    "TaskArithmetic",
]
