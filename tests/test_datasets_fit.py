"""Several data sets in one fit (vi_toolkit.DataSets): the combined minibatch objective is
unbiased for the full one, each set's ELBO is its plate's terms, batches cover every set,
resume is exact, bad input names the set."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from vi_toolkit import Callback, DataSets, data_plate, fit, load_fit

N_A, N_B = 30, 90
LOG_2PI = math.log(2 * math.pi)
INIT = {"m": 0.5, "s": 0.4, "c": 0.3, "t": 0.8}


@pytest.fixture(scope="module")
def xs():
    gen = torch.Generator().manual_seed(0)
    return 1.0 + 1.4 * torch.randn(N_A, generator=gen), 1.0 + 2.0 * torch.randn(N_B, generator=gen)


def model(a, b, num_data=None, scale=None):
    """mu ~ N(0, 3^2); set a: z_i ~ N(0, 1), x_i ~ N(mu + z_i, 1); set b: x_j ~ N(mu, 2^2).

    ``scale`` (a negative control) multiplies each set's terms by N / N_s on top of the
    plate's N_s / B_s: the minibatch estimate then scales both sets by the total N."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with data_plate(a, num_data, name="a"), pyro.poutine.scale(scale=1.0 if scale is None else scale["a"]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("xa", dist.Normal(mu + z, 1.0), obs=a)
    with data_plate(b, num_data, name="b"), pyro.poutine.scale(scale=1.0 if scale is None else scale["b"]):
        pyro.sample("xb", dist.Normal(mu, 2.0), obs=b)


def guide(a, b, num_data=None, scale=None):
    """q(mu) = N(m, s^2); q(z_i | x_i) = N(c x_i, t^2)."""
    m = pyro.param("m", torch.tensor(INIT["m"]))
    s = pyro.param("s", torch.tensor(INIT["s"]), constraint=constraints.positive)
    c = pyro.param("c", torch.tensor(INIT["c"]))
    t = pyro.param("t", torch.tensor(INIT["t"]), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(m, s))
    with data_plate(a, num_data, name="a"), pyro.poutine.scale(scale=1.0 if scale is None else scale["a"]):
        pyro.sample("z", dist.Normal(c * a, t))


def exact_terms(xa, xb, m, log_s, c, log_t):
    """The ELBO's three parts in closed form (Gaussian expectations): global, set a, set b."""
    s2, t2 = (2 * log_s).exp(), (2 * log_t).exp()
    glob = -0.5 * math.log(2 * math.pi * 9) - (m ** 2 + s2) / 18 + 0.5 * (LOG_2PI + 1) + log_s
    set_a = (-LOG_2PI - 0.5 * ((xa - m - c * xa) ** 2 + s2 + t2) - 0.5 * ((c * xa) ** 2 + t2)
             + 0.5 * (LOG_2PI + 1) + log_t)
    set_b = -0.5 * math.log(2 * math.pi * 4) - ((xb - m) ** 2 + s2) / 8
    return glob, set_a.sum(), set_b.sum()


class Record(Callback):
    """Each step's loss and the gradient of every parameter (the update does not move them)."""

    def __init__(self):
        self.losses, self.grads = [], []

    def on_step_end(self, state):
        self.losses.append(float(state.loss))
        self.grads.append(torch.stack([state.params[k].grad.detach().clone() for k in INIT]))


def frozen_fit(xs, steps, batch_size=40, **model_kwargs):
    """A fit whose updates are below float32's resolution: every step estimates the loss and
    its gradient at the initial parameters, on the engine's own minibatches."""
    record = Record()
    result = fit(lambda a, b, num_data=None: model(a, b, num_data, **model_kwargs),
                 lambda a, b, num_data=None: guide(a, b, num_data, **model_kwargs),
                 DataSets(a=xs[0], b=xs[1]), optimizer="sgd", lr=1e-30,
                 batch_size=batch_size, num_steps=steps, callbacks=[record], progress=False, seed=3,
                 options={"val_batch_size": 1000})
    return result, torch.tensor(record.losses), torch.stack(record.grads)


