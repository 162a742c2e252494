"""Shared pytest set-up for the lt_zoo tests."""
import os

import torch

# Without a GPU, CompoundBatchNorm2d's Triton kernels (kernel='triton') run in Triton's interpreter on CPU
# tensors.  Triton reads this when a kernel is defined, i.e. when lt_zoo is imported: before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

# The tests use tiny tensors, where intra-op threads buy nothing; on a shared machine with a couple of
# cores they oversubscribe it instead (creating + back-propagating every registered model took 319 s
# with 2 threads under load vs 12.5 s with 1 thread, same machine and minute).
torch.set_num_threads(1)
