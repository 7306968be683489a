"""Discrete Bayesian networks: EM written here on a latent-class network, brute-force enumeration
of the joint on a network with chained latent nodes, the toolkit's analysis and evaluation on a
fit, and the validation of the DAG."""

import itertools
import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

import vi_toolkit
from vi_toolkit.analysis import to_inference_data
from vi_toolkit.evaluation import evaluate
from vi_toolkit.recipes import fit_bayesnet
from vi_toolkit.models.bayesnet import CPT_PREFIX, BayesianNetwork, Node

CARDS = (3, 4, 2, 3, 3)  # the observed children of the latent class C (3 classes)
ITEMS = [f"x{j}" for j in range(len(CARDS))]


def latent_class_network(concentration):
    nodes = [Node("C", 3)] + [Node(name, c, ("C",)) for name, c in zip(ITEMS, CARDS)]
    return BayesianNetwork(nodes, observed=ITEMS, concentration=concentration)


def random_cpts(net, seed, concentration=0.5):
    gen = torch.Generator().manual_seed(seed)
    cpts = {}
    for node in net.nodes:
        draw = torch._standard_gamma(torch.full(net.cpt_shape(node.name), concentration), generator=gen)
        cpts[node.name] = draw / draw.sum(-1, keepdim=True)
    return cpts


@pytest.fixture(scope="module")
def latent_class_data():
    truth = latent_class_network(1.0)
    cpts = random_cpts(truth, seed=0)
    cpts["C"] = torch.tensor([0.5, 0.3, 0.2])
    sample = truth.simulate(cpts, 1200, generator=torch.Generator().manual_seed(1))
    train = {name: sample[name][:600] for name in ITEMS}
    test = {name: sample[name][600:] for name in ITEMS}
    return train, test


# -- an independent reference: MAP-EM for the latent-class network, in numpy ------------------
def em_latent_class(x, K, cards, alpha, *, restarts=3, iterations=300, seed=0):
    """EM with Dirichlet(alpha) priors (alpha - 1 pseudo-counts); the best of ``restarts``.

    Returns (mean log-likelihood per point, class proportions (K,), item CPTs [(K, c_j)]).
    """
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        pi = rng.dirichlet(np.ones(K))
        theta = [rng.dirichlet(np.ones(c), size=K) for c in cards]
        for _ in range(iterations + 1):
            log_joint = np.log(pi) + sum(np.log(t[:, x[:, j]]).T for j, t in enumerate(theta))
            loglik = np.logaddexp.reduce(log_joint, axis=1)
            r = np.exp(log_joint - loglik[:, None])  # E-step: p(C = k | x_i)
            pi_new = (r.sum(0) + alpha - 1) / (len(x) + K * (alpha - 1))  # M-step
            theta_new = [(r.T @ np.eye(c)[x[:, j]] + alpha - 1) / (r.sum(0)[:, None] + c * (alpha - 1))
                         for j, c in enumerate(cards)]
            if _ < iterations:
                pi, theta = pi_new, theta_new
        if best is None or loglik.mean() > best[0]:
            best = (loglik.mean(), pi, theta)
    return best


def max_cpt_error(est, pi, theta):
    """Max |est - EM| over every CPT entry, for the best relabelling of the latent classes."""
    errors = []
    for perm in itertools.permutations(range(len(pi))):
        p = list(perm)
        errors.append(max([np.abs(est["C"].numpy()[p] - pi).max()]
                          + [np.abs(est[name].numpy()[p] - t).max() for name, t in zip(ITEMS, theta)]))
    return min(errors)


