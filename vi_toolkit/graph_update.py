"""The optimizer's update as tensor operations, for a compiled step to hold in its graph.

Adam (D. P. Kingma and J. Ba, "Adam: a method for stochastic optimization", ICLR 2015,
Algorithm 1, in ``torch.optim.Adam``'s form) moves the parameters u with gradient g at step t by

    g <- g min(1, c / (||g|| + 1e-6))          (with clip_norm c, the norm over all gradients),
    g <- g + lambda u   (Adam's weight decay)   or   u <- (1 - lr lambda) u   (AdamW's),
    m <- beta1 m + (1 - beta1) g,      v <- beta2 v + (1 - beta2) g^2,
    u <- u - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps).

:class:`AdamRule` writes these operations so that :class:`~vi_toolkit.compiled.StepGraph`
traces them after the gradients, into the same graph: the step is then one call, with no
Python optimizer, no gradient tensors handed back and forth, and Adam's elementwise passes
fused by the compiler. The state (m, v, t) stays in the torch optimizer's own ``state``, in the
layout torch's Adam creates, so ``state_dict``, checkpoints, a resumed fit and an eager step
after a fall-back are the torch optimizer's. The graph takes the state tensors and each
parameter group's learning rate as inputs at every call (read from the optimizer then), so a
learning-rate schedule and a restored checkpoint take effect; it writes the new values into
the parameters and the state in place.

:meth:`AdamRule.for_step` says when the rule applies: ``torch.optim.Adam`` or ``AdamW`` (as
``fit``'s ``"adam"``/``"adamw"`` build them) without ``amsgrad``, ``maximize`` or tensor
hyperparameters, in a single-process fit (a data-parallel fit reduces the gradients across
processes between the two halves, outside any graph), on the CPU (on CUDA the step is replayed
as a CUDA graph, which Inductor gives up for a graph that writes its inputs; Adam's fused
kernel is one launch there); otherwise the compiled step hands the gradients to the optimizer
as before. Step hooks registered on the optimizer do not run.
"""

import torch

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s
# Parameters of at least this many elements have their update's scalars returned by the graph
# (see AdamRule.apply): each output costs a buffer and a return (about 1 us a step), which a
# loop of a few vector iterations does not win back.
SCALARS_OUT_MIN = 1024


