"""Custom torch.autograd.Functions in transformed models.

torch.export records a Function's forward as ops, so a captured graph would differentiate
the forward and never call the Function's backward. Capture keeps such a Function whole
(`sparsefx::autograd_function`) where its backward is not its forward's gradient, so that
transform's gradients are eager PyTorch's; a Function whose backward is that gradient keeps
its forward's ops, which the analysis sees through.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn

import sparsefx
from sparsefx.autograd_functions import autograd_function, custom_functions


class Doubled(torch.autograd.Function):
    """The identity with a doubled gradient (a gradient scaling)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)  # a view of its input: the op must return a copy

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class StraightThrough(torch.autograd.Function):
    """Rounding with the identity as its gradient (quantisation-aware training)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(4 * x) / 4

    @staticmethod
    def backward(ctx, grad):
        return grad


class Reversed(torch.autograd.Function):
    """Two outputs and a constant argument: (x * scale, x) with the gradient of the first
    reversed, as a domain-adversarial gradient reversal."""

    @staticmethod
    def forward(ctx, x, scale, options):
        ctx.scale = scale * options["sign"]
        return x * scale, x.clone()

    @staticmethod
    def backward(ctx, grad_scaled, grad_x):
        return ctx.scale * grad_scaled + grad_x, None, None


class Shuffled(torch.autograd.Function):
    """Reads an integer index (not probed: indices cannot be drawn at random)."""

    @staticmethod
    def forward(ctx, x, order):
        ctx.save_for_backward(order)
        return x[:, order]

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return 3 * torch.zeros_like(grad).index_copy(1, order, grad), None


class MaskedSoftmax(torch.autograd.Function):
    """SEW-D's XSoftmax: its forward writes into the softmax it saves, so autograd cannot
    differentiate the forward's ops (the training step failed in backward before)."""

    @staticmethod
    def forward(ctx, x, mask):
        out = torch.softmax(x, -1)
        out.masked_fill_(mask, 0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return out * (grad - (grad * out).sum(-1, keepdim=True)), None


class SigmoidGelu(torch.autograd.Function):
    """A hand-written exact derivative, as Bloom's GeLU in training."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        return grad * (s + 1.702 * x * s * (1 - s))


class _Scale:
    factor = 3.0


class ScaledExactly(torch.autograd.Function):
    """An exact backward with an object argument (as DeBERTa's dropout context)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.factor = scale.factor
        return x * scale.factor

    @staticmethod
    def backward(ctx, grad):
        return ctx.factor * grad, None


def _reversed(h: Tensor) -> Tensor:
    scaled, same = Reversed.apply(h, 0.5, {"sign": -1.0})
    return scaled + same


_APPLICATIONS = {
    Doubled: lambda h: Doubled.apply(h),
    StraightThrough: lambda h: StraightThrough.apply(h),
    Reversed: _reversed,
    Shuffled: lambda h: Shuffled.apply(h, torch.arange(h.shape[1] - 1, -1, -1)),
    MaskedSoftmax: lambda h: MaskedSoftmax.apply(h, torch.arange(h.shape[1]) % 5 == 0),
    SigmoidGelu: lambda h: SigmoidGelu.apply(h),
    ScaledExactly: lambda h: ScaledExactly.apply(h, _Scale()),
}
"""How FunctionNet applies each Function (called in its forward: torch.compile of torch 2.11
breaks the graph at an apply bound beforehand, `PreBoundNet`)."""


class FunctionNet(nn.Module):
    """fc1 -> ReLU -> the Function -> fc2 -> ReLU -> head, with a loss."""

    def __init__(self, function: type[torch.autograd.Function]):
        super().__init__()
        self.function = function
        self.apply_function = _APPLICATIONS[function]
        self.fc1, self.act1 = nn.Linear(8, 16), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(16, 12), nn.ReLU()
        self.head = nn.Linear(12, 3)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.apply_function(self.act1(self.fc1(x)))
        return F.cross_entropy(self.head(self.act2(self.fc2(h))), y)


def _data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(6, 8, generator=generator), torch.randint(0, 3, (6,), generator=generator)


def _transform(model: nn.Module, x: Tensor, y: Tensor, **options) -> nn.Module:
    """Transform, failing on capture's warning that a Function's backward is not called."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*custom torch.autograd.Function")
        return sparsefx.transform(model, (x, y), config=sparsefx.SparseConfig(**options))


def _masked_gradients(model: FunctionNet, x: Tensor, y: Tensor, masks: dict[str, Tensor]):
    """Eager PyTorch's gradients with each producer's dropped channels zeroed at the end of
    its channel-wise chain (DESIGN §2; the Function ends fc1's chain)."""
    hooks = [
        model.act1.register_forward_hook(lambda m, i, out: out * masks["fc1"]),
        model.act2.register_forward_hook(lambda m, i, out: out * masks["fc2"]),
    ]
    try:
        model(x, y).backward()
    finally:
        for hook in hooks:
            hook.remove()
    return {name: p.grad for name, p in model.named_parameters()}


def _compiled(model: nn.Module, x: Tensor, y: Tensor, **options) -> nn.Module:
    compiled = torch.compile(model, backend="sparsefx", options=options)
    compiled(x, y)  # compiles: the structure exists from here
    return compiled


FUNCTIONS = [Doubled, StraightThrough, Reversed, Shuffled, MaskedSoftmax]


@pytest.mark.parametrize(
    ("function", "entry"),
    [(f, _transform) for f in FUNCTIONS] + [(f, _compiled) for f in FUNCTIONS[:-1]],
)
def test_sparse_training_runs_the_functions_own_backward(function, entry):
    """Before, transform differentiated the Function's forward ops: the doubled gradient
    came out single, the straight-through one zero, the reversal unreversed, and the masked
    softmax failed; the compiled path refused every custom Function. Now every parameter's
    gradient is eager PyTorch's under the same masks, on both paths, and the Function
    reads its input at full width (it is opaque to the analysis)."""
    torch.manual_seed(0)
    x, y = _data()
    model = FunctionNet(function)
    sparse = entry(copy.deepcopy(model), x, y, density=0.5)
    masks = {"fc1": torch.arange(16) % 3 != 1, "fc2": torch.arange(12) % 2 == 0}
    sparsefx.set_masks(sparse, masks)
    sparse(x, y).backward()
    expected = _masked_gradients(model, x, y, masks)
    parameters = (sparse.model if entry is _transform else sparse).named_parameters()
    for name, parameter in parameters:
        name = name.removeprefix("_orig_mod.")
        torch.testing.assert_close(parameter.grad, expected[name], msg=name)
    assert expected["fc1.weight"].abs().sum() > 0
    if entry is _transform:
        assert any(op.op == "autograd_function.default" for op in sparse.analysis.scatters)


@pytest.mark.parametrize(
    ("function", "entry"),
    [(SigmoidGelu, _transform), (ScaledExactly, _transform), (SigmoidGelu, _compiled)],
)
def test_a_function_whose_backward_is_its_forwards_gradient_keeps_its_ops(function, entry):
    """Bloom's GeLU: the probe finds the two gradients equal, so its ops stay in the graph
    and fc1's channels run compact through it (no scatter), with eager's gradients, and
    without a warning, also where an argument is an object the op could not hold. The
    compiled path inlines Dynamo's traced forward of it (before, it refused the model)."""
    torch.manual_seed(0)
    x, y = _data()
    model = FunctionNet(function)
    sparse = entry(copy.deepcopy(model), x, y, density=1.0)
    module = sparse.model if entry is _transform else sparse._orig_mod
    runtime = sparse if entry is _transform else sparsefx.compiled.runtime_of(module)
    assert not runtime.analysis.scatters and sparsefx.groups(sparse)
    sparse(x, y).backward()
    model(x, y).backward()
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(parameter.grad, dict(model.named_parameters())[name].grad)


class ScaledByObject(torch.autograd.Function):
    """An argument that is an object: the op cannot hold it as a constant."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.factor = scale.factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return ctx.factor * grad, None


class NoisyDoubled(torch.autograd.Function):
    """A random forward: a backward that ran it again would see other noise."""

    @staticmethod
    def forward(ctx, x):
        return x + 0.01 * torch.randn_like(x)

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


_APPLICATIONS[ScaledByObject] = lambda h: ScaledByObject.apply(h, _Scale())
_APPLICATIONS[NoisyDoubled] = lambda h: NoisyDoubled.apply(h)


@pytest.mark.parametrize("function", [ScaledByObject, NoisyDoubled])
def test_a_function_sparsefx_cannot_run_whole_is_traced_with_a_warning(function):
    x, y = _data()
    with pytest.warns(UserWarning, match=rf"Function .*{function.__name__} through its forward"):
        sparse = sparsefx.transform(
            FunctionNet(function), (x, y), config=sparsefx.SparseConfig(density=0.5)
        )
    assert not any(op.op == "autograd_function.default" for op in sparse.analysis.scatters)


class PreBoundNet(FunctionNet):
    """Applies the straight-through estimator through ``StraightThrough.apply`` bound at
    construction, before capture (as ``ste = StraightThrough.apply`` at import)."""

    def __init__(self):
        super().__init__(StraightThrough)
        self.apply_function = StraightThrough.apply


def test_an_apply_bound_before_capture_is_seen():
    """Capture's wrapper sits where ``Function.apply`` calls ``super().apply``, so a bound
    apply reaches it as well: its gradient is the estimator's (it was its forward's, zero)."""
    torch.manual_seed(0)
    x, y = _data()
    model = PreBoundNet()
    sparse = _transform(copy.deepcopy(model), x, y, density=1.0)
    sparse(x, y).backward()
    model(x, y).backward()
    assert model.fc1.weight.grad.abs().sum() > 0
    torch.testing.assert_close(sparse.model.fc1.weight.grad, model.fc1.weight.grad)


@pytest.mark.parametrize("function", [NoisyDoubled, MaskedSoftmax])
def test_the_compiled_path_refuses_a_function_it_cannot_run_whole(function):
    """A random forward, or one writing in place (which torch 2.11's Dynamo returns twice,
    misread by its backward); transform runs the masked softmax whole (above)."""
    x, y = _data()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"random numbers.*in place"):
        _compiled(FunctionNet(function), x, y, density=0.5)


def test_the_probe_leaves_the_random_state_and_the_op_its_process():
    """The probe draws its inputs from its own generator and forks torch's: a transform
    must not move the user's random stream. The op's key indexes this process's
    applications; another process's graph gets a clear error, not another Function."""
    x, y = _data()
    model = FunctionNet(Doubled)
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    with custom_functions() as inlined:
        program = torch.export.export(model, (x, y), strict=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not inlined and "autograd_function" in str(program.graph)
    model = FunctionNet(NoisyDoubled)
    state = torch.random.get_rng_state()
    with custom_functions() as inlined:
        program = torch.export.export(model, (x, y), strict=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert inlined == {f"{__name__}.NoisyDoubled"}
    assert "autograd_function" not in str(program.graph)
    with pytest.raises(RuntimeError, match="Transform the model again"):
        autograd_function([x], 10**6)


def test_an_exported_inference_program_runs_the_functions_forward_ops():
    """sparsefx.export decomposes the op back into the Function's forward: no process-local
    key, no sparsefx op, and the frozen model's output."""
    x, y = _data()
    sparse = _transform(FunctionNet(Reversed), x, y, density=0.5)
    for _ in range(3):
        sparse(x, y).backward()
    sparsefx.freeze(sparse)
    sparse.eval()
    program = sparsefx.export(sparse, (x, y))
    assert "sparsefx" not in str(program.graph)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, y), sparse(x, y))