def test_fitted_cpts_and_log_likelihood_equal_em_on_a_latent_class_network(latent_class_data):
    train, test = latent_class_data
    alpha = 5.0  # four pseudo-counts a cell: the prior moves the MAP visibly away from the ML fit
    net = latent_class_network(alpha)
    result, guide = fit_bayesnet(net, train)
    est = guide.point_estimate(result)
    x = np.stack([train[name].numpy() for name in ITEMS], 1)
    em_loglik, pi, theta = em_latent_class(x, 3, CARDS, alpha)
    assert abs(net.log_likelihood(train, est).mean().item() - em_loglik) < 0.01
    assert max_cpt_error(est, pi, theta) < 0.01
    x_test = np.stack([test[name].numpy() for name in ITEMS], 1)
    log_joint = np.log(pi) + sum(np.log(t[:, x_test[:, j]]).T for j, t in enumerate(theta))
    em_heldout = np.logaddexp.reduce(log_joint, axis=1).mean()
    assert abs(net.log_likelihood(test, est).mean().item() - em_heldout) < 0.01
    # negative control: the maximum-likelihood fit (no pseudo-counts) is not MAP-EM's answer
    result, guide = fit_bayesnet(latent_class_network(1.0), train)
    assert max_cpt_error(guide.point_estimate(result), pi, theta) > 0.01


# -- an independent reference: the joint of every node by brute-force enumeration -------------
CHAIN = [Node("A", 2), Node("B", 3, ("A",)), Node("C", 2, ("A",)), Node("D", 3, ("B", "C")),
         Node("E", 2, ("B",)), Node("F", 2, ("D", "A"))]  # A, B latent; A -> B chains them


def brute_force_joint(net, cpts):
    """p(every node's value) as an array over the nodes in ``net.nodes`` order, by enumeration."""
    names = [n.name for n in net.nodes]
    cards = [n.cardinality for n in net.nodes]
    joint = np.zeros(cards)
    for values in itertools.product(*(range(c) for c in cards)):
        assignment = dict(zip(names, values))
        joint[values] = math.prod(
            float(cpts[n.name][tuple(assignment[p] for p in n.parents) + (assignment[n.name],)])
            for n in net.nodes)
    return joint, names


def brute_force_query(joint, names, evidence_row, query):
    """p(query | evidence) as an array over the query nodes, and log p(evidence)."""
    index = tuple(evidence_row[n] if n in evidence_row else slice(None) for n in names)
    table = joint[index]
    free = [n for n in names if n not in evidence_row]
    summed = tuple(i for i, n in enumerate(free) if n not in query)
    marginal = table.sum(axis=summed)
    order = [n for n in free if n in query]
    marginal = np.transpose(marginal, [order.index(q) for q in query])
    return marginal / marginal.sum(), np.log(table.sum())


def test_exact_queries_and_log_likelihood_equal_brute_force_enumeration():
    net = BayesianNetwork(CHAIN, observed=["C", "D", "E", "F"], concentration=1.5)
    cpts = {name: cpt.double() for name, cpt in random_cpts(net, seed=3, concentration=1.0).items()}
    joint, names = brute_force_joint(net, cpts)
    sample = net.simulate(cpts, 40, generator=torch.Generator().manual_seed(4))
    for evidence_nodes, query in ((["C", "D", "E", "F"], ["A"]), (["C", "D", "E", "F"], ["B"]),
                                  (["C", "D", "E", "F"], ["B", "A"]), (["D"], ["A", "B"]),
                                  (["B", "F"], ["A", "D"])):
        evidence = {name: sample[name] for name in evidence_nodes}
        posterior = net.posterior(evidence, cpts, query).numpy()
        loglik = net.log_likelihood(evidence, cpts).numpy()
        for i in range(40):
            row = {name: int(sample[name][i]) for name in evidence_nodes}
            expected, expected_loglik = brute_force_query(joint, names, row, query)
            assert np.allclose(posterior[i], expected, atol=1e-10)
            assert abs(loglik[i] - expected_loglik) < 1e-10


