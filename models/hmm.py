"""Hidden Markov model with Gaussian or categorical emissions, the hidden states summed out.

::

    pi ~ Dir(alpha 1_K)                          initial state distribution
    A_k ~ Dir(alpha 1_K)                         k = 1..K, row k of the transition matrix
    emission="gaussian":     mu_k ~ N(0, s_mu^2 I_D),  sigma_kd ~ LogNormal(m_sigma, s_sigma^2)
                             p(x | z = k) = N(x | mu_k, diag sigma_k^2)
    emission="categorical":  B_k ~ Dir(beta 1_C),  p(x | z = k) = Cat(x | B_k)
    for each sequence n (the data plate) of length T_n:
        z_{n,1} ~ Cat(pi),  z_{n,t} | z_{n,t-1} ~ Cat(A_{z_{n,t-1}}),  x_{n,t} | z_{n,t} ~ p(x | z_{n,t})

The data are ``(sequences, lengths)``: ``sequences`` padded to (N, T) (categorical, integer
codes) or (N, T, D) (Gaussian), ``lengths`` (N,) integers. Steps t >= T_n are masked: their
emission log-density is 0, so the padded steps add log sum_j A_ij = 0.

The states are summed out exactly by the forward algorithm::

    alpha_1(k) = pi_k p(x_1 | k),  alpha_t(k) = sum_j alpha_{t-1}(j) A_jk p(x_t | k),
    log p(x_{1:T}) = log sum_k alpha_T(k),

as Pyro's ``DiscreteHMM`` distribution (a parallel scan over time). Enumerating the states
instead, with a ``pyro.markov`` loop and ``TraceEnum_ELBO``, gives the same number but is
about 11 times slower (one loss and gradient on 200 sequences of up to 100 steps, K = 3, on
one CPU thread: 15 ms against 170 ms).
:func:`posterior_marginals` (forward-backward) and :func:`viterbi` work in log space on
the same quantities.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import is_validation_enabled

from vi_toolkit.plates import data_plate
from vi_toolkit.specs import Rebuildable

EMISSIONS = ("gaussian", "categorical")


def length_mask(lengths, T):
    """(N, T) boolean, true at the steps t < T_n that each sequence has."""
    return torch.arange(T, device=lengths.device) < lengths.unsqueeze(-1)


def pad_sequences(sequences, *, dtype=None):
    """Pad a list of arrays (T_n,) or (T_n, D) with zeros: ``(padded, lengths)``."""
    if len(sequences) == 0:
        raise ValueError("sequences: the list is empty")
    seqs = [torch.as_tensor(s) if dtype is None else torch.as_tensor(s, dtype=dtype) for s in sequences]
    lengths = torch.tensor([len(s) for s in seqs])
    if (lengths == 0).any():
        raise ValueError(f"sequences: sequence {int((lengths == 0).nonzero()[0])} is empty")
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True), lengths


class HiddenMarkovModel(Rebuildable):
    """The HMM's prior and likelihood; ``model(sequences, lengths, num_data)`` is the program.

    ``params`` below is a dict of point values of the global sites: ``initial`` (K,),
    ``transition`` (K, K) with rows summing to one, and ``locs``, ``scales`` (K, D) for
    Gaussian or ``emission_probs`` (K, C) for categorical emissions.
    """

    def __init__(self, K, emission="gaussian", *, D=1, num_categories=None, concentration=1.0,
                 loc_scale=10.0, scale_loc=0.0, scale_scale=2.0, emission_concentration=1.0):
        if not isinstance(K, int) or K < 1:
            raise ValueError(f"K (the number of hidden states) must be an integer >= 1, got {K!r}")
        if emission not in EMISSIONS:
            raise ValueError(f"emission must be one of {EMISSIONS}, got {emission!r}")
        if emission == "gaussian" and (not isinstance(D, int) or D < 1):
            raise ValueError(f"D (the observation dimension) must be an integer >= 1, got {D!r}")
        if emission == "categorical" and (not isinstance(num_categories, int) or num_categories < 2):
            raise ValueError("categorical emissions need num_categories, an integer >= 2, got "
                             f"{num_categories!r}")
        self.K, self.emission, self.D, self.C = K, emission, D, num_categories
        self.concentration, self.emission_concentration = concentration, emission_concentration
        self.loc_scale, self.scale_loc, self.scale_scale = loc_scale, scale_loc, scale_scale

    def __repr__(self):
        obs = f"D={self.D}" if self.emission == "gaussian" else f"num_categories={self.C}"
        return f"HiddenMarkovModel(K={self.K}, emission={self.emission!r}, {obs})"

    def check(self, sequences, lengths):
        """Raise a ValueError naming the problem unless ``(sequences, lengths)`` fit this model."""
        expected = "(N, T)" if self.emission == "categorical" else f"(N, T, {self.D})"
        if sequences.dim() != (2 if self.emission == "categorical" else 3) or (
                self.emission == "gaussian" and sequences.shape[-1] != self.D):
            raise ValueError(f"sequences must have shape {expected} for this model "
                             f"({self!r}), got {tuple(sequences.shape)}")
        if lengths.dim() != 1 or lengths.shape[0] != sequences.shape[0]:
            raise ValueError(f"lengths must have shape ({sequences.shape[0]},), one per sequence, "
                             f"got {tuple(lengths.shape)}")
        if lengths.is_floating_point():
            raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
        T = sequences.shape[1]
        if (lengths < 1).any() or (lengths > T).any():
            n = int(((lengths < 1) | (lengths > T)).nonzero()[0])
            raise ValueError(f"lengths must lie in 1..{T} (the padded length of sequences), but "
                             f"sequence {n} has length {int(lengths[n])}")
        if sequences.is_floating_point():
            bad = ~torch.isfinite(sequences)
            if bad.any():
                raise ValueError(f"sequences has {int(bad.sum())} NaN or infinite value(s), the "
                                 f"first at index {tuple(bad.nonzero()[0].tolist())}; pad with "
                                 "zeros and give the true lengths instead")
        if self.emission == "categorical":
            if sequences.is_floating_point():
                raise ValueError(f"categorical sequences must be integer codes, got {sequences.dtype}")
            if (sequences < 0).any() or (sequences >= self.C).any():
                raise ValueError(f"categorical sequences must hold codes in 0..{self.C - 1}, got "
                                 f"values from {int(sequences.min())} to {int(sequences.max())}")

    def model(self, sequences, lengths, num_data=None):
        if is_validation_enabled():  # the checks read values back from the device
            self.check(sequences, lengths)
        K, like = self.K, self._like(sequences)
        initial = pyro.sample("initial", dist.Dirichlet(like.new_full((K,), self.concentration)))
        with pyro.plate("states", K, dim=-1):
            transition = pyro.sample("transition",
                                     dist.Dirichlet(like.new_full((K,), self.concentration)))
            if self.emission == "gaussian":
                locs = pyro.sample("locs", dist.Normal(like.new_zeros(self.D),
                                                       self.loc_scale).to_event(1))
                scales = pyro.sample("scales", dist.LogNormal(like.new_full((self.D,), self.scale_loc),
                                                              self.scale_scale).to_event(1))
                emission = {"locs": locs, "scales": scales}
            else:
                probs = pyro.sample("emission_probs", dist.Dirichlet(
                    like.new_full((self.C,), self.emission_concentration)))
                emission = {"emission_probs": probs}
        with data_plate(sequences, num_data, dim=-1):
            pyro.sample("x", self._hmm(initial, transition, emission, sequences, lengths),
                        obs=sequences)

    @staticmethod
    def _like(sequences):
        return sequences if sequences.is_floating_point() else torch.zeros(
            (), dtype=torch.get_default_dtype(), device=sequences.device)

    def _emission_dist(self, emission):
        """p(x | z = k) with batch shape (..., 1, 1, K): the 1s broadcast over sequences and time.

        The dims ``...`` left of the states are those of vectorized particles, if any.
        """
        def per_step(value):  # (..., K, E) -> (..., 1, 1, K, E)
            return value.unsqueeze(-3).unsqueeze(-4)

        if self.emission == "gaussian":
            return dist.Normal(per_step(emission["locs"]), per_step(emission["scales"])).to_event(1)
        return dist.Categorical(per_step(emission["emission_probs"]))

    def _hmm(self, initial, transition, emission, sequences, lengths):
        """DiscreteHMM with pi at the first step and masked padding.

        Pyro's ``DiscreteHMM`` starts from a state before the first observation, so the
        first step's transition rows are all log pi and the later ones log A.
        """
        T, K = sequences.shape[1], self.K
        # vectorized particles give initial (..., 1, K) and transition (..., K, K), their dims
        # left of the data plate's; transition then needs a data dim to line up
        log_A = transition.log().unsqueeze(-3)
        batch = torch.broadcast_shapes(initial.shape[:-1], log_A.shape[:-2])
        first = initial.log()[..., None, None, :].expand(batch + (1, K, K))
        rest = log_A.unsqueeze(-3).expand(batch + (T - 1, K, K))
        obs = self._emission_dist(emission).mask(length_mask(lengths, T).unsqueeze(-1))
        return dist.DiscreteHMM(initial.new_zeros(K), torch.cat([first, rest], dim=-3), obs)

    # -- exact quantities for point values of the parameters --------------------------------
    def _emission(self, params):
        keys = ("locs", "scales") if self.emission == "gaussian" else ("emission_probs",)
        return {k: params[k] for k in keys}

    def log_likelihood(self, sequences, lengths, params):
        """Exact log p(x_n | theta) of each sequence (N,), by the model's own DiscreteHMM."""
        self.check(sequences, lengths)
        hmm = self._hmm(params["initial"], params["transition"], self._emission(params),
                        sequences, lengths)
        return hmm.log_prob(sequences)

    def emission_log_prob(self, sequences, lengths, params):
        """(N, T, K): log p(x_{n,t} | z = k), zero at padded steps."""
        self.check(sequences, lengths)
        emission = self._emission_dist(self._emission(params))
        values = sequences.unsqueeze(-1 - emission.event_dim)
        mask = length_mask(lengths, sequences.shape[1]).unsqueeze(-1)
        return emission.log_prob(values).masked_fill(~mask, 0.0)

    def posterior_marginals(self, sequences, lengths, params):
        """Forward-backward: p(z_{n,t} = k | x_n, theta), (N, T, K); zero at padded steps.

        Also returns log p(x_n | theta) (N,), log sum_k alpha_{T_n}(k).
        """
        log_e = self.emission_log_prob(sequences, lengths, params)
        log_A = params["transition"].log()
        N, T, K = log_e.shape
        mask = length_mask(lengths, T)
        log_alpha = [params["initial"].log() + log_e[:, 0]]
        for t in range(1, T):
            step = (log_alpha[-1].unsqueeze(-1) + log_A).logsumexp(-2) + log_e[:, t]
            log_alpha.append(torch.where(mask[:, t:t + 1], step, log_alpha[-1]))  # carry past T_n
        log_beta = [torch.zeros_like(log_alpha[0])]
        for t in range(T - 2, -1, -1):
            step = (log_A + (log_e[:, t + 1] + log_beta[0]).unsqueeze(-2)).logsumexp(-1)
            log_beta.insert(0, torch.where(mask[:, t + 1:t + 2], step, log_beta[0]))
        log_alpha, log_beta = torch.stack(log_alpha, 1), torch.stack(log_beta, 1)
        log_px = log_alpha[:, -1].logsumexp(-1)
        gamma = (log_alpha + log_beta - log_px[:, None, None]).exp()
        return gamma * mask.unsqueeze(-1), log_px

    def viterbi(self, sequences, lengths, params):
        """The most probable state path argmax_z p(z_n | x_n, theta), (N, T); -1 at padding."""
        log_e = self.emission_log_prob(sequences, lengths, params)
        log_A = params["transition"].log()
        N, T, K = log_e.shape
        mask = length_mask(lengths, T)
        delta = params["initial"].log() + log_e[:, 0]
        back = []
        for t in range(1, T):
            scores = delta.unsqueeze(-1) + log_A  # (N, from, to)
            best, arg = scores.max(-2)
            keep = mask[:, t:t + 1]
            delta = torch.where(keep, best + log_e[:, t], delta)
            # past T_n each state points to itself, so the backtrack starts at T_n
            back.append(torch.where(keep, arg, torch.arange(K, device=arg.device).expand(N, K)))
        path = [delta.argmax(-1)]
        for arg in reversed(back):
            path.insert(0, arg.gather(-1, path[0].unsqueeze(-1)).squeeze(-1))
        return torch.stack(path, 1).masked_fill(~mask, -1)

    def simulate(self, params, lengths, *, generator=None):
        """Sequences of the given ``lengths`` from the HMM: ``(sequences, states)``, padded."""
        lengths = torch.as_tensor(lengths)
        N, T = len(lengths), int(lengths.max())
        z = torch.empty(N, T, dtype=torch.long)
        z[:, 0] = torch.multinomial(params["initial"], N, replacement=True, generator=generator)
        for t in range(1, T):
            z[:, t] = torch.multinomial(params["transition"][z[:, t - 1]], 1, generator=generator)[:, 0]
        if self.emission == "gaussian":
            noise = torch.randn(N, T, self.D, generator=generator)
            x = params["locs"][z] + params["scales"][z] * noise
        else:
            x = torch.multinomial(params["emission_probs"][z].reshape(N * T, -1), 1,
                                  generator=generator).reshape(N, T)
        mask = length_mask(lengths, T)
        x = x * mask.unsqueeze(-1) if self.emission == "gaussian" else x * mask
        return x, z.masked_fill(~mask, -1)
