"""Shared test setup: a deterministic hypothesis profile, seeded torch, fresh Dynamo."""

import os

# Triton's CPU interpreter must be chosen before triton is imported (torch imports it): on a
# machine without an NVIDIA device the Triton kernel tests run through it.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


# One intra-op thread per core per pytest-xdist worker (a user's OMP_NUM_THREADS wins): each
# worker is a process with torch's default of a thread per core, so two workers on two cores
# ran four spinning OpenMP threads. On a 2-core VM with a fresh Inductor cache the digits
# demo test took 169 s beside the compile tests and 61 s this way, and it and
# tests/test_coupling.py 331 and 241 s. Set before torch starts: subprocesses inherit it.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault(
        "OMP_NUM_THREADS",
        str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))),
    )

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from torch._dynamo.utils import counters


def _squeeze_triton_36_interpreter_scalars() -> None:
    """Triton 3.6's interpreter (the one torch 2.11 pins) takes a scalar argument's index as
    ``int()`` of a one-element array, which NumPy >= 2.4 rejects ("only 0-dimensional arrays
    can be converted to Python scalars") in every ``range(.., N, ..)`` over an argument;
    triton 3.7 squeezes first, as this does. Test set-up only: a GPU never interprets."""
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:  # no triton on this platform: the Triton tests skip themselves
        return
    if not (os.environ.get("TRITON_INTERPRET") == "1" and triton.__version__.startswith("3.6.")):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


_squeeze_triton_36_interpreter_scalars()
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:  # were torch imported earlier
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("SPARSEFX_HYPOTHESIS_EXAMPLES", "25")),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
    # shrinking re-captures the model for every candidate: far too slow to be worth it in CI
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
settings.register_profile("dev", max_examples=10, derandomize=True, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: Dynamo's recompile limit (8 per code object) is shared
    by every model whose forward shares code (Hugging Face's decorated forwards), and a frame
    past it runs eagerly, without sparsefx."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def triton_device() -> str:
    """Where the Triton tests run: "cuda" on a GPU, else "cpu" under Triton's interpreter;
    a module calling this at import is skipped, naming the missing hardware, otherwise."""
    if torch.cuda.is_available():
        return "cuda"
    from sparsefx.kernels import interpreting

    if not interpreting():
        pytest.skip(
            "the Triton kernels need an NVIDIA GPU, or TRITON_INTERPRET=1 set before triton "
            "is imported (this conftest sets it on machines without /dev/nvidiactl)",
            allow_module_level=True,
        )
    return "cpu"
