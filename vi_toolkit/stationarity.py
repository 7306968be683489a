"""Trustworthy stochastic fits: stationarity, iterate averaging, Monte Carlo error, rate decrease.

At a fixed learning rate gamma, stochastic gradient steps on the ELBO do not converge to its
optimum phi*: after a transient the iterates phi_t become a stationary process that
fluctuates around phi* (shifted by a bias of order gamma), and the last iterate is one draw
of it. So a fit that stops when its epochs run out, or when the loss looks flat, returns a
point whose error nobody measured. Following Dhaka et al. (2020) and RAABBVI (Welandawe et
al. 2022), :class:`Stationarity` watches the iterates of every optimised tensor (their
unconstrained values) and runs, at each learning rate, three steps:

1. **Stationarity.** The iterates since the rate was set are kept, thinned (every step at
   first, every second one each time the store fills, so that it spans the whole phase). A
   window of n iterates is split into halves of n/2; for each coordinate j the split R-hat
   (Gelman & Rubin 1992; Vehtari et al. 2021)

       R_j = sqrt(((h - 1)/h W_j + B_j/h) / W_j),   h = n/2,
       W_j = mean of the two halves' variances,  B_j = h * variance of the halves' means,

   is near 1 when both halves fluctuate around the same value and large while the
   iterates still drift. The iterates are stationary once max_j R_j < ``rhat`` (1.1) on the
   whole phase, its last half or its last quarter (Dhaka et al. try several windows too).
   The whole first phase is never a window: it starts from the initial values, and a
   transient short against the window inflates the halves' variances W more than it
   separates their means, so R-hat can miss it; later phases start from an average.

2. **Polyak-Ruppert averaging.** From the start of that window on, the average of the
   iterates, phi_bar = 1/T sum_t phi_t, estimates the centre of the stationary process with
   an error of order 1/sqrt(T) (Polyak & Juditsky 1992), where the last iterate's error
   stays of order sqrt(gamma). Every step adds phi_t to a running sum (float64, on the
   device: no read-back), so the average is over every step, not only the kept ones.
   Its Monte Carlo standard error comes from batch means (Flegal & Jones 2010): the
   averaged steps split into b = 16 consecutive batches of equal length with means
   m_1..m_b, and MCSE_j = sd_j(m_1..m_b) / sqrt(b). Batches shorter than a few
   autocorrelation times make this too small by a fraction of about tau/(2L) = b/(2 ESS_j),
   with ESS_j = b var_j(phi_t) / var_j(m) the effective number of draws; so the average is
   judged only once every ESS_j >= b (batches one autocorrelation time long or more), and
   its MCSE is inflated by sqrt(1 + b / ESS_j), twice that first-order correction. Each
   coordinate's error is measured
   in the units of the guide: times sqrt(F_jj), the diagonal of the guide's Fisher
   information

       F_jj = E_q[(d log q(z; phi) / d phi_j)^2],

   estimated with the score of ``fisher_draws`` draws of the guide on the fit's first data
   points, at the average so far (not at an iterate, whose q is off by its own fluctuation,
   its correlations most: a full-rank Gaussian's iterate can be three times too narrow
   conditionally), and measured again each time the averaged steps have grown by half.
   Then (1/2) sum_j F_jj MCSE_j^2 is the KL divergence that such an error costs, a
   Gaussian guide's location error is in units of its standard deviation (more exactly of
   1/sqrt(precision_jj), the conditional standard deviation, which is never larger) and its
   log-scale error a relative error of the scale, as Dhaka et al. normalise a mean-field
   Gaussian's parameters. A coordinate the guide's density does not depend on (a model
   parameter, a point mass) keeps its own units. The phase ends when
   max_j sqrt(F_jj) MCSE_j <= ``tol``. Under a fixed rate gamma the iterates' variance is of
   order gamma and their autocorrelation time of order 1/gamma, so the steps this takes,
   about var * tau / tol^2, hardly depend on gamma: a phase is not ended early to try a
   smaller rate, which would only lengthen the next stationarity check.

3. **Learning-rate decrease.** Once its average is accurate, the averaged parameters have
   stalled at this rate: more steps at it change them by less than ``tol``. The objective
   is not quadratic, so that average keeps a bias b(gamma) ~ c gamma. As RAABBVI, the rate
   is then multiplied by ``factor`` (rho = 1/2) and the iterates restart from the average. The change of the
   average between two rates, Delta = phi_bar(gamma) - phi_bar(rho gamma) ~ (1 - rho) c gamma,
   measures the bias left at the smaller rate, rho c gamma = rho / (1 - rho) Delta (= Delta
   for rho = 1/2); with random reshuffling (every point once an epoch) a smaller rate also
   cancels more of the minibatch noise within each epoch. The fit has **converged** when,
   in the guide's units, every
   ``|Delta_j| <= tol + 2 se(Delta_j)``, se the two averages' MCSEs combined (the change is
   within the tolerance up to its own Monte Carlo error).

At the end of the fit (converged, or its budget spent) the parameters are the last average
(a fit that never became stationary keeps its last iterate), and ``result.diagnostics``
holds the report: whether it converged, the learning rates, and at each rate the step where
the iterates became stationary, the largest R-hat, MCSE and change. A fit that did not
converge warns, saying which step failed. ``fit(..., until="converged")`` adds this
callback with its defaults; the epochs or steps of the fit are then a budget.

The callback costs a few vector operations each step; it reads values back only when it
checks (every 16 kept iterates), and keeps 2 x 256 copies of the watched parameters on the
device: meant for the global parameters of a model (``params=`` restricts what it watches).

References:
    Dhaka, Catalina, Andersen, Magnusson, Huggins and Vehtari (2020). Robust, accurate
    stochastic optimization for variational inference. NeurIPS 33.
    Welandawe, Andersen, Vehtari and Huggins (2022). Robust, automated, and accurate
    black-box variational inference (RAABBVI). arXiv:2203.15945.
    Polyak and Juditsky (1992). Acceleration of stochastic approximation by averaging.
    SIAM Journal on Control and Optimization 30(4).
    Vehtari, Gelman, Simpson, Carpenter and Buerkner (2021). Rank-normalization, folding,
    and localization: an improved R-hat for assessing convergence of MCMC. Bayesian Analysis 16(2).
    Flegal and Jones (2010). Batch means and spectral variance estimators in Markov chain
    Monte Carlo. Annals of Statistics 38(2).
"""

