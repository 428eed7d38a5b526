import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter; it must be chosen before any
# kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # SGLang and its kernel libraries warn on import about missing GPUs and their own deprecations.
    for line in ("ignore::DeprecationWarning", "ignore::UserWarning:sglang.*",
                 "ignore::UserWarning:flashinfer.*"):
        config.addinivalue_line("filterwarnings", line)