@pytest.fixture(scope="module")
def exact(xs):
    unconstrained = {"m": INIT["m"], "s": math.log(INIT["s"]), "c": INIT["c"], "t": math.log(INIT["t"])}
    values = [torch.tensor(v, requires_grad=True) for v in unconstrained.values()]
    glob, set_a, set_b = exact_terms(*xs, *values)
    loss = -(glob + set_a + set_b)
    grad = torch.stack(torch.autograd.grad(loss, values))
    return {"loss": loss.item(), "grad": grad, "a": set_a.item() / N_A, "b": set_b.item() / N_B,
            "elbo": -loss.item() / (N_A + N_B)}


@pytest.fixture(scope="module")
def frozen(xs):
    return frozen_fit(xs, 300)


def test_combined_minibatch_loss_and_gradient_are_unbiased_for_the_full_objective(xs, exact, frozen):
    result, losses, grads = frozen
    # B = 40 split in proportion 30 : 90
    assert result.config["data_sets"] == {"a": {"num_data": 30, "batch_size": 10},
                                          "b": {"num_data": 90, "batch_size": 30}}
    R = len(losses)
    assert abs(losses.mean() - exact["loss"]) < 4 * losses.std() / R ** 0.5
    se = grads.std(0) / R ** 0.5
    assert ((grads.mean(0) - exact["grad"]).abs() < 4 * se + 1e-3).all(), (grads.mean(0), exact["grad"], se)

    # the same check rejects the estimate that scales each set by the total N instead of N_s
    _, wrong, wrong_grads = frozen_fit(xs, R, scale={"a": (N_A + N_B) / N_A, "b": (N_A + N_B) / N_B})
    assert abs(wrong.mean() - exact["loss"]) > 4 * wrong.std() / R ** 0.5
    wrong_se = wrong_grads.std(0) / R ** 0.5
    assert not ((wrong_grads.mean(0) - exact["grad"]).abs() < 4 * wrong_se + 1e-3).all()


def test_history_holds_each_sets_elbo_per_point_beside_the_total(exact, frozen):
    result, losses, _ = frozen
    h = result.history
    assert h["step"][:3] == [3, 6, 9] and len(h["elbo_a"]) == len(h["elbo_b"]) == len(h["elbo"]) == 100
    for key in ("a", "b", "elbo"):  # each recorded value is an unbiased estimate at the same parameters
        values = torch.tensor(h[key if key == "elbo" else f"elbo_{key}"])
        assert abs(values.mean() - exact[key]) < 4 * values.std() / len(values) ** 0.5 + 1e-9, key
    assert result.config["compile"]["used"] is False
    assert "several data sets" in result.config["compile"]["reason"]


# -- a mixture with labelled and unlabelled points: every term exact (enumerated) -----------
K = 3


def mixture(labelled, unlabelled, num_data=None):
    """pi, mu (parameters); y_i ~ Cat(pi), x_i | y_i ~ N(mu_y, 1); y observed in one set."""
    logits = pyro.param("logits", torch.tensor([0.2, -0.1, 0.0]))
    mu = pyro.param("mu", torch.tensor([-2.0, 0.5, 2.5]))
    x, y = labelled
    with data_plate(x, num_data, name="labelled"):
        y = pyro.sample("y_l", dist.Categorical(logits=logits), obs=y)
        pyro.sample("x_l", dist.Normal(mu[y], 1.0), obs=x)
    with data_plate(unlabelled, num_data, name="unlabelled"):
        y = pyro.sample("y_u", dist.Categorical(logits=logits))
        pyro.sample("x_u", dist.Normal(mu[y], 1.0), obs=unlabelled)


def classifier(labelled, unlabelled, num_data=None):
    """q(y_i | x_i) = softmax(w x_i + b), summed over exactly (enumerated in the guide)."""
    w = pyro.param("w", torch.tensor([-1.0, 0.1, 1.2]))
    b = pyro.param("b", torch.tensor([0.0, 0.3, -0.2]))
    with data_plate(unlabelled, num_data, name="unlabelled"):
        pyro.sample("y_u", dist.Categorical(logits=unlabelled[:, None] * w + b),
                    infer={"enumerate": "parallel"})