import math
import warnings

import pyro.poutine as poutine
import torch

from .callbacks import Callback
from .optim import current_lr
from .traces import accepts_keyword, positive_int

BATCHES = 16  # batch means for the MCSE
MIN_ROWS = 64  # kept iterates before a window is judged, and before an average is
MIN_ESS = BATCHES  # effective draws of an average: batches one autocorrelation time long or more
SCALE_GROWTH = 1.5  # the guide's units are measured again each time the averaged steps grow so


def split_rhat(rows: torch.Tensor) -> torch.Tensor:
    """Split R-hat of each column of ``rows`` (iterates in order, one per row).

    Args:
        rows: ``(n, P)`` tensor, n >= 4.

    Returns:
        ``(P,)`` tensor; 1 for a constant column.
    """
    h = rows.shape[0] // 2
    halves = rows[-2 * h:].double().reshape(2, h, -1)
    within = halves.var(1).mean(0)
    between = h * halves.mean(1).var(0)
    rhat = (((h - 1) / h * within + between / h) / within).sqrt()
    return torch.where(within > 0, rhat, torch.ones_like(rhat))


def batch_means(rows: torch.Tensor, cumsum: torch.Tensor, steps: list, batches: int = BATCHES):
    """Monte Carlo standard error and effective sample size of a series' average, by batch means.

    Args:
        rows: ``(k, P)`` values of the series at the steps ``steps`` (equally spaced).
        cumsum: ``(k, P)`` running sums of the series (over every step) at the same steps.
        steps: the k step numbers, increasing.
        batches: number of batches b; the last ``b * ((k - 1) // b)`` intervals are used.

    Returns:
        ``(mcse, ess)``, two ``(P,)`` tensors: sd(batch means) / sqrt(b), and
        b var(series) / var(batch means) (infinite for a constant column).
    """
    per = (len(steps) - 1) // batches
    ends = [len(steps) - 1 - per * i for i in range(batches, -1, -1)]
    sums = cumsum[ends[1:]] - cumsum[ends[:-1]]
    lengths = torch.tensor([steps[b] - steps[a] for a, b in zip(ends[:-1], ends[1:])],
                           dtype=sums.dtype, device=sums.device)
    means = sums / lengths[:, None]
    spread = means.var(0)
    ess = batches * rows[ends[0]:].double().var(0) / spread
    return (spread / batches).sqrt(), torch.where(spread > 0, ess, torch.full_like(ess, math.inf))


