"""Shared pytest set-up for the lt_zoo tests."""
import torch

# The tests use tiny tensors, where intra-op threads buy nothing; on a shared machine with a couple of
# cores they oversubscribe it instead (creating + back-propagating every registered model took 319 s
# with 2 threads under load vs 12.5 s with 1 thread, same machine and minute).
torch.set_num_threads(1)