def test_each_sets_elbo_is_the_exact_sum_over_its_points_with_enumerated_labels():
    gen = torch.Generator().manual_seed(1)
    y_l = torch.randint(0, K, (20,), generator=gen)
    x_l = torch.tensor([-2.0, 0.5, 2.5])[y_l] + torch.randn(20, generator=gen)
    x_u = 3 * torch.randn(50, generator=gen)
    data = DataSets(labelled=(x_l, y_l), unlabelled=x_u)
    frozen = dict(optimizer="sgd", lr=1e-30, progress=False)
    result = fit(mixture, classifier, data, batch_size={"labelled": 6, "unlabelled": 15}, num_epochs=2,
                 options={"val_batch_size": 7}, **frozen)
    assert result.config["elbo_class"] == "TraceEnum_ELBO"
    # by hand: log pi_y + log N(x | mu_y, 1) for labels, and for the others the sum over y of
    # q(y | x) (log pi_y + log N(x | mu_y, 1) - log q(y | x))
    log_pi = torch.log_softmax(torch.tensor([0.2, -0.1, 0.0]), 0)
    mu = torch.tensor([-2.0, 0.5, 2.5])
    labelled = (log_pi[y_l] + dist.Normal(mu[y_l], 1.0).log_prob(x_l)).mean()
    log_q = torch.log_softmax(x_u[:, None] * torch.tensor([-1.0, 0.1, 1.2]) + torch.tensor([0.0, 0.3, -0.2]), 1)
    joint = log_pi + dist.Normal(mu, 1.0).log_prob(x_u[:, None])
    unlabelled = (log_q.exp() * (joint - log_q)).sum(1).mean()
    for value in result.history["elbo_labelled"]:
        assert value == pytest.approx(float(labelled), rel=1e-5)
    for value in result.history["elbo_unlabelled"]:
        assert value == pytest.approx(float(unlabelled), rel=1e-5)
    # a wrongly attributed term (the unlabelled points' log q counted as a label's log pi) would differ
    assert abs(float(labelled) - float(unlabelled)) > 0.1
    # no global latent: the total per point is the size-weighted mean of the sets' (a full-batch
    # step's loss is exact here: nothing is drawn)
    full = fit(mixture, classifier, data, num_steps=2, **frozen)
    assert full.history["elbo"][-1] == pytest.approx(float(20 * labelled + 50 * unlabelled) / 70, rel=1e-5)
    assert full.history["elbo_labelled"][-1] == pytest.approx(float(labelled), rel=1e-5)


# -- batches --------------------------------------------------------------------------------
def indexed_model(a, b, num_data=None):
    (x, _), (u, _) = a, b
    mu = pyro.param("mu", torch.tensor(0.0))
    with data_plate(x, num_data, name="a"):
        pyro.sample("xa", dist.Normal(mu, 1.0), obs=x)
    with data_plate(u, num_data, name="b"):
        pyro.sample("xb", dist.Normal(mu, 1.0), obs=u)


def nothing(a, b, num_data=None):
    """No latent sites: the model's parameters are fitted by maximum likelihood."""


class Seen:
    """A ``transform`` that keeps each training batch's index tensors (the first call traces)."""

    def __init__(self):
        self.batches = []

    def __call__(self, tensors):
        self.batches.append((tensors[1].tolist(), tensors[3].tolist()))
        return tensors


def _indexed(n_a, n_b):
    return DataSets(a=(torch.randn(n_a), torch.arange(n_a)), b=(torch.randn(n_b), torch.arange(n_b)))


def test_default_batches_are_proportional_and_each_epoch_covers_every_set():
    seen = Seen()
    result = fit(indexed_model, nothing, _indexed(25, 95), batch_size=12, num_epochs=3, transform=seen,
                 progress=False, seed=0)
    # S = ceil(120 / 12) = 10 steps an epoch; B_s = ceil(N_s / S)
    assert {s: c["batch_size"] for s, c in result.config["data_sets"].items()} == {"a": 3, "b": 10}
    assert result.history["step"] == [10, 20, 30]
    steps = seen.batches[1:]
    for epoch in range(3):  # each epoch: a permutation of a in 9 batches (then a new pass), b's in 10
        window = steps[10 * epoch:10 * (epoch + 1)]
        assert sorted(i for a, _ in window[:9] for i in a) == list(range(25))
        assert sorted(i for _, b in window for i in b) == list(range(95))