def test_the_enumerated_model_sums_its_latent_nodes_out_exactly():
    net = BayesianNetwork(CHAIN, observed=["C", "D", "E", "F"], concentration=1.5)
    cpts = random_cpts(net, seed=5, concentration=1.0)
    joint, names = brute_force_joint(net, cpts)
    evidence = {k: v for k, v in net.simulate(cpts, 50, generator=torch.Generator().manual_seed(6)).items()
                if k in net.observed}
    conditioned = poutine.condition(net.model, data={CPT_PREFIX + k: v for k, v in cpts.items()})
    elbo = -TraceEnum_ELBO(max_plate_nesting=1).loss(conditioned, lambda **_: None, **evidence)
    log_prior = sum(float(pyro.distributions.Dirichlet(torch.full(net.cpt_shape(k), 1.5)).log_prob(v).sum())
                    for k, v in cpts.items())
    loglik = sum(brute_force_query(joint, names, {n: int(evidence[n][i]) for n in net.observed}, ["A"])[1]
                 for i in range(50))
    assert abs(elbo - (loglik + log_prior)) < 1e-3


def test_simulate_draws_the_networks_joint_distribution():
    net = BayesianNetwork(CHAIN, observed=["C", "D", "E", "F"])
    cpts = random_cpts(net, seed=7, concentration=1.0)
    joint, _ = brute_force_joint(net, cpts)
    n = 20000
    sample = net.simulate(cpts, n, generator=torch.Generator().manual_seed(8))
    frequencies = np.zeros_like(joint)
    np.add.at(frequencies, tuple(sample[node.name].numpy() for node in net.nodes), 1.0 / n)
    assert np.abs(frequencies - joint).max() < 4 * np.sqrt(joint.max() / n)


def test_to_inference_data_and_evaluate_on_a_fitted_network(latent_class_data):
    train, test = latent_class_data
    net = latent_class_network(2.0)
    result, guide = fit_bayesnet(net, train)
    est = guide.point_estimate(result)
    exact = net.log_likelihood(test, est)
    report = evaluate(result, test, num_samples=8,
                      exact=lambda *tensors: net.log_likelihood(dict(zip(test, tensors)), est))
    # a point-mass guide and the class summed out: every importance weight is the exact marginal
    assert abs(report["iwae"] - exact.mean().item()) < 1e-4
    assert abs(report["elbo"] - report["iwae"]) < 1e-4 and abs(report["exact_minus_iwae"]) < 1e-4
    draws = 200
    idata = to_inference_data(result, train, num_samples=draws, seed=0)
    assert set(idata.posterior.data_vars) == {CPT_PREFIX + n.name for n in net.nodes} | {"C"}
    assert np.allclose(idata.posterior[CPT_PREFIX + "x1"].values[0, 0], est["x1"].numpy())
    loglik = idata.log_likelihood["joint"].values[0]  # (draw, data): the class summed out
    assert loglik.shape == (draws, 600)
    assert np.allclose(loglik, net.log_likelihood(train, est).numpy(), atol=1e-4)
    classes = idata.posterior["C"].values[0]  # (draw, data): drawn from p(C | x_i, theta_hat)
    frequency = (classes[..., None] == np.arange(3)).mean(0)
    posterior = net.posterior(train, est, "C").numpy()
    se = np.sqrt((posterior * (1 - posterior)).mean(0) / (draws * 600))
    assert (np.abs(frequency.mean(0) - posterior.mean(0)) < 4 * se + 1e-6).all()
    assert np.abs(frequency - posterior).mean() < 0.02
    assert set(idata.observed_data.data_vars) == set(ITEMS)


def test_a_saved_fit_reloads_with_its_network_and_cpts(tmp_path):
    net = BayesianNetwork(CHAIN, observed=["C", "D", "E", "F"])
    evidence = {k: v for k, v in net.simulate(random_cpts(net, 9, 1.0), 300,
                                              generator=torch.Generator().manual_seed(10)).items()
                if k in net.observed}
    result, guide = fit_bayesnet(net, evidence)
    result.save(tmp_path / "fit.pt")
    loaded = vi_toolkit.load(tmp_path / "fit.pt")
    rebuilt = loaded.guide.net  # built anew from the stored spec of the network
    assert rebuilt is not net and repr(rebuilt) == repr(net)
    cpts = loaded.guide.point_estimate(loaded)
    assert all(torch.equal(cpts[k], v) for k, v in guide.point_estimate(result).items())
    assert torch.allclose(rebuilt.log_likelihood(evidence, cpts), net.log_likelihood(evidence, cpts))


