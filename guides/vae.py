"""Guides for ``vi_toolkit.models.vae.DeepLatentGaussian``: the inference side of auto-encoders and VAEs.

Each guide is called like the model, ``guide(x, index=None, num_data=None)``, and opens
the same data plate for its local codes z_i.

* :class:`GaussianEncoder`  the VAE's amortized inference network:
  mu(x), log sigma^2(x) = NN_phi(x),  q(z | x) = N(z; mu(x), diag sigma^2(x)),
  sampled by reparameterization z = mu(x) + sigma(x) * eps, eps ~ N(0, I). Against the
  N(0, I) prior the KL term is analytic (``fit(..., elbo="meanfield")``):
  KL(q || p) = -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)
  (the lecture writes the bracket without its minus sign: it is -KL).
* :class:`DeltaEncoder`  q(z | x) = delta(z - f(x)): a deterministic encoder; the ELBO becomes
  log p(x | g(f(x))) + log p(f(x)), i.e. an auto-encoder (see ``vi_toolkit.models.vae``).
* Either encoder with ``corruption=Corruption(...)`` is a **denoising** guide: it encodes
  x~ ~ c(x~ | x) (Gaussian noise, masking, or salt-and-pepper), drawn afresh at every call,
  while the model's likelihood still scores the clean x: h(x~) = g(f(x~)) ~ x.
* :class:`MeanFieldCodes`  non-amortized: q(z_i) = N(m_i, diag s_i^2) with parameters per data
  point, looked up by the index tensor the data carry (``data=(x, torch.arange(N))``).
* :class:`IAFEncoder`  a normalizing flow on top of the amortized Gaussian: z_0 ~ N(mu(x),
  sigma^2(x)), z = f_K o ... o f_1(z_0) with inverse autoregressive flows (Kingma et al. 2016)
  f(z) = mu_k(z) + sigma_k(z) * z with autoregressive mu_k, sigma_k, so that
  log q(z | x) = log N(z_0; mu(x), sigma^2(x)) - sum_k log ``|det df_k / dz|``.
"""

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn
from torch.distributions import constraints

from vi_toolkit.networks import Encoder
from vi_toolkit.plates import data_plate
from vi_toolkit.specs import Rebuildable

CORRUPTIONS = ("gaussian", "mask", "salt_pepper")


class Corruption(Rebuildable):
    """A corruption process c(x~ | x) for denoising auto-encoders.

    * ``"gaussian"``     x~ = x + level * eps, eps ~ N(0, I);
    * ``"mask"``         each pixel set to 0 with probability ``level``;
    * ``"salt_pepper"``  each pixel, with probability ``level``, set to 0 or 1 (equally likely).
    """

    def __init__(self, kind="gaussian", level=0.3):
        if kind not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {kind!r}: use one of {', '.join(CORRUPTIONS)}")
        if not level >= 0 or (kind != "gaussian" and level > 1):
            raise ValueError(f"corruption level must be >= 0 (a probability for {kind!r}), got {level!r}")
        self.kind, self.level = kind, level

    def __call__(self, x, generator=None):
        if self.kind == "gaussian":
            return x + self.level * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        hit = torch.rand(x.shape, generator=generator, device=x.device) < self.level
        if self.kind == "mask":
            return x.masked_fill(hit, 0.0)
        salt = (torch.rand(x.shape, generator=generator, device=x.device) < 0.5).to(x.dtype)
        return torch.where(hit, salt, x)

    def __repr__(self):
        return f"Corruption({self.kind!r}, {self.level!r})"