def test_explicit_batch_sizes_let_the_smaller_set_cycle_within_an_epoch():
    seen = Seen()
    result = fit(indexed_model, nothing, _indexed(20, 90), batch_size={"a": 10, "b": 30}, num_epochs=2,
                 transform=seen, progress=True, seed=0)  # the progress bar counts 40 points a step
    assert result.config["batch_size"] == 40
    assert result.history["step"] == [3, 6]  # b needs 3 batches of 30; a, 2 of 10, then starts anew
    steps = seen.batches[1:]
    assert [len(a) for a, _ in steps] == [10] * 6 and [len(b) for _, b in steps] == [30] * 6
    for first in (0, 3):  # each epoch: a's pass in its first 2 steps, b's in all 3
        assert sorted(i for a, _ in steps[first:first + 2] for i in a) == list(range(20))
        assert sorted(i for _, b in steps[first:first + 3] for i in b) == list(range(90))


def test_a_resumed_fit_of_several_sets_ends_where_an_uninterrupted_one_ends(xs, tmp_path):
    data = DataSets(a=xs[0], b=xs[1])
    settings = dict(batch_size={"a": 4, "b": 7}, lr=0.01, progress=False, seed=5)
    whole = fit(model, guide, data, num_epochs=4, **settings)
    path = tmp_path / "sets.pt"
    half = fit(model, guide, data, num_epochs=2, checkpoint=path, **settings)
    assert all(torch.equal(load_fit(model, guide, data, path, device="cpu").params[k], half.params[k])
               for k in half.params)
    resumed = fit(model, guide, data, num_epochs=4, checkpoint=path, resume=True, **settings)
    assert resumed.history["loss"] == whole.history["loss"]
    assert resumed.history["elbo_a"] == whole.history["elbo_a"]
    assert all(torch.equal(resumed.params[k], whole.params[k]) for k in whole.params)


# -- bad input --------------------------------------------------------------------------------
def test_bad_data_sets_are_value_errors_naming_the_set(xs):
    xa, xb = xs
    with pytest.raises(ValueError, match="at least one named data set"):
        DataSets()
    with pytest.raises(ValueError, match=r"a is empty"):
        DataSets(a=torch.zeros(0), b=xb)
    with pytest.raises(ValueError, match=r"labelled: tensors must share the leading"):
        DataSets(labelled=(xa, torch.zeros(len(xa) - 1)), unlabelled=xb)
    with pytest.raises(ValueError, match="'num_data' cannot name a data set"):
        DataSets(num_data=xa)
    run = dict(progress=False, num_steps=2)
    with pytest.raises(ValueError, match=r"batch_size\['a'\] must be an integer between 1 and the size of "
                                         r"data set 'a' \(30 points\), got 31"):
        fit(model, guide, DataSets(a=xa, b=xb), batch_size={"a": 31, "b": 5}, **run)
    with pytest.raises(ValueError, match=r"batch size of each data set \['a', 'b'\], got one for \['a'\]"):
        fit(model, guide, DataSets(a=xa, b=xb), batch_size={"a": 3}, **run)
    with pytest.raises(ValueError, match=r"data set\(s\) \['c'\]: the model takes no keyword"):
        fit(model, guide, DataSets(a=xa, c=xb), **run)

    def one_plate(a, b, num_data=None):
        mu = pyro.param("mu", torch.tensor(0.0))
        with data_plate(a, num_data, name="a"):
            pyro.sample("xa", dist.Normal(mu, 1.0), obs=a)
        pyro.sample("xb", dist.Normal(mu, 1.0).expand([len(b)]).to_event(1), obs=b)

    with pytest.raises(ValueError, match=r"data set 'b' \(90 points, batches of 9\): the model opens no "
                                         r"plate named 'b'"):
        fit(one_plate, nothing, DataSets(a=xa, b=xb), batch_size=12, **run)
    for bad, message in ((dict(val_data=xa), "val_data: a fit of several data sets"),
                         (dict(elbo="iwae"), "elbo='iwae' scales the points of one data plate"),
                         (dict(until="converged"), "until: a fit of several data sets"),
                         (dict(compile=True), "compile=True: a fit of several data sets")):
        with pytest.raises(ValueError, match=message):
            fit(model, guide, DataSets(a=xa, b=xb), **bad, **run)
    with pytest.raises(ValueError, match=r"num_data holds the sizes of the data sets \['a'\], none named 'b'"):
        data_plate(xb, {"a": 30}, name="b")
