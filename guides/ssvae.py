"""The guide of the semi-supervised VAE M2 (``vi_toolkit.models.ssvae``, Kingma et al. 2014).

    q(y, z | x) = q(y | x) q(z | x, y),
    q(y | x) = Cat(softmax(NN_phi(x))),                         the model's classifier, shared
    q(z | x, y) = N(z; mu(x, y), diag sigma^2(x, y)),  mu, log sigma^2 = NN_psi(x, onehot(y))

For a labelled image only q(z | x, y) is drawn, at the observed label. For an unlabelled
one the class is marked ``infer={"enumerate": "parallel"}`` (as Pyro's SS-VAE tutorial
does), so that ``fit``'s ``elbo="auto"`` picks the enum ELBO and sums it out exactly:
U(x) = sum_y q(y | x) (E_q(z | x, y)[log p(x, y, z) - log q(z | x, y)] - log q(y | x)), with
z drawn by reparameterization for each of the C classes in one vectorized pass.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from vi_toolkit.models.ssvae import SemiSupervisedVAE, concat_codes
from vi_toolkit.networks import Encoder
from vi_toolkit.plates import data_plate
from vi_toolkit.specs import Rebuildable


class SemiSupervisedGuide(Rebuildable, nn.Module):
    """q(y | x) q(z | x, y) for ``model`` (a :class:`~vi_toolkit.models.ssvae.SemiSupervisedVAE`).

    ``hidden`` and ``activation`` build the encoder q(z | x, y), an MLP on the flattened image
    beside the one-hot class; q(y | x) is the model's classifier. Call it like the model.
    """

    def __init__(self, model, *, hidden=(256,), activation="relu"):
        super().__init__()
        if not isinstance(model, SemiSupervisedVAE):
            raise ValueError(f"model must be a vi_toolkit.models.ssvae.SemiSupervisedVAE, got {type(model).__name__}")
        self.classifier = model.classifier  # one network: q(y | x) and the classification term
        self.data_shape, self.num_classes, self.latent_dim = model.data_shape, model.num_classes, model.latent_dim
        self.encoder = Encoder(math.prod(self.data_shape) + self.num_classes, self.latent_dim, hidden=hidden,
                               activation=activation, heads=2)

    def posterior_z(self, x: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """q(z | x, y), batched over y's leading dimensions (an enumerated class) and the images."""
        flat = x.reshape(x.shape[0], -1)
        inputs = concat_codes(flat, nn.functional.one_hot(y, self.num_classes).to(flat.dtype))
        loc, log_var = self.encoder(inputs.reshape(-1, inputs.shape[-1]))
        shape = inputs.shape[:-1] + (self.latent_dim,)
        return dist.Normal(loc.reshape(shape), (0.5 * log_var).exp().reshape(shape)).to_event(1)

    def forward(self, labelled=None, unlabelled=None, num_data=None):
        pyro.module("classifier", self.classifier)
        pyro.module("encoder", self.encoder)
        if labelled is not None:
            x, y = labelled
            with data_plate(x, num_data, name="labelled"):
                pyro.sample("z_labelled", self.posterior_z(x, y))
        if unlabelled is not None:
            with data_plate(unlabelled, num_data, name="unlabelled"):
                y = pyro.sample("y_unlabelled", self.classifier(unlabelled), infer={"enumerate": "parallel"})
                pyro.sample("z_unlabelled", self.posterior_z(unlabelled, y))


__all__ = ["SemiSupervisedGuide"]