def fisher_diagonal(guide, args, kwargs, params: list, draws: int) -> torch.Tensor:
    """The diagonal of the guide's Fisher information in ``params``, by the score's square.

    F_jj = E_q[(d log q(z) / d phi_j)^2], z drawn from the guide and held fixed.

    Args:
        guide: the Pyro guide.
        args, kwargs: its arguments (a batch of data, ``num_data``).
        params: the leaf tensors phi (flattened and concatenated in this order).
        draws: Monte Carlo draws of z.

    Returns:
        ``(P,)`` float64 tensor; 0 where the guide's density does not depend on phi_j.
    """
    total = None
    for _ in range(draws):
        with torch.no_grad():
            drawn = poutine.trace(guide).get_trace(*args, **kwargs)
        log_q = poutine.trace(poutine.replay(guide, trace=drawn)).get_trace(*args, **kwargs).log_prob_sum()
        grads = torch.autograd.grad(log_q, params, allow_unused=True) if log_q.requires_grad else [None] * len(params)
        score = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double()
                           for p, g in zip(params, grads)])
        total = score**2 if total is None else total + score**2
    return total / draws


class Stationarity(Callback):
    """Run a stochastic fit until its averaged iterates are accurate (see the module).

    Args:
        tol: the accuracy asked of the averaged parameters, in the guide's units (a Gaussian
            location in standard deviations, a log-scale in relative error): the largest
            MCSE of an average, and the largest change between two rates beyond its
            Monte Carlo error.
        rhat: split R-hat below which the iterates count as stationary.
        factor: the learning rate's multiplier after each stationary phase (0 < factor < 1).
        window: iterates kept on the device (thinned by two each time it fills).
        fisher_draws: draws of the guide for its Fisher information.
        params: names of the parameters to watch (keys of ``FitState.params``); default all.

    Raises:
        ValueError: a setting out of range; at the start of the fit, an unknown name in
            ``params`` or an optimizer without a learning rate (both become a ``FitError``).
    """

    def __init__(self, tol: float = 0.02, *, rhat: float = 1.1, factor: float = 0.5,
                 window: int = 256, fisher_draws: int = 32, params=None):
        for name, value, low, high in (("tol", tol, 0, math.inf), ("rhat", rhat, 1, math.inf),
                                       ("factor", factor, 0, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
                raise ValueError(f"Stationarity: {name} must be a number in ({low}, {high}), got {value!r}")
        self.window = positive_int(window, "window")
        if self.window < 2 * MIN_ROWS:
            raise ValueError(f"Stationarity: window must be at least {2 * MIN_ROWS}, got {window!r}")
        self.tol, self.rhat, self.factor = float(tol), float(rhat), float(factor)
        self.fisher_draws = positive_int(fisher_draws, "fisher_draws")
        self.names = None if params is None else list(params)
        self.reset()

    def reset(self):
        """Forget any earlier fit: no phase, no finished rate."""
        self.levels = []  # one report per learning rate whose average reached its MCSE
        self.converged, self.scale, self.previous = False, None, None  # previous: (average, MCSE)
        self.scale_at = None  # averaged steps when the scale was measured
        self.last = {}
        self.stationary_at = None

    # -- the phase at one learning rate ---------------------------------------------------
    def start_phase(self, vector, step):
        """Begin watching at the current rate from ``vector`` (the iterate at ``step``)."""
        P, dev = vector.numel(), vector.device
        self.ref = vector.double().clone()
        self.cum = torch.zeros(P, dtype=torch.float64, device=dev)
        self.rows = torch.empty(self.window, P, dtype=vector.dtype, device=dev)
        self.sums = torch.empty(self.window, P, dtype=torch.float64, device=dev)
        self.steps = [step]
        self.rows[0].copy_(vector)
        self.sums[0].zero_()
        self.thin, self.phase_start, self.since_check = 1, step, 0
        self.stationary_at = None  # the step where the averaged segment starts
        self.last = {}  # this phase's latest R-hat, MCSE and ESS

    def vector(self, state):
        return torch.cat([state.params[name].detach().reshape(-1) for name in self.watched])

    def keep(self, vector, step):
        """Store the iterate (and the running sum) of a kept step; halve the store when full."""
        if len(self.steps) == self.window:
            keep = [i for i, s in enumerate(self.steps) if (s - self.phase_start) % (2 * self.thin) == 0]
            index = torch.tensor(keep, device=self.rows.device)
            n = len(keep)
            self.rows[:n] = self.rows.index_select(0, index)
            self.sums[:n] = self.sums.index_select(0, index)
            self.steps = [self.steps[i] for i in keep]
            self.thin *= 2
            if (step - self.phase_start) % self.thin:
                return False
        row = len(self.steps)
        self.rows[row].copy_(vector)
        self.sums[row].copy_(self.cum)
        self.steps.append(step)
        return True

    # -- the hooks ------------------------------------------------------------------------
    def on_fit_start(self, state):
        if current_lr(state.optimizer) is None:
            raise ValueError("Stationarity decreases the learning rate, but the optimizer has no "
                             "'lr' (use a named optimizer or one that takes lr)")
        known = list(state.params)
        unknown = sorted(set(self.names or ()) - set(known))
        if unknown:
            raise ValueError(f"Stationarity: params {unknown} are not parameters of the fit; it has {known}")
        self.watched = self.names or known
        vector = self.vector(state)
        if state.step == 0:  # a fresh fit; a resumed one has restored its phase
            self.reset()
            self.start_phase(vector, state.step)
        else:  # the checkpoint's tensors were read onto the CPU
            self.move(vector.device)

    def move(self, device):
        for name in ("ref", "cum", "rows", "sums", "scale"):
            if getattr(self, name, None) is not None:
                setattr(self, name, getattr(self, name).to(device))
        if self.previous is not None:
            self.previous = tuple(t.to(device) for t in self.previous)

    def on_step_end(self, state):
        if self.converged:
            return
        vector = self.vector(state)
        self.cum += vector.double() - self.ref
        if (state.step - self.phase_start) % self.thin or not self.keep(vector, state.step):
            return
        self.since_check += 1
        if self.since_check < self.window // 16 or len(self.steps) < MIN_ROWS:
            return
        self.since_check = 0
        if self.stationary_at is None:
            self.check_stationary(state)
        else:
            self.check_average(state)

    def check_stationary(self, state):
        """Start the averaged segment at the window of least split R-hat, if that is below ``rhat``."""
        n = len(self.steps)
        # the first phase starts from the initial values: a short transient there inflates the
        # halves' variances more than it separates their means, so its first half is never used
        sizes = [size for size in (n, n // 2, n // 4)[0 if self.levels else 1:] if size >= MIN_ROWS]
        if not sizes:
            return
        best = min((float(split_rhat(self.rows[n - size:n]).max()), n - size) for size in sizes)
        self.last["rhat"] = best[0]
        if best[0] < self.rhat:
            self.stationary_at = self.steps[best[1]]
            self.refresh_scale(state)

    def segment(self):
        """Index of the first kept row of the averaged segment."""
        return next(i for i, s in enumerate(self.steps) if s >= self.stationary_at)

    def precision(self):
        """MCSE (in the guide's units) and ESS of the average so far; their extremes go in ``last``."""
        first, n = self.segment(), len(self.steps)
        mcse, ess = batch_means(self.rows[first:n], self.sums[first:n], self.steps[first:])
        mcse = mcse * (1 + BATCHES / ess).sqrt()  # batches a few autocorrelation times long
        self.last["mcse"], self.last["ess"] = float((mcse * self.scale).max()), float(ess.min())
        return mcse, ess

    def average(self):
        first, n = self.segment(), len(self.steps) - 1
        return self.ref + (self.sums[n] - self.sums[first]) / (self.steps[n] - self.steps[first])

    def check_average(self, state):
        """End the phase when its average is accurate: MCSE <= tol with enough effective draws."""
        first = self.segment()
        if len(self.steps) - first < MIN_ROWS:
            return
        if state.step - self.stationary_at >= SCALE_GROWTH * self.scale_at:
            self.refresh_scale(state)
        mcse, ess = self.precision()
        if self.last["mcse"] > self.tol or self.last["ess"] < MIN_ESS:
            return
        average = self.average()
        level = {"lr": current_lr(state.optimizer), "start": self.phase_start,
                 "stationary_at": self.stationary_at, "end": state.step, "rhat": self.last["rhat"],
                 "mcse": self.last["mcse"], "ess": self.last["ess"], "change": None}
        if self.previous is not None:
            change = (average - self.previous[0]).abs() * self.scale
            noise = (mcse**2 + self.previous[1]**2).sqrt() * self.scale
            level["change"] = float(change.max())
            self.converged = bool((change <= self.tol + 2 * noise).all())
        self.levels.append(level)
        self.previous = (average, mcse)
        self.set_params(state, average)
        if self.converged:
            state.stop("converged")
            return
        for group in state.optimizer.param_groups:
            group["lr"] = group["lr"] * self.factor
        self.start_phase(average.to(self.rows.dtype), state.step)

    def refresh_scale(self, state):
        """Measure the guide's units at the average so far (a single iterate's q is off by its noise)."""
        iterate = self.vector(state).clone()
        self.set_params(state, self.average())
        self.scale = self.guide_scale(state)
        self.set_params(state, iterate)
        self.scale_at = state.step - self.stationary_at

    def guide_scale(self, state):
        """sqrt(F_jj) of the guide at the current parameters; 1 where F_jj = 0."""
        probe = state.probe()  # the fit's first points, not a copy of the whole fit
        num_data = state.config["num_data"] if accepts_keyword(state.model, "num_data") else None
        args, kwargs = probe.call_args(probe.tensors, num_data)
        params = [state.params[name] for name in self.watched]
        # draws of their own: the fit's random stream stays as it was, every process gets one scale
        with torch.random.fork_rng(devices=[self.ref.device] if self.ref.device.type == "cuda" else []):
            torch.manual_seed(state.config["seed"] + state.step)
            fisher = fisher_diagonal(state.guide, args, kwargs, params, self.fisher_draws)
        return torch.where(fisher > 0, fisher.sqrt(), torch.ones_like(fisher))

    def set_params(self, state, vector):
        with torch.no_grad():
            offset = 0
            for name in self.watched:
                p = state.params[name]
                p.copy_(vector[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def on_fit_end(self, state):
        if not self.converged and state.stopped == "max steps":
            if self.stationary_at is not None and len(self.steps) - self.segment() >= MIN_ROWS:
                self.precision()
                self.set_params(state, self.average())
            elif self.previous is not None:
                self.set_params(state, self.previous[0])
        state.config["convergence"] = self.report(state)
        if not self.converged and state.stopped != "interrupted":  # an interruption warns itself
            warnings.warn(f"the fit did not converge in {state.step} steps: {self.reason(state)}. "
                          f"{self.advice()}", stacklevel=2)

    # -- the report -----------------------------------------------------------------------
    def reason(self, state):
        """Why the fit has not converged, in a sentence."""
        lr = current_lr(state.optimizer)
        if self.stationary_at is None:
            rhat = (f"max split R-hat {self.last['rhat']:.3g} >= {self.rhat}" if "rhat" in self.last
                    else f"too few steps at lr {lr:.3g} to compute split R-hat")
            if not self.levels:
                return f"the iterates never became stationary ({rhat})"
            return (f"after the learning rate decreased to {lr:.3g} the iterates did not become "
                    f"stationary again ({rhat})")
        mcse = self.last.get("mcse")
        where = f"the iterates are stationary at lr {lr:.3g} from step {self.stationary_at}"
        if mcse is None:
            return f"{where}, too few steps ago to measure the Monte Carlo error of their average"
        if self.last["ess"] < MIN_ESS:
            return (f"{where}, but their average has {self.last['ess']:.3g} effective draws, too few "
                    f"(< {MIN_ESS}) to trust its Monte Carlo standard error")
        if mcse > self.tol:
            averaged = state.step - self.stationary_at  # the MCSE falls as 1 / sqrt(steps averaged)
            return (f"{where}, but the Monte Carlo standard error of their average is {mcse:.3g} "
                    f"> tol {self.tol} in the guide's units (reaching tol would take about "
                    f"{averaged * ((mcse / self.tol) ** 2 - 1):,.0f} more steps at this rate)")
        return f"{where}, but no smaller learning rate has yet confirmed their average"

    def advice(self):
        if self.stationary_at is None and self.previous is None:
            return ("The parameters are the last iterate. Give a larger budget (num_epochs or "
                    "num_steps) or a larger lr")
        return "The parameters are the latest average of the iterates. Give a larger budget (num_epochs or num_steps)"

    def report(self, state):
        """The diagnostics a result keeps (``result.diagnostics``)."""
        return {"converged": self.converged, "reason": None if self.converged else self.reason(state),
                "steps": state.step, "lr": current_lr(state.optimizer), "tol": self.tol,
                "rhat_threshold": self.rhat, "stationary_at": self.stationary_at,
                "rhat": self.last.get("rhat"), "mcse": self.last.get("mcse"),
                "change": self.levels[-1]["change"] if self.levels else None,
                "levels": [dict(level) for level in self.levels]}

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self):
        state = {"levels": [dict(level) for level in self.levels], "converged": self.converged,
                 "last": dict(self.last), "scale": None if self.scale is None else self.scale.clone(),
                 "previous": None if self.previous is None else [t.clone() for t in self.previous],
                 "stationary_at": self.stationary_at, "scale_at": self.scale_at}
        if hasattr(self, "ref"):
            n = len(self.steps)
            state["phase"] = {"ref": self.ref.clone(), "cum": self.cum.clone(),
                              "rows": self.rows[:n].clone(), "sums": self.sums[:n].clone(),
                              "steps": list(self.steps), "thin": self.thin,
                              "phase_start": self.phase_start, "since_check": self.since_check}
        return state

    def load_state_dict(self, state):
        self.levels = [dict(level) for level in state["levels"]]
        self.converged, self.scale = state["converged"], state["scale"]
        self.previous = None if state["previous"] is None else tuple(state["previous"])
        phase = state.get("phase")
        if phase is not None:
            self.start_phase(phase["rows"][0], phase["phase_start"])
            n = len(phase["steps"])
            self.ref.copy_(phase["ref"])
            self.cum.copy_(phase["cum"])
            self.rows[:n].copy_(phase["rows"])
            self.sums[:n].copy_(phase["sums"])
            self.steps = list(phase["steps"])
            self.thin, self.since_check = phase["thin"], phase["since_check"]
        self.last, self.stationary_at = dict(state["last"]), state["stationary_at"]
        self.scale_at = state["scale_at"]
