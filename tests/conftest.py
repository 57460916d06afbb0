"""Suite-wide settings.

One intra-op thread: the tests use small tensors, where OpenMP threads buy nothing, and on a
busy 2-core machine threads waiting at barriers for a preempted sibling made some conv tests
10x slower. It also keeps every number independent of the machine's core count.
"""

import torch

torch.set_num_threads(1)
