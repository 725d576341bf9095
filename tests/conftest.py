import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests' tensors are small: one thread runs them fastest and is not slowed by other work on the machine.
torch.set_num_threads(1)
