"""Auto-encoders and VAEs: networks, the deep latent Gaussian model and its guides."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F

from vi_toolkit.guides.vae import Corruption, DeltaEncoder, GaussianEncoder, IAFEncoder, MeanFieldCodes
from vi_toolkit.models.vae import DeepLatentGaussian
from vi_toolkit import fit
from vi_toolkit.datasets import load_images
from vi_toolkit.elbo import TraceELBO, TraceMeanFieldELBO
from vi_toolkit.traces import trace_pair
from vi_toolkit.networks import Decoder, Encoder

SHAPE = (1, 8, 8)


@pytest.fixture(autouse=True)
def one_thread():
    """Small networks: one thread avoids oversubscribing a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_images("digits", binarize="none", device="cpu")


def images(n=16, seed=0, shape=SHAPE):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


# -- networks --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,shape", [("mlp", (1, 8, 8)), ("conv", (1, 8, 8)), ("mlp", (1, 28, 28)),
                                        ("conv", (1, 28, 28)), ("conv", (3, 16, 12))])
def test_network_shapes(arch, shape):
    enc = Encoder(shape, 5, arch=arch, hidden=(32,), heads=2)
    dec = Decoder(5, shape, arch=arch, hidden=(32,), heads=2)
    x = images(4, shape=shape)
    mu, log_var = enc(x)
    assert mu.shape == log_var.shape == (4, 5)
    outs = dec(mu)
    assert len(outs) == 2 and all(o.shape == (4, *shape) for o in outs)
    assert dec(torch.randn(3, 4, 5))[0].shape == (3, 4, *shape)  # extra (particle) batch dims


