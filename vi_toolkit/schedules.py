"""Schedules of a fit as callbacks: KL annealing and learning-rate decrease on a plateau.

**KL annealing** (warm-up; Bowman et al. 2016, Sonderby et al. 2016's ladder VAE, scvi-tools'
``n_epochs_kl_warmup``). The ELBO splits into a reconstruction term and the KL term::

    ELBO = E_q[log p(x | z)] - E_q[log q(z | x) - log p(z)],

and early in training the KL term pulls q(z | x) onto the prior before the decoder has
learned to use z (posterior collapse). The annealed objective weights the KL term by beta::

    ELBO_beta = E_q[log p(x | z)] - beta E_q[log q(z | x) - log p(z)],
    beta_t = start + (1 - start) min(1, t / warmup_steps)      after t optimizer steps,

which is the ELBO again once t >= warmup_steps. :class:`KLAnnealing` scales the
log-densities of the latent sample sites, log p(z) in the model and log q(z) in the guide
(every non-observed site; the model's sites enumerated out are part of the likelihood and
stay unscaled), by beta through Pyro's site scale, so it acts on every objective that
reads the scale: ``"trace"``, ``"stl"``, ``"meanfield"`` (the analytic KL is scaled by the
guide site's scale) and ``"enum"``. The importance-weighted objectives weight unscaled
densities, and are refused. A fit with annealing reports the annealed ELBO, training and
held-out, until beta reaches 1: compare fits, or stop early, only after the warm-up.

**Learning-rate decrease on a plateau** of the held-out ELBO (as
``torch.optim.lr_scheduler.ReduceLROnPlateau``, with the patience of ``fit``'s early
stopping): after ``patience`` recorded epochs in a row without a new best held-out ELBO,
every learning rate becomes max(factor * lr, min_lr). Both are callbacks of ``fit``::

    from vi_toolkit.schedules import KLAnnealing, ReduceLROnPlateau
    fit(model, guide, x, val_data=x_val, num_epochs=100,
        callbacks=[KLAnnealing(warmup_steps=2000), ReduceLROnPlateau(patience=5)])
"""

import warnings

from pyro.poutine.messenger import Messenger

from .callbacks import Callback

# objectives whose importance weights ignore site scales, so annealing would not act on them
_UNSCALED = ("iwae", "iwae-dreg", "IWAE", "DReG")


class _KLScale(Messenger):
    """Multiplies the scale of latent sample sites by the current beta of ``annealing``."""

    def __init__(self, annealing, role):
        super().__init__()
        self.annealing, self.role = annealing, role

    def _pyro_sample(self, msg):
        if msg["is_observed"] or (self.role == "model" and msg["infer"].get("enumerate")):
            return
        msg["scale"] = self.annealing.beta * msg["scale"]


class KLAnnealing(Callback):
    """Weights the KL term of the ELBO by beta, rising linearly from ``start`` to 1.

    Args:
        warmup_steps: optimizer steps until beta reaches 1.
        start: beta at the first step, in [0, 1].

    Raises:
        ValueError: ``warmup_steps`` not a positive integer or ``start`` outside [0, 1].
    """

    def __init__(self, warmup_steps: int, start: float = 0.0):
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 1:
            raise ValueError(f"KLAnnealing: warmup_steps must be a positive integer, got {warmup_steps!r}")
        if not 0.0 <= start <= 1.0:
            raise ValueError(f"KLAnnealing: start must be in [0, 1], got {start!r}")
        self.warmup_steps, self.start = warmup_steps, float(start)
        self.beta = self.start

    def beta_at(self, step: int) -> float:
        """beta after ``step`` optimizer steps: start + (1 - start) min(1, step / warmup_steps)."""
        return self.start + (1.0 - self.start) * min(1.0, step / self.warmup_steps)

    def wrap(self, model, guide):
        """The model and the guide with their latent sites' log-densities scaled by beta."""
        return _KLScale(self, "model")(model), _KLScale(self, "guide")(guide)

    def on_fit_start(self, state):
        """Refuse the importance-weighted objectives; set beta for the step the fit starts at.

        Raises:
            ValueError: the fit's objective is ``"iwae"`` or ``"iwae-dreg"``.
        """
        config = state.config
        if config.get("elbo") in _UNSCALED or config.get("elbo_class") in _UNSCALED:
            raise ValueError(f"KLAnnealing: elbo={config.get('elbo')!r} weights importance samples by "
                             "unscaled log-densities, so the KL term cannot be annealed; use "
                             "'trace', 'stl' or 'meanfield'")
        if state.total_steps < self.warmup_steps:
            warnings.warn(f"KLAnnealing: the fit has {state.total_steps} steps, fewer than "
                          f"warmup_steps={self.warmup_steps}: it ends with beta = "
                          f"{self.beta_at(state.total_steps):.3g} and reports an annealed ELBO")
        self.beta = self.beta_at(state.step)  # a resumed fit continues the schedule

    def on_step_end(self, state):
        self.beta = self.beta_at(state.step)


class ReduceLROnPlateau(Callback):
    """Multiplies the learning rate by ``factor`` when the held-out ELBO stops improving.

    Args:
        factor: the multiplier, in (0, 1).
        patience: recorded epochs in a row without a new best ``val_elbo`` before a decrease.
        min_lr: the floor of every learning rate.

    Raises:
        ValueError: an argument out of range.
    """

    def __init__(self, factor: float = 0.5, patience: int = 5, min_lr: float = 0.0):
        if not 0.0 < factor < 1.0:
            raise ValueError(f"ReduceLROnPlateau: factor must be in (0, 1), got {factor!r}")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"ReduceLROnPlateau: patience must be a positive integer, got {patience!r}")
        if not min_lr >= 0.0:
            raise ValueError(f"ReduceLROnPlateau: min_lr must be >= 0, got {min_lr!r}")
        self.factor, self.patience, self.min_lr = factor, patience, min_lr
        self.best, self.bad_epochs = None, 0

    def on_fit_start(self, state):
        """Refuse a fit whose own learning-rate schedule would overwrite the decreases.

        Raises:
            ValueError: the fit has an ``lr_schedule``.
        """
        if state.config.get("lr_schedule") is not None:
            raise ValueError(f"ReduceLROnPlateau sets the learning rate itself: fit with lr_schedule=None, "
                             f"got lr_schedule={state.config['lr_schedule']!r}")
        if state.step == 0:  # a resumed fit keeps the best and the count of its checkpoint
            self.best, self.bad_epochs = None, 0

    def on_epoch_end(self, state):
        """Count epochs without a new best held-out ELBO; after ``patience`` of them lower the rates.

        Raises:
            ValueError: the fit has no held-out ELBO (no ``val_data``).
        """
        if state.val_elbo is None:
            raise ValueError("ReduceLROnPlateau watches the held-out ELBO: fit with val_data")
        if self.best is None or state.val_elbo > self.best:
            self.best, self.bad_epochs = state.val_elbo, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            for group in state.optimizer.param_groups:
                group["lr"] = max(self.factor * group["lr"], self.min_lr)
            self.bad_epochs = 0

    def state_dict(self):
        """The best held-out ELBO and the epochs since it, as a checkpoint keeps them."""
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state):
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]


__all__ = ["KLAnnealing", "ReduceLROnPlateau"]
