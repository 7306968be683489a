"""The semi-supervised VAE, M2 of Kingma, Rezende, Mohamed & Welling (2014): a class label as a latent.

    y_i ~ Cat(1/C),   z_i ~ N(0, I_d),   x_i | y_i, z_i ~ p(x | y, z; theta),
    p(x | y, z) = prod_j Bernoulli(x_j; sigmoid(NN_theta(z, onehot(y))_j))

(grey levels in [0, 1] are scored by the same cross-entropy). Labels are observed where they
are known and latent elsewhere. With the guide q(y | x) q(z | x, y) of
:mod:`vi_toolkit.guides.ssvae`, a labelled pair contributes

    L(x, y) = E_q(z | x, y)[log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y)]

and an unlabelled image the ELBO with the class summed out exactly under the classifier,

    U(x) = sum_y q(y | x) (L(x, y) - log q(y | x)).

Kingma et al.'s objective adds the classification term, so that q(y | x) learns from the
labels directly and not only through U:

    J^alpha = sum_{labelled} [L(x, y) + alpha log q(y | x)] + sum_{unlabelled} U(x).

The model is fitted on two data sets of their own sizes,
``vi_toolkit.DataSets(labelled=(x_l, y_l), unlabelled=x_u)``: each set has its own plate
(``"labelled"``, ``"unlabelled"``), each scaled by its own N_s / B_s, and ``fit`` reports the
ELBO of each (``history["elbo_labelled"]`` holds L + alpha log q(y | x) per labelled image,
``history["elbo_unlabelled"]`` U per unlabelled one). The term alpha log q(y | x) is a
``pyro.factor`` in the labelled plate; because it belongs to the objective, the classifier
network q(y | x) is held here and shared with the guide, which reads q(y | x) from it.
"""

import pyro
import pyro.distributions as dist
from pyro.distributions.util import is_validation_enabled
import torch
from torch import nn

from vi_toolkit.networks import Decoder, Encoder, check_batch
from vi_toolkit.plates import data_plate
from vi_toolkit.specs import Rebuildable


def concat_codes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` and ``b`` concatenated along their last dimension, the others broadcast (an
    enumerated class of shape (C, 1, C) beside codes of shape (B, d) gives (C, B, d + C))."""
    batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(batch + a.shape[-1:]), b.expand(batch + b.shape[-1:])], -1)


class Classifier(nn.Module):
    """q(y | x) = Cat(softmax(NN_phi(x))) over ``num_classes`` classes: an MLP on the image."""

    def __init__(self, data_shape, num_classes, *, hidden=(256,), activation="relu"):
        super().__init__()
        self.network = Encoder(data_shape, num_classes, hidden=hidden, activation=activation, heads=1)

    def forward(self, x: torch.Tensor) -> dist.Categorical:
        logits, = self.network(x)
        return dist.Categorical(logits=logits)


class SemiSupervisedVAE(Rebuildable, nn.Module):
    """M2 for images of ``data_shape`` in ``num_classes`` classes with codes of size ``latent_dim``.

    Call it as a Pyro model, ``model(labelled=(x, y), unlabelled=u, num_data=None)`` (either
    set may be left out); ``hidden`` and ``activation`` build the decoder p(x | y, z) and the
    classifier q(y | x); ``alpha`` weighs the classification term per labelled image.
    """

    def __init__(self, data_shape, num_classes, latent_dim, *, hidden=(256,), activation="relu", alpha=10.0):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
        if not alpha >= 0:
            raise ValueError(f"alpha (the weight of the classification term) must be >= 0, got {alpha!r}")
        self.decoder = Decoder(latent_dim + num_classes, data_shape, hidden=hidden, activation=activation)
        self.classifier = Classifier(data_shape, num_classes, hidden=hidden, activation=activation)
        self.data_shape, self.num_classes, self.latent_dim = self.decoder.data_shape, num_classes, latent_dim
        self.alpha = alpha

    def likelihood(self, y: torch.Tensor, z: torch.Tensor) -> dist.Distribution:
        """p(x | y, z), with event shape ``data_shape``."""
        code = concat_codes(z, nn.functional.one_hot(y, self.num_classes).to(z.dtype))
        logits, = self.decoder(code)
        # validate_args=False: grey levels in [0, 1] are scored by the cross-entropy too
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(len(self.data_shape))

    def generate(self, name: str, x: torch.Tensor, y: torch.Tensor = None):
        """y ~ Cat(1/C), z ~ N(0, I), x ~ p(x | y, z) at sites ``y_<name>``, ``z_<name>``, ``x_<name>``
        (inside the set's plate); ``y`` observed when given."""
        y = pyro.sample(f"y_{name}", dist.Categorical(logits=x.new_zeros(self.num_classes)), obs=y)
        z = pyro.sample(f"z_{name}", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
        pyro.sample(f"x_{name}", self.likelihood(y, z), obs=x)

    def check_data(self, x: torch.Tensor, y: torch.Tensor = None):
        """Shape and range of images (and labels): ``ValueError`` naming what is wrong."""
        check_batch(x, self.data_shape, "model")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"the Bernoulli likelihood needs images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        if y is not None:
            if y.is_floating_point() or y.shape != x.shape[:1]:
                raise ValueError(f"labels must be integers, one an image: got {y.dtype} of shape "
                                 f"{tuple(y.shape)} for {x.shape[0]} images")
            if len(y) and not 0 <= int(y.min()) <= int(y.max()) < self.num_classes:
                raise ValueError(f"labels must lie in 0..{self.num_classes - 1}, got values in "
                                 f"{int(y.min())}..{int(y.max())}")

    def forward(self, labelled=None, unlabelled=None, num_data=None):
        pyro.module("decoder", self.decoder)
        pyro.module("classifier", self.classifier)
        if labelled is not None:
            x, y = labelled
            if is_validation_enabled():  # fit validates the first step; the checks read x back
                self.check_data(x, y)
            with data_plate(x, num_data, name="labelled"):
                self.generate("labelled", x, y)
                pyro.factor("classification", self.alpha * self.classifier(x).log_prob(y))
        if unlabelled is not None:
            if is_validation_enabled():
                self.check_data(unlabelled)
            with data_plate(unlabelled, num_data, name="unlabelled"):
                self.generate("unlabelled", unlabelled)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """q(y | x) for each image: (N, num_classes)."""
        return self.classifier(x).probs

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class under q(y | x) for each image."""
        return self.classifier(x).logits.argmax(-1)

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | y, z) for every class y and each code z, ``(num_classes, len(z), *data_shape)``:
        the same codes (a style) drawn as every class, as Kingma et al.'s analogies."""
        y = torch.arange(self.num_classes, device=z.device)[:, None]
        return self.likelihood(y, z).mean


__all__ = ["Classifier", "SemiSupervisedVAE", "concat_codes"]
