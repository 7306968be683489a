"""Encoder and decoder networks for auto-encoders and VAEs.

An **encoder** maps a batch of data points of shape ``(B, *data_shape)`` to ``heads``
tensors of shape ``(B, latent_dim)`` (a Gaussian guide uses two, mu(x) and
log sigma^2(x); a point-mass guide one, f(x)). A **decoder** maps codes ``(B, latent_dim)``
to ``heads`` tensors of shape ``(B, *data_shape)`` (logits of a Bernoulli likelihood;
or mu(z) and log sigma^2(z) of a Gaussian one). Two architectures:

* ``"mlp"``: fully connected layers with the given ``hidden`` sizes and activation,
  the lecture's f: R^p -> R^d and g: R^d -> R^p; any ``data_shape`` (images are flattened).
* ``"conv"``: for images ``(C, H, W)``, stride-2 4x4 convolutions with the given
  ``channels`` (each halves H and W), then a linear layer to the heads; the decoder is
  the reciprocal stack of stride-2 transposed convolutions. H and W must be divisible
  by 2 ** len(channels) (8x8 digits and 28x28 images work with two layers).

A batch whose point shape is not the network's ``data_shape`` is a ``ValueError``
naming both shapes.
"""

import math

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU,
               "leaky_relu": nn.LeakyReLU, "sigmoid": nn.Sigmoid, "identity": nn.Identity}
ARCHITECTURES = ("mlp", "conv")


def activation_layer(activation):
    """An ``nn.Module`` for ``activation``: a name in ``ACTIVATIONS`` or an ``nn.Module`` class."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
        return ACTIVATIONS[activation]()
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation()
    raise ValueError(f"activation must be a name or an nn.Module class, got {activation!r}")


def _shape(data_shape):
    shape = (data_shape,) if isinstance(data_shape, int) else tuple(int(s) for s in data_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"data_shape must be positive sizes, got {data_shape!r}")
    return shape


def _check_positive(value, name):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _mlp(sizes, activation):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation_layer(activation))
    return nn.Sequential(*layers)


def _conv_shape(data_shape, channels, role):
    if len(data_shape) != 3:
        raise ValueError(f"the convolutional {role} needs images of shape (C, H, W), got "
                         f"data_shape {data_shape}")
    if not channels:
        raise ValueError("the convolutional networks need at least one layer of channels")
    factor = 2 ** len(channels)
    _, h, w = data_shape
    if h % factor or w % factor:
        raise ValueError(f"the convolutional {role} with {len(channels)} stride-2 layers needs H and W "
                         f"divisible by {factor}, got images of shape {data_shape}")
    return h // factor, w // factor


class Encoder(nn.Module):
    """x of shape ``(B, *data_shape)`` -> ``heads`` tensors of shape (B, latent_dim)."""

    def __init__(self, data_shape, latent_dim, *, arch="mlp", hidden=(400,), activation="relu",
                 channels=(32, 64), heads=2):
        super().__init__()
        self.data_shape, self.latent_dim, self.heads, self.arch = _shape(data_shape), latent_dim, heads, arch
        _check_positive(latent_dim, "latent_dim")
        _check_positive(heads, "heads")
        out = heads * latent_dim
        if arch == "mlp":
            self.body = _mlp([math.prod(self.data_shape), *hidden, out], activation)
        elif arch == "conv":
            h, w = _conv_shape(self.data_shape, channels, "encoder")
            layers, c_in = [], self.data_shape[0]
            for c_out in channels:
                layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), activation_layer(activation)]
                c_in = c_out
            layers += [nn.Flatten(), nn.Linear(c_in * h * w, out)]
            self.body = nn.Sequential(*layers)
        else:
            raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHITECTURES)}")

    def forward(self, x):
        check_batch(x, self.data_shape, "encoder")
        flat = x.reshape(x.shape[0], -1) if self.arch == "mlp" else x
        return self.body(flat).chunk(self.heads, dim=-1)


class Decoder(nn.Module):
    """z of shape (B, latent_dim) -> ``heads`` tensors of shape ``(B, *data_shape)``."""

    def __init__(self, latent_dim, data_shape, *, arch="mlp", hidden=(400,), activation="relu",
                 channels=(32, 64), heads=1):
        super().__init__()
        self.data_shape, self.latent_dim, self.heads, self.arch = _shape(data_shape), latent_dim, heads, arch
        _check_positive(latent_dim, "latent_dim")
        _check_positive(heads, "heads")
        if arch == "mlp":
            self.body = _mlp([latent_dim, *reversed(tuple(hidden)), heads * math.prod(self.data_shape)],
                             activation)
        elif arch == "conv":
            h, w = _conv_shape(self.data_shape, channels, "decoder")
            rev = list(reversed(tuple(channels)))
            layers = [nn.Linear(latent_dim, rev[0] * h * w), activation_layer(activation),
                      nn.Unflatten(1, (rev[0], h, w))]
            outs = rev[1:] + [heads * self.data_shape[0]]
            for i, (c_in, c_out) in enumerate(zip(rev, outs)):
                layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
                if i < len(outs) - 1:
                    layers.append(activation_layer(activation))
            self.body = nn.Sequential(*layers)
        else:
            raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHITECTURES)}")

    def forward(self, z):
        if z.dim() < 2 or z.shape[-1] != self.latent_dim:
            raise ValueError(f"decoder: codes must have shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        batch = z.shape[:-1]
        # the heads are stacked along the features (mlp) or the channels (conv)
        out = self.body(z.reshape(-1, self.latent_dim)).reshape(-1, self.heads, *self.data_shape)
        return tuple(o.reshape(*batch, *self.data_shape) for o in out.unbind(1))


def check_batch(x, data_shape, role):
    """Raise a ``ValueError`` unless ``x`` is a floating-point batch of points of ``data_shape``."""
    if not torch.is_tensor(x):
        raise ValueError(f"{role}: expected a tensor of shape (B, {', '.join(map(str, data_shape))}), "
                         f"got {type(x).__name__}")
    if tuple(x.shape[1:]) != tuple(data_shape):
        raise ValueError(f"{role}: the network was built for points of shape {tuple(data_shape)}, got a "
                         f"batch of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{role}: pixel data have integer dtype {x.dtype}; pass floats (e.g. uint8 "
                         "images divided by 255)")