def test_network_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"divisible by 4.*\(1, 7, 7\)"):
        Encoder((1, 7, 7), 2, arch="conv")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        Decoder(2, (64,), arch="conv")
    enc = Encoder(SHAPE, 2, arch="conv")
    with pytest.raises(ValueError, match=r"built for points of shape \(1, 8, 8\).*\(4, 1, 28, 28\)"):
        enc(images(4, shape=(1, 28, 28)))
    with pytest.raises(ValueError, match="integer dtype"):
        enc((images(4) * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="unknown activation"):
        Encoder(SHAPE, 2, activation="swish-ish")


# -- likelihoods -----------------------------------------------------------------------------
def model_log_prob(model, x, z):
    """log p(x, z) by tracing the model with z conditioned."""
    tr = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(x)
    return tr.nodes["x"]["fn"].log_prob(x), tr.nodes["z"]["fn"].log_prob(z)


def test_likelihoods_against_hand_formulas():
    x, z = images(6), torch.randn(6, 3)
    ber = DeepLatentGaussian(SHAPE, 3, hidden=(16,))
    log_px, log_pz = model_log_prob(ber, x, z)
    logits = ber.decoder(z)[0]
    expected = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    assert torch.allclose(log_px, expected, atol=1e-4)
    assert torch.allclose(log_pz, -0.5 * (z ** 2).sum(1) - 1.5 * math.log(2 * math.pi), atol=1e-5)

    gau = DeepLatentGaussian(SHAPE, 3, likelihood="gaussian", hidden=(16,), min_scale=0.05)
    log_px, _ = model_log_prob(gau, x, z)
    mu, log_var = gau.decoder(z)
    sd = torch.exp(0.5 * log_var) + 0.05
    expected = (-0.5 * ((x - mu) / sd) ** 2 - sd.log() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    assert torch.allclose(log_px, expected, atol=1e-4)

    fixed = DeepLatentGaussian(SHAPE, 3, likelihood="gaussian_fixed", scale=0.2, hidden=(16,))
    log_px, _ = model_log_prob(fixed, x, z)
    sq = ((x - fixed.decoder(z)[0]) ** 2).flatten(1).sum(1)
    assert torch.allclose(log_px, -sq / (2 * 0.04) - 64 * math.log(0.2 * math.sqrt(2 * math.pi)), atol=1e-3)
    assert ber.sample(5).shape == (5, *SHAPE) and ((ber.sample(5) >= 0) & (ber.sample(5) <= 1)).all()


def test_model_rejects_bad_data():
    model, guide = DeepLatentGaussian(SHAPE, 2, hidden=(8,)), GaussianEncoder(SHAPE, 2, hidden=(8,))
    with pytest.raises(ValueError, match=r"Bernoulli likelihood needs data in \[0, 1\].*1\.5"):
        fit(model, guide, images(10) + 0.5, num_steps=1, progress=False)
    with pytest.raises(ValueError, match="integer dtype"):  # integer pixels beside an index tensor
        fit(model, guide, ((images(10) * 255).to(torch.uint8), torch.arange(10)), num_steps=1, progress=False)
    with pytest.raises(ValueError, match="integer dtype"):  # a bare integer tensor: fit's own check
        fit(model, guide, (images(10) * 255).to(torch.uint8), num_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"built for points of shape \(1, 8, 8\)"):
        fit(model, guide, images(10, shape=(1, 28, 28)), num_steps=1, progress=False)
    with pytest.raises(ValueError, match="nothing to sample"):
        DeepLatentGaussian(SHAPE, 2, prior="flat").sample(3)


# -- the point-mass guide is an auto-encoder -------------------------------------------------
def hand_written_autoencoder(guide, model, x):
    """x^ = sigmoid(W4 relu(W3 relu(W2 ... ))) written out with the networks' weights."""
    (l1, _, l2), (l3, _, l4) = guide.encoder.body, model.decoder.body
    h = torch.relu(x.flatten(1) @ l1.weight.T + l1.bias)
    code = h @ l2.weight.T + l2.bias
    h = torch.relu(code @ l3.weight.T + l3.bias)
    return code, (h @ l4.weight.T + l4.bias).reshape(x.shape)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian_fixed"])
def test_delta_guide_loss_is_the_reconstruction_loss(likelihood):
    x = images(12)
    model = DeepLatentGaussian(SHAPE, 4, likelihood=likelihood, scale=0.3, hidden=(16,), prior="flat")
    guide = DeltaEncoder(SHAPE, 4, hidden=(16,))
    loss = TraceELBO().differentiable_loss(model, guide, x)
    _, out = hand_written_autoencoder(guide, model, x)
    if likelihood == "bernoulli":
        expected = F.binary_cross_entropy(torch.sigmoid(out), x, reduction="sum")
    else:  # squared error / 2 s^2 plus the Gaussian's normalizer
        expected = F.mse_loss(out, x, reduction="sum") / (2 * 0.3 ** 2) + x.numel() * math.log(
            0.3 * math.sqrt(2 * math.pi))
    assert torch.allclose(loss, expected, rtol=1e-5)
    # with the N(0, I) prior: the MAP auto-encoder, plus ||f(x)||^2 / 2 and the normalizer
    model.prior = "normal"
    code, _ = hand_written_autoencoder(guide, model, x)
    penalty = 0.5 * (code ** 2).sum() + x.shape[0] * 2 * math.log(2 * math.pi)
    assert torch.allclose(TraceELBO().differentiable_loss(model, guide, x), expected + penalty, rtol=1e-5)


# -- analytic KL and Monte Carlo KL ----------------------------------------------------------
def test_analytic_and_monte_carlo_kl_agree_in_expectation():
    x = images(8)
    model, guide = DeepLatentGaussian(SHAPE, 3, hidden=(16,)), GaussianEncoder(SHAPE, 3, hidden=(16,))
    with torch.no_grad():  # give the encoder an informative, non-standard posterior
        guide.encoder.body[-1].bias.copy_(torch.tensor([1.0, -0.5, 0.3, -1.0, 0.4, -2.0]))
    pyro.set_rng_seed(0)
    repeats, particles = 30, 200
    estimates = {}
    for name, cls in (("analytic", TraceMeanFieldELBO), ("mc", TraceELBO)):
        elbo = cls(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
        with torch.no_grad():
            estimates[name] = torch.stack([-elbo.differentiable_loss(model, guide, x) for _ in range(repeats)])
    diff = estimates["analytic"].mean() - estimates["mc"].mean()
    se = (estimates["analytic"].var() / repeats + estimates["mc"].var() / repeats).sqrt()
    assert abs(diff) < 4 * se
    assert estimates["analytic"].std() < estimates["mc"].std()  # the closed form removes noise
    # the closed form itself, the lecture's formula with its sign: KL = -1/2 sum(1 + log s^2 - mu^2 - s^2)
    mu, log_var = guide.encoder(x)
    kl = -0.5 * (1 + log_var - mu ** 2 - log_var.exp()).sum()
    q = torch.distributions.Normal(mu, (0.5 * log_var).exp())
    z = q.sample((20000,))
    kl_mc = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum((1, 2))
    assert abs(kl_mc.mean() - kl) < 4 * kl_mc.std() / math.sqrt(20000)


# -- fitting on the digits -------------------------------------------------------------------
def test_vae_elbo_improves_and_beats_independent_pixels(digits):
    model, guide = DeepLatentGaussian(SHAPE, 4, hidden=(64,)), GaussianEncoder(SHAPE, 4, hidden=(64,))
    result = digits.fit(model, guide, elbo="meanfield", batch_size=128, num_epochs=40, lr=3e-3, seed=0,
                        progress=False)
    assert result.history["val_elbo"][-1] > result.history["val_elbo"][0] + 5
    # independent Bernoulli pixels with their maximum-likelihood means are a VAE whose decoder
    # ignores z (and q = p): the fitted VAE must do better on held-out images
    p = digits.train.mean(0).clamp(1e-3, 1 - 1e-3)
    baseline = (digits.val * p.log() + (1 - digits.val) * (1 - p).log()).flatten(1).sum(1).mean()
    assert result.val_elbo > float(baseline) + 1


def test_mean_field_codes_per_data_point(digits):
    x = digits.train[:256]
    model, guide = DeepLatentGaussian(SHAPE, 4, hidden=(32,)), MeanFieldCodes(4)
    result = fit(model, guide, (x, torch.arange(256)), elbo="meanfield", batch_size=64, num_epochs=30, lr=1e-2,
                 seed=0, progress=False)
    assert result.params["z_loc"].shape == (256, 4)
    assert result.elbo > result.history["elbo"][0] + 3
    with pytest.raises(ValueError, match="needs the index tensor"):
        fit(model, guide, x, batch_size=64, num_steps=1, progress=False)


def test_iaf_guide_density_and_fit(digits):
    guide = IAFEncoder(SHAPE, 3, hidden=(16,), num_flows=2)
    x = digits.train[:5]
    tr = poutine.trace(guide).get_trace(x)
    z = tr.nodes["z"]["value"]
    # invert the flows by hand and apply the change of variables
    mu, log_var = guide.encoder(x)
    base = torch.distributions.Normal(mu, (0.5 * log_var).exp())
    y, log_det = z, 0.0
    for flow in reversed(guide.flows):
        prev = flow.inv(y)
        log_det = log_det + flow.log_abs_det_jacobian(prev, y)
        y = prev
    expected = base.log_prob(y).sum(-1) - log_det
    assert torch.allclose(tr.nodes["z"]["fn"].log_prob(z), expected, atol=1e-4)
    model = DeepLatentGaussian(SHAPE, 3, hidden=(32,))
    result = digits.fit(model, guide, batch_size=128, num_epochs=10, lr=3e-3, seed=0, progress=False)
    assert result.val_elbo > result.history["val_elbo"][0]


# -- denoising: which input each side sees ---------------------------------------------------
@pytest.mark.parametrize("kind,level", [("gaussian", 0.3), ("mask", 0.4), ("salt_pepper", 0.3)])
def test_denoising_guide_sees_corrupted_model_sees_clean(kind, level):
    x = images(32)
    corruption = Corruption(kind, level)
    model = DeepLatentGaussian(SHAPE, 2, hidden=(8,))
    guide = DeltaEncoder(SHAPE, 2, hidden=(8,), corruption=corruption)
    seen = []
    guide.encoder.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    torch.manual_seed(5)
    guide_trace, model_trace = trace_pair(model, guide, (x,), {})
    torch.manual_seed(5)  # the guide's first random draws are the corruption's
    expected = corruption(x)
    assert len(seen) == 1 and torch.equal(seen[0], expected) and not torch.equal(seen[0], x)
    assert torch.equal(model_trace.nodes["x"]["value"], x)  # the likelihood scores the clean x
    changed = (seen[0] != x).float().mean()
    if kind == "gaussian":
        assert abs(float((seen[0] - x).std()) - level) < 0.05
    else:
        assert abs(float(changed) - level) < 0.05  # continuous pixels: every hit changes one
    # the code is f(x~): the decoder of the model receives it
    assert torch.allclose(model_trace.nodes["z"]["value"], guide.encoder(expected)[0])


def test_corruption_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown corruption"):
        Corruption("blur", 0.1)
    with pytest.raises(ValueError, match="probability"):
        Corruption("mask", 1.5)
    with pytest.raises(ValueError, match="Corruption"):
        DeltaEncoder(SHAPE, 2, corruption=0.3)
