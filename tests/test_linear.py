"""oneDNN linear layers (vi_toolkit.linear) against torch's F.linear, and inside fit."""

import pytest
import torch
import torch.nn.functional as F

from vi_toolkit.guides.vae import GaussianEncoder
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit import fit
from vi_toolkit.linear import linear_backend, onednn_available, onednn_linear, resolve_backend

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_torch(shape, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    w = torch.randn(6, 5, generator=gen, requires_grad=True)
    b = torch.randn(6, generator=gen, requires_grad=True) if bias else None
    weights = torch.randn(*shape[:-1], 6, generator=gen)  # a loss whose gradient is not uniform
    inputs = [t for t in (x, w, b) if t is not None]
    y_ref = F.linear(x, w, b)
    grads_ref = torch.autograd.grad((weights * y_ref).sum(), inputs)
    y = onednn_linear(x, w, b)
    grads = torch.autograd.grad((weights * y).sum(), inputs)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_the_context_routes_float32_cpu_linear_layers_only():
    layer = torch.nn.Linear(5, 3)
    x = torch.randn(4, 5, requires_grad=True)
    with linear_backend("onednn"):
        y = layer(x)
        y64 = layer.double()(x.double().detach())
    assert type(y.grad_fn).__name__ == "_OneDNNLinearBackward"  # routed
    assert type(y64.grad_fn).__name__ == "AddmmBackward0"  # float64 stays with torch
    with linear_backend("torch"):
        assert type(layer.float()(x).grad_fn).__name__ == "AddmmBackward0"


def test_backend_names_and_devices():
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cuda") == "torch"  # a GPU keeps its own kernels
    assert resolve_backend("auto", "cpu") in ("onednn", "torch")
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        resolve_backend("mkl", "cpu")
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        fit(lambda x: None, lambda x: None, torch.zeros(3, 1), options={"linear_backend": "fast"})


@needs_onednn
def test_a_vae_fit_is_the_same_with_either_backend():
    """Same seed, same steps: oneDNN and torch differ only by float32 rounding."""
    x = torch.bernoulli(torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    results = {}
    for backend in ("onednn", "torch"):
        torch.manual_seed(0)
        model, guide = DeepLatentGaussian((1, 8, 8), 4, hidden=(32,)), GaussianEncoder((1, 8, 8), 4, hidden=(32,))
        results[backend] = fit(model, guide, x, elbo="meanfield", batch_size=16, num_epochs=5, lr=1e-2, seed=0,
                               progress=False, device="cpu", options={"linear_backend": backend})
    onednn, reference = results["onednn"], results["torch"]
    assert onednn.config["linear_backend"] == "onednn" and reference.config["linear_backend"] == "torch"
    torch.testing.assert_close(torch.tensor(onednn.history["loss"]), torch.tensor(reference.history["loss"]),
                               rtol=1e-4, atol=1e-3)
    assert onednn.elbo > onednn.history["elbo"][0]  # and it learns