def test_bad_networks_and_evidence_are_value_errors_naming_the_node():
    def build(nodes, observed=("b",), **kwargs):
        return BayesianNetwork(nodes, observed=observed, **kwargs)

    with pytest.raises(ValueError, match=r"directed cycle through node 'a': a -> b -> c -> a"):
        build([Node("a", 2, ("c",)), Node("b", 2, ("a",)), Node("c", 2, ("b",))])
    with pytest.raises(ValueError, match="node 'b': unknown parent 'z'"):
        build([Node("a", 2), Node("b", 2, ("z",))])
    with pytest.raises(ValueError, match="node 'a' is its own parent"):
        build([Node("a", 2, ("a",)), Node("b", 2)])
    for card in (1, 2.0, True, "3"):
        with pytest.raises(ValueError, match=r"node 'a': cardinality must be an integer >= 2"):
            build([Node("a", card), Node("b", 2)])
    with pytest.raises(ValueError, match="node 'a' is declared twice"):
        build([Node("a", 2), Node("a", 3), Node("b", 2)])
    with pytest.raises(ValueError, match="node 'b': parents must be a sequence of distinct names"):
        build([Node("a", 2), Node("b", 2, ("a", "a"))])
    with pytest.raises(ValueError, match="node 'b': parents must be a sequence"):
        build([Node("a", 2), Node("b", 2, "a")])
    with pytest.raises(ValueError, match="observed: unknown node 'q'"):
        build([Node("a", 2), Node("b", 2)], observed=("q",))
    with pytest.raises(ValueError, match="observed: name at least one"):
        build([Node("a", 2), Node("b", 2)], observed=())
    with pytest.raises(ValueError, match="node 'cpt_a' clashes with the CPT site of node 'a'"):
        build([Node("a", 2), Node("cpt_a", 2), Node("b", 2)])
    with pytest.raises(ValueError, match="concentration must be positive"):
        build([Node("a", 2), Node("b", 2)], concentration=0)

    net = build([Node("a", 3), Node("b", 2, ("a",))])
    good = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match=r"evidence for node 'b' out of range: value 2 at index 1, "
                                         r"the node takes 0..1"):
        fit_bayesnet(net, {"b": torch.tensor([0, 2, 1])})
    with pytest.raises(ValueError, match="evidence for node 'b' out of range: value -1"):
        net.log_likelihood({"b": torch.tensor([-1])}, random_cpts(net, 0))
    with pytest.raises(ValueError, match="evidence: node 'a' is latent in this network"):
        fit_bayesnet(net, {"b": good, "a": good})
    with pytest.raises(ValueError, match="evidence: observed node 'b' has no values"):
        net.check({"a": good})
    with pytest.raises(ValueError, match="evidence: unknown node 'c'"):
        net.check({"b": good, "c": good})
    with pytest.raises(ValueError, match="evidence for node 'b' must be a 1-D integer tensor"):
        net.check({"b": good.float()})
    cpts = random_cpts(net, 0)
    with pytest.raises(ValueError, match="query: node 'b' is given as evidence"):
        net.posterior({"b": good}, cpts, "b")
    with pytest.raises(ValueError, match="query: unknown node 'z'"):
        net.posterior({"b": good}, cpts, ["z"])
    with pytest.raises(ValueError, match=r"params: the CPT of node 'b' has shape \(2, 2\), expected \(3, 2\)"):
        net.log_likelihood({"b": good}, {**cpts, "b": torch.full((2, 2), 0.5)})