class _Amortized(Rebuildable, nn.Module):
    """An encoder network with ``heads`` outputs, optionally fed a corrupted input."""

    heads = 2

    def __init__(self, data_shape, latent_dim, *, arch="mlp", hidden=(400,), activation="relu",
                 channels=(32, 64), corruption=None):
        super().__init__()
        if corruption is not None and not isinstance(corruption, Corruption):
            raise ValueError(f"corruption must be a vi_toolkit.guides.vae.Corruption or None, got {corruption!r}")
        self.encoder = Encoder(data_shape, latent_dim, arch=arch, hidden=hidden, activation=activation,
                               channels=channels, heads=self.heads)
        self.data_shape, self.latent_dim, self.corruption = self.encoder.data_shape, latent_dim, corruption

    def encoder_input(self, x):
        """What the encoder sees: x, or a fresh corruption x~ of it for a denoising guide."""
        return x if self.corruption is None else self.corruption(x)

    def forward(self, x, index=None, num_data=None):
        pyro.module("encoder", self.encoder)
        with data_plate(x, num_data):
            pyro.sample("z", self.posterior(self.encoder_input(x)))

    @torch.no_grad()
    def encode(self, x):
        """The codes of ``x`` (no corruption): mu(x), or f(x) for a point-mass guide."""
        return self.encoder(x)[0]


class GaussianEncoder(_Amortized):
    """q(z | x) = N(z; mu(x), diag sigma^2(x)), with mu, log sigma^2 = NN_phi(x)."""

    def posterior(self, x):
        loc, log_var = self.encoder(x)
        return dist.Normal(loc, (0.5 * log_var).exp()).to_event(1)


class DeltaEncoder(_Amortized):
    """q(z | x) = delta(z - f(x)): the deterministic encoder of an auto-encoder."""

    heads = 1

    def posterior(self, x):
        code, = self.encoder(x)
        return dist.Delta(code).to_event(1)


class IAFEncoder(GaussianEncoder):
    """z = f_K o ... o f_1(z_0), z_0 ~ N(mu(x), diag sigma^2(x)), f_k inverse autoregressive flows.

    ``num_flows`` affine autoregressive transforms with MADE networks of ``flow_hidden``
    units, shared across data points (the amortization is in the base Gaussian).
    """

    def __init__(self, data_shape, latent_dim, *, num_flows=2, flow_hidden=None, **kwargs):
        super().__init__(data_shape, latent_dim, **kwargs)
        if latent_dim < 2:
            raise ValueError("an autoregressive flow needs latent_dim >= 2")
        hidden = [flow_hidden or 4 * latent_dim]
        self.flows = nn.ModuleList(T.affine_autoregressive(latent_dim, hidden_dims=hidden)
                                   for _ in range(num_flows))

    def forward(self, x, index=None, num_data=None):
        pyro.module("flows", self.flows)
        super().forward(x, index, num_data)

    def posterior(self, x):
        return dist.TransformedDistribution(super().posterior(x), list(self.flows))

    @torch.no_grad()
    def encode(self, x):
        """The flow applied to the base mean mu(x) (a representative code)."""
        z = self.encoder(x)[0]
        for flow in self.flows:
            z = flow(z)
        return z


class MeanFieldCodes(Rebuildable, nn.Module):
    """q(z_1..z_N) = prod_i N(z_i; m_i, diag s_i^2), free parameters per data point.

    Takes ``(x, index)``: ``index`` holds the data points' positions in the data set
    (``data=(x, torch.arange(N))``), so a minibatch updates its own rows.
    """

    def __init__(self, latent_dim, *, init_scale=0.1):
        super().__init__()
        self.latent_dim, self.init_scale = latent_dim, init_scale

    def forward(self, x, index=None, num_data=None):
        n = x.shape[0] if num_data is None else int(num_data)
        if index is None:
            if n != x.shape[0]:
                raise ValueError("MeanFieldCodes on a minibatch needs the index tensor: fit with "
                                 "data=(x, torch.arange(N))")
            index = torch.arange(n, device=x.device)
        loc = pyro.param("z_loc", lambda: x.new_zeros(n, self.latent_dim))
        scale = pyro.param("z_scale", lambda: x.new_full((n, self.latent_dim), self.init_scale),
                           constraint=constraints.positive)
        if loc.shape[0] != n:
            raise ValueError(f"MeanFieldCodes holds codes for {loc.shape[0]} data points, the data "
                             f"have {n}")
        with data_plate(x, num_data):
            pyro.sample("z", dist.Normal(loc[index], scale[index]).to_event(1))


__all__ = ["CORRUPTIONS", "Corruption", "GaussianEncoder", "DeltaEncoder", "IAFEncoder",
           "MeanFieldCodes"]
