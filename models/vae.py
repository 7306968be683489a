"""Deep latent Gaussian model: the generative side of auto-encoders and VAEs.

    z_i ~ p(z) = N(0, I_d),                         i = 1..N
    x_i | z_i ~ p(x | z; theta),  with the parameters of p(x | z) output by a decoder NN_theta(z):

* ``likelihood="bernoulli"``  p(x | z) = prod_j Bernoulli(x_j; sigmoid(NN_theta(z)_j)), for
  binarized data (grey levels in [0, 1] are scored by the same cross-entropy);
* ``likelihood="gaussian"``   the lecture's example: mu(z), log sigma^2(z) = NN_theta(z),
  p(x | z) = N(x; mu(z), diag sigma^2(z)), per-pixel mean and learned log-variance
  (sigma(z) is floored at ``min_scale`` so that constant pixels cannot make it diverge);
* ``likelihood="gaussian_fixed"``  p(x | z) = N(x; mu(z), s^2 I) with a fixed ``scale`` s.

Paired with an amortized Gaussian guide q(z | x) (``vi_toolkit.guides.vae``) this is the VAE of
Kingma & Welling (2013); with a point-mass guide q(z | x) = delta(z - f(x)) the ELBO is
log p(x | g(f(x))) + log p(f(x)), an auto-encoder with reconstruction loss
-log p(x | z) (cross-entropy, or squared error / 2 s^2 + const) and a penalty ||f(x)||^2 / 2
on the codes. ``prior="flat"`` replaces p(z) by the improper uniform density (log p(z) = 0):
the ELBO with a point-mass guide is then exactly minus the reconstruction loss of a plain
auto-encoder, whose latent space has no density to sample from (the lecture's point).
"""

import pyro
import pyro.distributions as dist
from pyro.distributions.util import is_validation_enabled
import torch
from torch import nn
from torch.distributions import constraints

from vi_toolkit.networks import Decoder, check_batch
from vi_toolkit.plates import data_plate
from vi_toolkit.specs import Rebuildable

LIKELIHOODS = {"bernoulli": 1, "gaussian": 2, "gaussian_fixed": 1}  # decoder heads of each
PRIORS = ("normal", "flat")


class DeepLatentGaussian(Rebuildable, nn.Module):
    """p(z) p(x | z; theta) for data points of ``data_shape`` and codes of size ``latent_dim``.

    ``arch``, ``hidden``, ``activation`` and ``channels`` build the decoder
    (:class:`vi_toolkit.networks.Decoder`). Call it as a Pyro model,
    ``model(x, index=None, num_data=None)``; ``index`` (a per-point guide's index
    tensor) is ignored here.
    """

    def __init__(self, data_shape, latent_dim, *, likelihood="bernoulli", arch="mlp", hidden=(400,),
                 activation="relu", channels=(32, 64), scale=0.1, min_scale=1e-2, prior="normal"):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}: use one of {', '.join(LIKELIHOODS)}")
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}: use one of {', '.join(PRIORS)}")
        if not scale > 0 or not min_scale >= 0:
            raise ValueError(f"scale must be positive and min_scale non-negative, got {scale!r}, "
                             f"{min_scale!r}")
        self.decoder = Decoder(latent_dim, data_shape, arch=arch, hidden=hidden, activation=activation,
                               channels=channels, heads=LIKELIHOODS[likelihood])
        self.data_shape, self.latent_dim = self.decoder.data_shape, latent_dim
        self.likelihood, self.prior, self.scale, self.min_scale = likelihood, prior, scale, min_scale

    def prior_dist(self, batch, like):
        """p(z) for ``batch`` points, as a distribution with event shape (latent_dim,)."""
        loc = like.new_zeros(batch, self.latent_dim)
        if self.prior == "flat":
            return dist.ImproperUniform(constraints.real, (batch,), (self.latent_dim,))
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)

    def likelihood_dist(self, z):
        """p(x | z) with event shape ``data_shape``."""
        heads = self.decoder(z)
        event = len(self.data_shape)
        if self.likelihood == "bernoulli":
            # validate_args=False: grey levels in [0, 1] are scored by the cross-entropy too
            return dist.Bernoulli(logits=heads[0], validate_args=False).to_event(event)
        if self.likelihood == "gaussian":
            loc, log_var = heads
            return dist.Normal(loc, (0.5 * log_var).exp() + self.min_scale).to_event(event)
        return dist.Normal(heads[0], heads[0].new_tensor(self.scale)).to_event(event)

    def check_data(self, x):
        """Shape, dtype and (for the Bernoulli likelihood) range of a batch: ``ValueError`` if bad."""
        check_batch(x, self.data_shape, "model")
        if self.likelihood == "bernoulli":
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                raise ValueError(f"the Bernoulli likelihood needs data in [0, 1], got values in "
                                 f"[{lo:.4g}, {hi:.4g}]: scale or binarize the data "
                                 "(vi_toolkit.datasets), or use a Gaussian likelihood")

    def forward(self, x, index=None, num_data=None):
        pyro.module("decoder", self.decoder)
        if is_validation_enabled():  # fit validates the first step; checks read x back
            self.check_data(x)
        with data_plate(x, num_data):
            z = pyro.sample("z", self.prior_dist(x.shape[0], x))
            pyro.sample("x", self.likelihood_dist(z), obs=x)

    @torch.no_grad()
    def decode(self, z):
        """The mean of p(x | z): sigmoid(logits) (Bernoulli) or mu(z) (Gaussian)."""
        head = self.decoder(z)[0]
        return head.sigmoid() if self.likelihood == "bernoulli" else head

    @torch.no_grad()
    def sample(self, num_samples, *, mean=True, generator=None):
        """Generate: z ~ p(z), then the mean of p(x | z) (``mean=True``) or x ~ p(x | z)."""
        if self.prior == "flat":
            raise ValueError("prior='flat' is an improper density over the latent space: there is "
                             "nothing to sample from; fit a density to the codes instead "
                             "(the lecture's 'sampling from an AE's latent space')")
        device = next(self.decoder.parameters()).device
        z = torch.randn(num_samples, self.latent_dim, generator=generator,
                        device=device if generator is None else generator.device).to(device)
        return self.decode(z) if mean else self.likelihood_dist(z).sample()
