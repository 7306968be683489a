"""Discrete Bayesian networks: a DAG of categorical nodes, some observed, the others summed out.

The user declares the nodes v = 1..V, each with a cardinality c_v and parents pa(v), and
which nodes O are observed; the others, H, are latent for every data point. The network is

    theta_v[u] ~ Dir(alpha 1_{c_v})             for each node v and configuration u of pa(v)
    x_iv | x_i,pa(v) ~ Cat(theta_v[x_i,pa(v)])  i = 1..N, v in a topological order

where theta_v, of shape (c_pa(v)..., c_v), is v's conditional probability table (CPT). The
latent nodes are marked ``infer={"enumerate": "parallel"}``, so the enum ELBO sums them out
exactly (variable elimination over the enumerated dims) and a guide needs only the CPTs:

    log p(x_iO | theta) = log sum_{x_iH} prod_v theta_v[x_i,pa(v), x_iv].

For point values of the CPTs, :meth:`BayesianNetwork.log_likelihood` and
:meth:`BayesianNetwork.posterior` contract the same factors, one log-CPT per node and one
log-indicator 1[x_v = e_iv] per node with evidence, in log space with opt_einsum's
contraction order (``pyro.ops.einsum.contract``): an exact query

    p(x_Q | x_E = e_i) = sum_{x_rest} prod_v theta_v[...] / sum_{x_Q, x_rest} prod_v theta_v[...]

costs time exponential in the width of the elimination order, not in the number of latent
nodes (Koller & Friedman, Probabilistic Graphical Models, 2009, ch. 3 and 9). Fitting a MAP
guide is the gradient counterpart of EM for a partially observed network (ibid. ch. 19), with
the Dirichlet priors acting as alpha - 1 pseudo-counts.
"""

import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import is_validation_enabled
from pyro.ops.einsum import contract
from pyro.ops.indexing import Vindex

from vi_toolkit.plates import data_plate
from vi_toolkit.specs import Rebuildable

CPT_PREFIX = "cpt_"  # the sample site of node v's CPT is "cpt_" + v


@dataclass(frozen=True)
class Node(Rebuildable):
    """A categorical node: its ``name``, ``cardinality`` (values 0..cardinality-1) and ``parents``."""

    name: str
    cardinality: int
    parents: tuple[str, ...] = field(default=())


def _symbol(j: int) -> str:
    """The j-th einsum symbol: a-z, A-Z, then the further characters opt_einsum takes."""
    return string.ascii_letters[j] if j < len(string.ascii_letters) else chr(140 + j)