class AdamRule:
    """Adam's update of ``params`` (see the module), traced into a step's graph.

    Args:
        optimizer: the fit's ``torch.optim.Adam`` or ``AdamW``.
        params: the fit's parameters, in the graph's order.
        clip_norm: the global gradient norm to clip to, or ``None``.
    """

    def __init__(self, optimizer, params, clip_norm):
        self.optimizer, self.params, self.clip_norm = optimizer, list(params), clip_norm
        group_of = {p: i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self.groups = [group_of[p] for p in self.params]
        self.decoupled = isinstance(optimizer, torch.optim.AdamW) or any(
            g.get("decoupled_weight_decay", False) for g in optimizer.param_groups)
        self.state_of = None  # the optimizer's state dict that self.state's tensors are from
        self.state, self.lrs, self.lr_values = [], [], []

    @classmethod
    def for_step(cls, optimizer, params, *, clip_norm, world) -> "tuple[AdamRule | None, str | None]":
        """``(rule, None)``, or ``(None, why)`` when the graph cannot hold the optimizer's update."""
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            return None, f"{type(optimizer).__name__} is not torch's Adam or AdamW"
        if world != 1:
            return None, "a data-parallel fit reduces the gradients across processes between the loss and the update"
        for group in optimizer.param_groups:
            flags = [k for k in ("amsgrad", "maximize", "differentiable") if group.get(k)]
            tensors = [k for k in ("lr", "betas", "weight_decay", "eps")
                       if any(torch.is_tensor(v) for v in (group[k] if k == "betas" else (group[k],)))]
            if flags or tensors:
                return None, f"Adam with {', '.join(flags + [f'tensor {k}' for k in tensors])}"
        if any(p.device.type != "cpu" for p in params):
            return None, ("on CUDA the step is replayed as a CUDA graph, which a graph that writes "
                          "its inputs would not be; Adam's fused kernel applies the gradients")
        return cls(optimizer, params, clip_norm), None

    def inputs(self) -> "list[torch.Tensor]":
        """The graph's inputs besides parameters and batch: every group's learning rate, then
        each parameter's m, v and t (created here, as torch's Adam creates them, before the
        first step).

        The tensors are kept from call to call (a step's fixed cost counts on a small model:
        building them took 5 of its 115 microseconds): the learning rates are written when a
        group's rate has changed, and the state's tensors are looked up again when the
        optimizer's state is a new dict, which ``load_state_dict`` (a checkpoint, a resumed fit,
        the last good state) makes it."""
        groups = self.optimizer.param_groups
        if len(self.lrs) != len(groups):
            self.lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=self.params[0].device) for g in groups]
            self.lr_values = [g["lr"] for g in groups]
        for i, group in enumerate(groups):
            if group["lr"] != self.lr_values[i]:
                self.lrs[i].fill_(float(group["lr"]))
                self.lr_values[i] = group["lr"]
        if self.optimizer.state is not self.state_of:
            self.state, self.state_of = [], self.optimizer.state
            for p, g in zip(self.params, self.groups):
                s = self.optimizer.state[p]
                if not s:
                    fused = groups[g].get("fused") or groups[g].get("capturable")
                    s["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if fused
                                 else torch.tensor(0.0, dtype=torch.get_default_dtype()))
                    s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.state += [s["exp_avg"], s["exp_avg_sq"], s["step"]]
        return self.lrs + self.state

    def apply(self, params, grads, inputs) -> "list[torch.Tensor]":
        """Adam's update (the module's equations), written into ``params`` and the state
        ``inputs`` (:meth:`inputs`' order) in place; a parameter whose gradient is ``None``
        (unused by the loss) is left as it is, as torch's Adam leaves it.

        Returns:
            the scalars lr / (1 - beta1^t) and sqrt(1 - beta2^t) of each parameter of at least
            :data:`SCALARS_OUT_MIN` elements, for the graph to return: an output is computed
            once, where Inductor would otherwise inline these scalars, two ``pow`` calls, into
            every vector iteration of the update's loop (3.7x the update's time for a 784 x 400
            weight, one thread).
        """
        new_params, new_state, scalars = self.updated(params, grads, inputs)
        state = inputs[len(self.optimizer.param_groups):]
        with torch.no_grad():
            for old, new in zip([*params, *state], [*new_params, *new_state]):
                if new is not old:
                    old.copy_(new)
        return scalars

    def updated(self, params, grads, inputs):
        """Adam's update as new tensors, nothing written: ``(params, state, scalars)``, the
        parameters and the state (:meth:`inputs`' order, without the learning rates) after the
        step, a parameter whose gradient is ``None`` and its state being the tensors given, and
        :meth:`apply`'s scalars. A loop of steps in one graph carries these from step to step."""
        scalars = []
        lrs, state = inputs[:len(self.optimizer.param_groups)], list(inputs[len(self.optimizer.param_groups):])
        params = list(params)
        used = [i for i, g in enumerate(grads) if g is not None]
        scale = None
        if self.clip_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grads[i]) for i in used]))
            scale = torch.clamp(self.clip_norm / (norm + CLIP_EPS), max=1.0)
        with torch.no_grad():
            for i in used:
                p, g, group = params[i], grads[i], self.optimizer.param_groups[self.groups[i]]
                m, v, t = state[3 * i:3 * i + 3]
                lr, (beta1, beta2), eps, decay = lrs[self.groups[i]], group["betas"], group["eps"], group["weight_decay"]
                g = g * scale if scale is not None else g
                t_new = t + 1
                u = p
                if decay:
                    if self.decoupled:
                        u = p * (1 - lr * decay)
                    else:
                        g = g + decay * p
                m_new = torch.lerp(m, g, 1 - beta1)
                v_new = v * beta2 + (1 - beta2) * g * g
                step_size = lr / (1 - torch.pow(beta1, t_new))
                bias2_sqrt = torch.sqrt(1 - torch.pow(beta2, t_new))
                params[i] = u - step_size * m_new / (torch.sqrt(v_new) / bias2_sqrt + eps)
                state[3 * i:3 * i + 3] = m_new, v_new, t_new
                if p.numel() >= SCALARS_OUT_MIN:
                    scalars += [step_size, bias2_sqrt]
        return params, state, scalars

    def mutated(self, num_params, num_batch) -> "set[int]":
        """The graph inputs (by position) that :meth:`apply` writes: parameters and state."""
        first_state = num_params + num_batch + len(self.optimizer.param_groups)
        return set(range(num_params)) | set(range(first_state, first_state + 3 * len(self.params)))