def _find_cycle(parents: dict[str, tuple[str, ...]]) -> list[str] | None:
    """A directed cycle of the graph ``child -> parents`` as a list of names, or None."""
    state, stack = {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for p in parents[name]:
            if state.get(p) == "open":
                return stack[stack.index(p):] + [p]
            if p not in state and (cycle := visit(p)):
                return cycle
        state[name] = "done"
        stack.pop()
        return None

    for name in parents:
        if name not in state and (cycle := visit(name)):
            return cycle[::-1]  # parent -> child order
    return None


class BayesianNetwork(Rebuildable):
    """A DAG of categorical ``nodes`` with CPTs under Dirichlet priors; ``model(num_data, **evidence)``.

    The data are a dict ``{name: (N,) integer tensor}`` holding exactly the ``observed`` nodes
    (``fit`` passes a dict by keyword). ``params`` below is a dict ``{name: CPT}`` of point
    values, each of shape (cardinalities of the parents..., cardinality), rows on the simplex;
    guides return it from their ``point_estimate``.
    """

    def __init__(self, nodes: Iterable[Node], observed: Iterable[str], *, concentration: float = 1.0):
        """Declare the network and check that it is a DAG.

        Args:
            nodes: the nodes, in any order.
            observed: the names of the observed nodes (at least one).
            concentration: alpha of every CPT row's Dirichlet prior.

        Raises:
            ValueError: naming the node, for a name that is not a non-empty string or is used
                twice, a cardinality that is not an integer >= 2, an unknown, repeated or own
                parent, a directed cycle, an unknown observed node; or for no observed node or
                a concentration that is not positive.
        """
        nodes = list(nodes)
        if not nodes:
            raise ValueError("nodes: the network has no nodes")
        by_name = {}
        for node in nodes:
            if not isinstance(node, Node):
                raise ValueError(f"nodes must be Node(name, cardinality, parents), got {node!r}")
            if not isinstance(node.name, str) or not node.name or node.name == "num_data":
                raise ValueError(f"node name must be a non-empty string other than 'num_data', "
                                 f"got {node.name!r}")
            if node.name in by_name:
                raise ValueError(f"node {node.name!r} is declared twice")
            card = node.cardinality
            if not isinstance(card, int) or isinstance(card, bool) or card < 2:
                raise ValueError(f"node {node.name!r}: cardinality must be an integer >= 2, got {card!r}")
            by_name[node.name] = node
        for node in nodes:
            if isinstance(node.parents, str) or len(set(node.parents)) != len(node.parents):
                raise ValueError(f"node {node.name!r}: parents must be a sequence of distinct names, "
                                 f"got {node.parents!r}")
            for p in node.parents:
                if p == node.name:
                    raise ValueError(f"node {node.name!r} is its own parent")
                if p not in by_name:
                    raise ValueError(f"node {node.name!r}: unknown parent {p!r}")
            if CPT_PREFIX + node.name in by_name:
                raise ValueError(f"node {CPT_PREFIX + node.name!r} clashes with the CPT site of "
                                 f"node {node.name!r}")
        cycle = _find_cycle({n.name: tuple(n.parents) for n in nodes})
        if cycle:
            raise ValueError(f"the graph has a directed cycle through node {cycle[0]!r}: "
                             + " -> ".join(cycle))
        observed = list(observed)
        if not observed:
            raise ValueError("observed: name at least one observed node")
        for name in observed:
            if name not in by_name:
                raise ValueError(f"observed: unknown node {name!r}")
        if not concentration > 0:
            raise ValueError(f"concentration must be positive, got {concentration!r}")
        self.nodes = self._topological(nodes, by_name)
        self.by_name = {n.name: n for n in self.nodes}
        self.observed = [n.name for n in self.nodes if n.name in set(observed)]
        self.latent = [n.name for n in self.nodes if n.name not in set(observed)]
        self.concentration = concentration

    @staticmethod
    def _topological(nodes, by_name):
        """The nodes ordered parents first, ties in the order given (the graph is acyclic)."""
        done, order = set(), []
        while len(order) < len(nodes):
            for node in nodes:
                if node.name not in done and all(p in done for p in node.parents):
                    order.append(by_name[node.name])
                    done.add(node.name)
                    break
        return order

    def __repr__(self):
        nodes = ", ".join(f"{n.name}[{n.cardinality}]" + (f"|{','.join(n.parents)}" if n.parents else "")
                          for n in self.nodes)
        return f"BayesianNetwork({nodes}; observed={self.observed})"

    def cpt_shape(self, name: str) -> tuple[int, ...]:
        """The shape of node ``name``'s CPT: (cardinalities of its parents..., its cardinality)."""
        node = self.by_name[name]
        return tuple(self.by_name[p].cardinality for p in node.parents) + (node.cardinality,)

    def check(self, evidence: Mapping[str, torch.Tensor], *, observed_only: bool = True) -> int:
        """Check ``evidence`` against the network.

        Args:
            evidence: ``{name: (N,) integer tensor}``.
            observed_only: the keys must be exactly the observed nodes (the model's data);
                False: any non-empty set of nodes (a query's evidence).

        Returns:
            N, the number of data points.

        Raises:
            ValueError: naming the node, for an unknown node, a missing observed or a given
                latent node (``observed_only``), a tensor that is not 1-D integers, unequal
                lengths, or a value out of the node's range.
        """
        if not isinstance(evidence, Mapping) or not evidence:
            raise ValueError("evidence must be a non-empty dict {node name: (N,) integer tensor}")
        for name in evidence:
            if name not in self.by_name:
                raise ValueError(f"evidence: unknown node {name!r}")
        if observed_only:
            missing = [n for n in self.observed if n not in evidence]
            latent = [n for n in evidence if n not in self.observed]
            if missing:
                raise ValueError(f"evidence: observed node {missing[0]!r} has no values")
            if latent:
                raise ValueError(f"evidence: node {latent[0]!r} is latent in this network; it is "
                                 "summed out, not given")
        n = None
        for name, value in evidence.items():
            if not torch.is_tensor(value) or value.dim() != 1 or value.is_floating_point():
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"evidence for node {name!r} must be a 1-D integer tensor, got {shape}")
            if n is not None and len(value) != n:
                raise ValueError(f"evidence for node {name!r} has {len(value)} values, the other "
                                 f"nodes {n}")
            n = len(value)
            card = self.by_name[name].cardinality
            bad = (value < 0) | (value >= card)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"evidence for node {name!r} out of range: value {int(value[i])} at "
                                 f"index {i}, the node takes 0..{card - 1}")
        return n

    def model(self, num_data: int | None = None, **evidence: torch.Tensor) -> None:
        """The Pyro program p(theta, x_O, x_H) of the module docstring, given ``evidence`` on O."""
        if is_validation_enabled():  # the range checks read values back from the device
            self.check(evidence)
        evidence = {name: value.long() for name, value in evidence.items()}
        like = evidence[self.observed[0]]
        dtype = torch.get_default_dtype()
        cpts = {}
        for node in self.nodes:
            alpha = torch.full(self.cpt_shape(node.name), self.concentration, dtype=dtype, device=like.device)
            cpts[node.name] = pyro.sample(CPT_PREFIX + node.name,
                                          dist.Dirichlet(alpha).to_event(len(node.parents)))
        values = {}
        with data_plate(like, num_data, dim=-1):
            for node in self.nodes:
                probs = Vindex(cpts[node.name])[(Ellipsis, *(values[p] for p in node.parents), slice(None))]
                latent = node.name not in evidence
                values[node.name] = pyro.sample(
                    node.name, dist.Categorical(probs), obs=evidence.get(node.name),
                    infer={"enumerate": "parallel"} if latent else {})

    # -- exact inference for point values of the CPTs ----------------------------------------
    def _contract(self, evidence, params, query):
        """log sum over every node outside ``query`` and ``evidence`` of the joint, with the
        evidence fixed: a tensor (N, cardinalities of ``query``...)."""
        self.check(evidence, observed_only=False)
        for name in self.by_name:
            if name not in params:
                raise ValueError(f"params: no CPT for node {name!r}")
            if tuple(params[name].shape) != self.cpt_shape(name):
                raise ValueError(f"params: the CPT of node {name!r} has shape "
                                 f"{tuple(params[name].shape)}, expected {self.cpt_shape(name)}")
        symbol = {node.name: _symbol(j + 1) for j, node in enumerate(self.nodes)}
        point = _symbol(0)
        dtype = params[self.nodes[0].name].dtype
        terms, operands = [], []
        for node in self.nodes:
            terms.append("".join(symbol[v] for v in (*node.parents, node.name)))
            operands.append(params[node.name].log())
        for name, value in evidence.items():
            terms.append(point + symbol[name])
            indicator = torch.nn.functional.one_hot(value.long(), self.by_name[name].cardinality)
            operands.append(indicator.to(dtype).log())
        output = point + "".join(symbol[q] for q in query)
        return contract(",".join(terms) + "->" + output, *operands, backend="pyro.ops.einsum.torch_log")

    def log_likelihood(self, evidence: Mapping[str, torch.Tensor], params: dict) -> torch.Tensor:
        """Exact log p(x_iE = e_i | theta) of each point, (N,), every other node summed out.

        Args:
            evidence: ``{name: (N,) integer tensor}`` on any nodes (the model's data: the
                observed ones).
            params: ``{name: CPT}`` for every node.

        Raises:
            ValueError: naming the node, for evidence out of range or a CPT of the wrong shape.
        """
        return self._contract(evidence, params, ())

    def posterior(self, evidence: Mapping[str, torch.Tensor], params: dict,
                  query: str | Iterable[str]) -> torch.Tensor:
        """Exact p(x_Q | x_E = e_i, theta) of each point, jointly over the ``query`` nodes.

        Args:
            evidence: ``{name: (N,) integer tensor}`` on any nodes.
            params: ``{name: CPT}`` for every node.
            query: a node name or several, none of them in ``evidence``.

        Returns:
            (N, cardinalities of the query nodes...), summing to one over the query dims.

        Raises:
            ValueError: naming the node, for an unknown query node or one given as evidence,
                and as :meth:`log_likelihood`.
        """
        query = [query] if isinstance(query, str) else list(query)
        if not query or len(set(query)) != len(query):
            raise ValueError(f"query must name one or more distinct nodes, got {query!r}")
        for name in query:
            if name not in self.by_name:
                raise ValueError(f"query: unknown node {name!r}")
            if name in evidence:
                raise ValueError(f"query: node {name!r} is given as evidence")
        joint = self._contract(evidence, params, query)
        marginal = joint.flatten(1).logsumexp(-1).reshape((-1,) + (1,) * len(query))
        return (joint - marginal).exp()

    def simulate(self, params: dict, n: int, *,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draw ``n`` joint samples of every node (ancestral sampling): ``{name: (n,) tensor}``."""
        values = {}
        for node in self.nodes:
            probs = params[node.name][tuple(values[p] for p in node.parents)]
            values[node.name] = torch.multinomial(probs.expand(n, -1), 1, generator=generator).squeeze(-1)
        return values
