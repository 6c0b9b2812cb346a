"""The public surface: ``xa.backward``, ``xa.Superset``, the queries and ``xa.mixed``.

Each public function checks its arguments and builds one request
(:mod:`xa.request`), then hands it down: the plan (:mod:`xa.plan`), the run
within the budget (:mod:`xa.budget`), and the results onto leaves
(:mod:`xa.attach`) or read as a query's answer (:mod:`xa.answer`,
:mod:`xa.mixed`).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

from . import attach, budget, checks, sampling
from . import plan as planner
from . import request as requests
from .answer import answer
from .capture import Graph
from .diag import diagonal as diagonal_of
from .mixed import blocks as mixed_blocks
from .queries import Biharmonic, Directional, Laplacian, Mixed, Operator, Partials, Pure


class Superset:
    """The derivatives of one source tensor, up to some order.

    ``xa.backward`` builds one and returns it; build one yourself to keep the
    partials of intermediate tensors.

    Example:
        >>> x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        >>> h = torch.tanh(x)
        >>> s = (h * h).sum()
        >>> sup = xa.Superset.construct(s).retain_partials(h)
        >>> _ = sup.backward(order=2)
        >>> [p.shape for p in sup.operator_partials(h)]
        [torch.Size([1, 3]), torch.Size([1, 3, 3])]
    """

    def __init__(self, source: torch.Tensor):
        checks.source(source)
        if source.grad_fn is None:
            Graph(source)  # raises the descriptive SourceError
        self.source = source
        self._retain: list = []
        self._partials: dict = {}
        self._leaves: list = []
        self.plan: Optional[planner.Plan] = None

    @classmethod
    def construct(cls, source: torch.Tensor) -> "Superset":
        """A Superset for ``source`` (any tensor with a ``grad_fn``, scalar or not)."""
        return cls(source)

    def retain_partials(self, tensors: Union[torch.Tensor, Iterable[torch.Tensor]]) -> "Superset":
        """Keep ``d^k source / dT^k`` of these intermediate tensors at the next ``backward``."""
        for t in checks.intermediates(tensors):
            if not any(t is r for r in self._retain):
                self._retain.append(t)
        return self

    def clear_retentions(self) -> "Superset":
        """Forget the tensors given to :meth:`retain_partials`, and their partials."""
        self._retain.clear()
        self._partials.clear()
        return self

    def backward(self, order: int, target: Optional[torch.Tensor] = None, configurations=None,
                 direction: str = "auto", max_memory: Optional[int] = None,
                 batch_dim: Optional[int] = None, create_graph: Optional[bool] = None) -> "Superset":
        """Compute the derivatives of the source up to ``order`` and attach them.

        Args:
            order: the highest order, a positive int.
            target: only this tensor (a leaf, or an intermediate tensor, whose
                partials are then read with :meth:`operator_partials`).
            configurations: rules swapped in for this call, ``{node name: rule}``.
            direction: ``"auto"`` (price both, take the cheaper), ``"backward"``
                or ``"forward"``; see :func:`xa.backward`.
            max_memory: the budget in bytes; see :func:`xa.backward`.
            batch_dim: the source's sample dim, for per-sample derivatives; see :func:`xa.backward`.
            create_graph: whether the results carry a gradient; see :func:`xa.backward`.

        Returns:
            ``self``. Each leaf ``L`` reached gets ``L.xgrad``: a tuple whose
            ``k-1``-th entry has shape ``(source.numel(), *(k * (L.numel(),)))``.
        """
        with torch.set_grad_enabled(checks.create_graph(create_graph)):
            request = requests.derivatives(self.source, order, target, configurations, direction, max_memory,
                                           batch_dim, create_graph, retain=self._retain)
            plan, results, kept = budget.compute(request, planner.build(request))
            self.plan = plan
            self._leaves, self._partials = attach.attach(request, plan, results, kept)
        return self

    def operator_partials(self, tensor: torch.Tensor) -> tuple:
        """``(d source/dT, ..., d^order source/dT^order)`` of a retained intermediate ``T``.

        Each has shape ``(source.numel(), *(k * (T.numel(),)))``; per sample
        (``batch_dim=``), ``(B, s', *(k * (n',)))`` as for ``.xgrad``.

        Raises:
            KeyError: ``tensor`` was not retained, or ``backward`` has not run.
        """
        if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
            hit = self._partials.get((tensor.grad_fn, tensor.output_nr))
            if hit is not None:
                return hit
        raise KeyError("no partials for this tensor: pass it to retain_partials() (or as target=) "
                       "before backward()")

    def remove_partials(self) -> "Superset":
        """Take ``.xgrad`` off the leaves this Superset set it on."""
        for leaf in self._leaves:
            if hasattr(leaf, "xgrad"):
                del leaf.xgrad
        self._leaves = []
        return self


def backward(source: torch.Tensor, order: int, target: Optional[torch.Tensor] = None,
             configurations=None, direction: str = "auto", max_memory: Optional[int] = None,
             batch_dim: Optional[int] = None, create_graph: Optional[bool] = None) -> Superset:
    """Exact derivatives of ``source`` of every order up to ``order``.

    Every leaf with ``requires_grad=True`` that ``source`` depends on gets
    ``.xgrad``, a tuple of ``order`` tensors; the k-th has shape
    ``(source.numel(), *(k * (leaf.numel(),)))`` and holds
    ``d^k source.flatten()[a] / dleaf.flatten()[i1] ... dleaf.flatten()[ik]``,
    in the leaf's dtype and on its device. torch's graph is left as it was:
    ``source.backward()`` still works afterwards.

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        order: the highest derivative order, a positive int.
        target: compute only for this tensor (a leaf, or an intermediate
            tensor whose partials are then in the returned Superset).
        configurations: rules swapped in for this call, ``{node name: rule}``.
        direction: ``"backward"`` contracts from the source down (blocks of
            ``source.numel() * n_v^k``), ``"forward"`` pushes jets up from each
            leaf (``n_v * leaf.numel()^k``); ``"auto"`` prices both with
            opt_einsum's cost model and runs the cheaper.
        max_memory: bytes the computation may use, results included. By
            default half of the memory the system has available (on a GPU,
            80% of its free memory). A plan whose estimated peak is over
            budget runs backward over chunks of source rows; if even one row
            does not fit, :class:`xa.MemoryBudgetError` is raised before
            anything is allocated. Per sample, the chunks are chunks of samples.
        batch_dim: the source's sample dim (e.g. ``0`` for ``u`` of shape
            ``(B, 1)`` from collocation points ``X`` of shape ``(B, 3)``): each
            sample's own derivatives, ``B = source.shape[batch_dim]``,
            ``s' = source.numel() // B``. A leaf the sample dim reaches
            (``X``) gets ``xgrad[k-1]`` of shape ``(B, s', *(k * (n',)))``,
            ``n' = X.numel() // B``: ``d^k S_b / dX_b^k``, what ``torch.func.vmap``
            of nested ``jacrev`` gives. A leaf it does not reach (a weight
            ``W``) is shared: ``(B, s', *(k * (W.numel(),)))``, each sample's
            derivatives w.r.t. all of ``W``. A node that couples samples (a
            sum, softmax or batch norm over the batch) raises
            :class:`xa.BatchMixingError` before anything runs.
        create_graph: whether the results are differentiable, as in
            ``torch.autograd.grad``. By default (``None``) they are whenever grad
            mode is on: ``.xgrad`` are functions of the network's parameters and
            of the leaves, so a loss built from them trains (``loss.backward()``
            reaches every parameter, at any order of differentiation). ``False``,
            or ``torch.no_grad()``, gives plain data, in less memory and time.

    Returns:
        The :class:`Superset`, which holds the plan and any retained partials.

    Example:
        >>> x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        >>> y = torch.tanh(x).sum()
        >>> _ = xa.backward(y, order=3)
        >>> x.xgrad[2].shape
        torch.Size([1, 3, 3, 3])
    """
    return Superset(source).backward(order, target=target, configurations=configurations, direction=direction,
                                     max_memory=max_memory, batch_dim=batch_dim, create_graph=create_graph)


def clear_partials() -> int:
    """Take ``.xgrad`` off every tensor xa set it on, and return how many.

    A recorded ``.xgrad`` (the default under grad mode, so that it can be trained on) hangs on a
    graph that holds its leaf: the leaf and its derivatives keep each other alive until ``.xgrad``
    is deleted. In a loop that calls :func:`xa.backward` on fresh tensors, call this (or
    :meth:`Superset.remove_partials`) once their ``.xgrad`` is used, or pass ``create_graph=False``.

    Example:
        >>> x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        >>> _ = xa.backward(torch.tanh(x).sum(), order=2)
        >>> xa.clear_partials() >= 1, hasattr(x, "xgrad")
        (True, False)
    """
    return attach.clear()


# --------------------------------------------------------------------------- queries

_ARGS = """
        batch_dim: the source's sample dim: each sample's answer w.r.t. its own
            entries of ``wrt`` (``u`` of shape ``(B, 1)`` from points ``x`` of shape
            ``(B, d)``: one number per point). See :func:`xa.backward`.
        configurations: rules swapped in for this call, as in :func:`xa.backward`.
        max_memory: bytes, as in :func:`xa.backward`; per sample, over budget, chunks of samples.
        create_graph: whether the answer carries a gradient (to the parameters, to ``wrt``, to
            coefficients and directions that require grad); by default whenever grad mode is on.
            See :func:`xa.backward`.
        direction: ``"auto"`` (the cheaper), ``"forward"`` (jets of the query's rows,
            collapsed) or ``"backward"`` (backprop of the whole tensor, contracted at the leaf)."""


def laplacian(source: torch.Tensor, wrt: torch.Tensor, batch_dim: Optional[int] = None,
              configurations=None, max_memory: Optional[int] = None, direction: str = "auto",
              create_graph: Optional[bool] = None, samples: Optional[int] = None,
              distribution: Optional[str] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``sum_i d^2 source / dwrt_i^2``, shaped like ``source``, in its dtype and on its device.

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a leaf that requires grad (``i`` runs over all its entries, or, with
            ``batch_dim``, over one sample's entries).{args}{sampling}
            Here the estimate is Hutchinson's ``mean_s d^2 source [v_s, v_s]``, ``v_s = V[b, s]`` for sample
            ``b``, with ``V = (2 * torch.randint(0, 2, (S, B, n), generator=generator, dtype=wrt.dtype) - 1)``
            ``.transpose(0, 1)`` (Rademacher, ``distribution=None`` or ``"rademacher"``) or
            ``torch.randn((S, B, n), generator=generator, dtype=wrt.dtype).transpose(0, 1)`` (``"gaussian"``),
            drawn on ``wrt``'s device (``(S, n)``, not transposed, without ``batch_dim``).

    Example:
        >>> x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        >>> u = (x ** 2).sum(1, keepdim=True)
        >>> xa.laplacian(u, x, batch_dim=0).flatten().tolist()   # 6 for every point
        [6.0, 6.0, 6.0, 6.0, 6.0]
        >>> g = torch.Generator().manual_seed(0)
        >>> xa.laplacian(u, x, batch_dim=0, samples=4, generator=g).flatten().tolist()   # v^T (2 I) v = 6 for v = ±1
        [6.0, 6.0, 6.0, 6.0, 6.0]
    """
    drawn = sampling.check("xa.laplacian", samples, distribution, generator, wrt)
    if drawn is not None:
        return _estimate("xa.laplacian", source, wrt, batch_dim,
                         lambda B, n, dtype, device: sampling.laplacian(wrt, B, n, *drawn, dtype, device),
                         configurations, max_memory, direction, create_graph)
    return _answer(source, Laplacian(wrt), batch_dim, configurations, max_memory, direction, create_graph)


def biharmonic(source: torch.Tensor, wrt: torch.Tensor, batch_dim: Optional[int] = None,
               configurations=None, max_memory: Optional[int] = None, direction: str = "auto",
               create_graph: Optional[bool] = None, samples: Optional[int] = None,
               distribution: Optional[str] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``sum_(i,j) d^4 source / dwrt_i^2 dwrt_j^2`` (the Laplacian of the Laplacian), shaped like ``source``.

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a leaf that requires grad.{args}{sampling}
            Here the estimate is ``mean_s d^4 source [v_s, .., v_s] / 3`` with Gaussian
            ``V = torch.randn((S, B, n), generator=generator, dtype=wrt.dtype).transpose(0, 1)``
            (``E[d^4 u [v, .., v]]`` is 3 times the biharmonic for ``v ~ N(0, I)``); ``distribution``
            must be ``None`` or ``"gaussian"``:
            Rademacher directions give no unbiased estimate here (:class:`xa.SamplingError`).

    Example:
        >>> x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
        >>> u = (x ** 4).sum(1, keepdim=True)
        >>> xa.biharmonic(u, x, batch_dim=0).flatten().tolist()   # 48 for every point
        [48.0, 48.0, 48.0, 48.0, 48.0]
        >>> g = torch.Generator().manual_seed(0)
        >>> est = xa.biharmonic(u, x, batch_dim=0, samples=20000, generator=g)
        >>> bool(((est - 48).abs() < 3).all())                    # mean of 24 (v_0^4 + v_1^4) / 3
        True
    """
    drawn = sampling.check("xa.biharmonic", samples, distribution, generator, wrt, default="gaussian")
    if drawn is not None:
        return _estimate("xa.biharmonic", source, wrt, batch_dim,
                         lambda B, n, dtype, device: sampling.biharmonic("xa.biharmonic", wrt, B, n, *drawn, dtype,
                                                                         device),
                         configurations, max_memory, direction, create_graph)
    return _answer(source, Biharmonic(wrt), batch_dim, configurations, max_memory, direction, create_graph)


def partials(source: torch.Tensor, wrt: torch.Tensor, indices: Sequence, batch_dim: Optional[int] = None,
             configurations=None, max_memory: Optional[int] = None, direction: str = "auto",
             create_graph: Optional[bool] = None) -> tuple:
    """Chosen partials ``d^k source / dwrt_(i_1) .. dwrt_(i_k)``, all from one plan.

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a leaf that requires grad.
        indices: a list of multi-indices, each a tuple of entry positions in ``wrt``
            flattened (one sample's entries with ``batch_dim``); an int ``i`` is ``(i,)``.
            ``(1, 1)`` is ``d^2 / dwrt_1^2``, ``(0, 1, 1)`` is ``d^3 / dwrt_0 dwrt_1^2``.{args}

    Returns:
        A tuple with one tensor shaped like ``source`` per multi-index, in their order.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        >>> pts = torch.randn(100, 3, dtype=torch.float64, requires_grad=True)   # (t, x, y) per point
        >>> u = net(pts)                                                        # (100, 1)
        >>> T, X, Y = 0, 1, 2
        >>> u_t, u_xx, u_yy = xa.partials(u, pts, [(T,), (X, X), (Y, Y)], batch_dim=0)
        >>> u_t.shape
        torch.Size([100, 1])
    """
    return _answer(source, Partials(wrt, indices), batch_dim, configurations, max_memory, direction,
                   create_graph)


def differential_operator(source: torch.Tensor, wrt: torch.Tensor, coefficients: dict,
                          batch_dim: Optional[int] = None, configurations=None,
                          max_memory: Optional[int] = None, direction: str = "auto",
                          create_graph: Optional[bool] = None, samples: Optional[int] = None,
                          distribution: Optional[str] = None,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``sum_k sum C_k[i_1..i_k] d^k source / dwrt_(i_1) .. dwrt_(i_k)``, shaped like ``source``.

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a leaf that requires grad (``n`` entries, per sample with ``batch_dim``).
        coefficients: ``{k: C_k}`` for the orders the operator has. ``C_k`` is a
            dense tensor of shape ``(n,) * k``; :class:`xa.queries.Diagonal`\\ ``(c)``
            (``C_k[i, .., i] = c[i]``); :class:`xa.queries.RankOne`\\ ``(v)``
            (``sum_r v_r ⊗ .. ⊗ v_r``, a directional jet); or a dict
            ``{multi-index: number}`` of its nonzero entries. Their values are read
            at every call; their structure (which kind, which entries) is planned.{args}{sampling}
            Here, order by order: order 1 and ``RankOne`` exactly; order 2 with a dense ``A`` or a
            ``Diagonal`` by Hutchinson, ``E[d^2 source [A^T v, v]]`` (``distribution`` as for
            :func:`xa.laplacian`); any other order or a dict by importance sampling of its entries
            (``S`` entries ``a`` drawn with probability ``|C[a]| / sum |C|``, each a mixed jet along
            one-hot directions, weighted ``C[a] / p_a``). See :mod:`xa.sampling`.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        >>> pts = torch.randn(100, 3, dtype=torch.float64, requires_grad=True)   # (t, x, y) per point
        >>> u = net(pts)
        >>> # u_t - 0.1 (u_xx + u_yy)
        >>> r = xa.differential_operator(u, pts, {1: {(0,): 1.0}, 2: {(1, 1): -0.1, (2, 2): -0.1}}, batch_dim=0)
        >>> u_t, u_xx, u_yy = xa.partials(u, pts, [(0,), (1, 1), (2, 2)], batch_dim=0)
        >>> torch.allclose(r, u_t - 0.1 * (u_xx + u_yy))
        True
        >>> g = torch.Generator().manual_seed(0)    # an unbiased estimate: u_t exactly, the rest from 8 draws
        >>> est = xa.differential_operator(u, pts, {1: {(0,): 1.0}, 2: {(1, 1): -0.1, (2, 2): -0.1}}, batch_dim=0,
        ...                                samples=8, generator=g)
        >>> est.shape, bool(((est - r).abs() <= 0.2 * (u_xx.abs() + u_yy.abs())).all())
        (torch.Size([100, 1]), True)
    """
    drawn = sampling.check("xa.differential_operator", samples, distribution, generator, wrt)
    if drawn is not None:
        return _estimate("xa.differential_operator", source, wrt, batch_dim,
                         lambda B, n, dtype, device: sampling.operator_query(
                             "xa.differential_operator", wrt, coefficients, B, n, *drawn, dtype, device),
                         configurations, max_memory, direction, create_graph)
    return _answer(source, Operator(wrt, coefficients), batch_dim, configurations, max_memory, direction,
                   create_graph)


def directional(source: torch.Tensor, wrt: torch.Tensor, directions: torch.Tensor, order: int,
                batch_dim: Optional[int] = None, configurations=None, max_memory: Optional[int] = None,
                direction: str = "auto", create_graph: Optional[bool] = None) -> tuple:
    """Directional jets: ``d^k source [v, .., v]`` for k = 1..order and each direction ``v``.

    ``d^k source [v, .., v] / k!`` is the k-th Taylor coefficient of ``t -> source(wrt + t v)``.

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a leaf that requires grad (``n`` entries, per sample with ``batch_dim``).
        directions: one direction (1-d, ``n`` entries), or ``m`` of them, ``(m, n)``
            or ``(m, *one sample of wrt's shape)``; the same for every sample. With
            ``batch_dim``, a 3-d ``(B, m, n)`` (``B`` the source's samples, ``n`` one sample's
            entries of ``wrt``) gives each sample its own ``m`` directions: ``directions[b, j]``
            for sample ``b``, seeded per sample through one plan (no loop over samples).
        order: the highest order ``K``.{args}

    Returns:
        A tuple of ``order`` tensors: the k-th shaped like ``source`` for one
        direction, ``(m, *source.shape)`` for ``m``.

    Example:
        >>> x = torch.randn(3, dtype=torch.float64, requires_grad=True)
        >>> v = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
        >>> d1, d2, d3 = xa.directional(torch.exp(x).sum(), x, v, order=3)   # Taylor terms times k!
        >>> torch.allclose(d3, (torch.exp(x) * v ** 3).sum())
        True
        >>> X = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
        >>> V = torch.randn(4, 3, 2, dtype=torch.float64)                  # each point its own 3 directions
        >>> d1, d2 = xa.directional(torch.exp(X).sum(1), X, V, order=2, batch_dim=0)
        >>> d2.shape, torch.allclose(d2, (torch.exp(X)[None] * V.transpose(0, 1) ** 2).sum(-1))
        (torch.Size([3, 4]), True)
    """
    per_sample = _per_sample_directions(source, wrt, directions, batch_dim)
    return _answer(source, Directional(wrt, directions, order, per_sample), batch_dim, configurations, max_memory,
                   direction, create_graph)


def _per_sample_directions(source, wrt, directions, batch_dim) -> bool:
    """With ``batch_dim``, whether ``directions`` is ``(B, m, n)``: each sample's own ``m`` directions."""
    if batch_dim is None or not isinstance(directions, torch.Tensor) or directions.dim() != 3:
        return False
    d = checks.batch_dim(batch_dim, checks.source(source))
    B = source.shape[d]
    return (isinstance(wrt, torch.Tensor) and B > 0 and wrt.numel() % B == 0 and directions.shape[0] == B
            and directions.shape[2] == wrt.numel() // B)


_SAMPLING = """
        samples: ``None`` (the default) for the exact value; a positive int ``S`` for an unbiased
            *randomized estimate*, the mean of ``S`` random terms per sample (each sample along
            ``batch_dim`` draws its own), computed in one plan whose jets are seeded with the random
            directions; trainable like the exact value (the directions are constants).
        distribution: ``"rademacher"`` or ``"gaussian"``: what the random directions are drawn from
            (only with ``samples``; ``None`` takes the default named below).
        generator: a ``torch.Generator`` on ``wrt``'s device, for reproducible draws (only with ``samples``)."""

for _f in (laplacian, biharmonic, partials, differential_operator, directional):
    _f.__doc__ = _f.__doc__.replace("{args}", _ARGS).replace("{sampling}", _SAMPLING)


def mixed(source: torch.Tensor, wrt, batch_dim: Optional[int] = None, configurations=None,
          max_memory: Optional[int] = None, create_graph: Optional[bool] = None):
    """Mixed partials across leaves: ``d^k source / dwrt[0] .. dwrt[k-1]``.

    Backprop's joint blocks of the leaves asked together (one plan serves every request).

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a sequence of leaves, repeats allowed: ``(A, B)`` is ``d^2 S / dA dB``,
            ``(A, A, B)`` is ``d^3 S / dA^2 dB``; or a list of such sequences, all
            computed in one plan.
        batch_dim: the source's sample dim, as in :func:`xa.backward`.
        configurations: rules swapped in for this call, as in :func:`xa.backward`.
        max_memory: bytes, as in :func:`xa.backward`.
        create_graph: whether the blocks carry a gradient, as in :func:`xa.backward`.

    Returns:
        For one request, ``(s, n_0, .., n_(k-1))``: xa's layout, ``s = source.numel()``,
        ``n_j = wrt[j].numel()`` (per sample with ``batch_dim``: ``(B, s', n_0', ..)``).
        ``.reshape(*source.shape, *A.shape, *B.shape)`` is
        ``torch.func.hessian(f, argnums=(0, 1))(A, B)[0][1]``. For a list, a tuple of them.

    Example:
        >>> A = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        >>> B = torch.randn(3, dtype=torch.float64, requires_grad=True)
        >>> loss = torch.tanh(A @ B).sum()
        >>> xa.mixed(loss, (A, B)).shape                         # (1, A.numel(), B.numel())
        torch.Size([1, 12, 3])
        >>> H_AAB, H_AB = xa.mixed(loss, [(A, A, B), (A, B)])
        >>> H_AAB.shape
        torch.Size([1, 12, 12, 3])
    """
    query = Mixed(wrt)
    with torch.set_grad_enabled(checks.create_graph(create_graph)):
        request = requests.query(source, query, batch_dim, configurations, max_memory, "backward", create_graph)
        return mixed_blocks(request, query)


def _estimate(caller, source, wrt, batch_dim, make, configurations, max_memory, direction, create_graph):
    """A randomized estimate (:mod:`xa.sampling`): the query ``make(B, n, dtype, device)`` builds from its draws."""
    sample_dim = checks.batch_dim(batch_dim, checks.source(source))
    with torch.set_grad_enabled(checks.create_graph(create_graph)):
        B, n = sampling.layout(caller, source, wrt, sample_dim)
        query = make(B, n, wrt.dtype if wrt.is_floating_point() else source.dtype, wrt.device)
    return _answer(source, query, batch_dim, configurations, max_memory, direction, create_graph)


def diagonal(source: torch.Tensor, wrt, order: int, batch_dim: Optional[int] = None, configurations=None,
             max_memory: Optional[int] = None, direction: str = "auto", create_graph: Optional[bool] = None):
    """The diagonal of the k-th derivative: ``d^k source / dwrt_i^k`` for every entry ``i`` of ``wrt``.

    It costs about a Laplacian, not the whole derivative tensor: forward, the jets of the rows
    ``(i,)*j`` alone; backward, backprop whose terms write only the diagonal of the leaf's
    block (the other blocks stay dense), so the Hessian diagonal of a parameter of any size
    never builds ``n^2`` entries. ``xa.diagonal(losses, W, order=2, batch_dim=0)`` is each
    sample's Hessian diagonal (BackPACK's ``BatchDiagHessian``); without ``batch_dim``, on
    ``losses.sum()``, its sum (``DiagHessian``).

    Args:
        source: a tensor with a ``grad_fn``, of any shape.
        wrt: a leaf that requires grad (an input, a parameter), or a sequence of leaves, all
            answered by one plan.
        order: ``k``, a positive int.
        batch_dim: the source's sample dim: each sample's diagonal w.r.t. its own entries of a
            batched leaf (points ``x`` of shape ``(B, d)``: ``d^k u_b / dx_(b,i)^k``), or w.r.t. all of a
            shared one (a weight). See :func:`xa.backward`.
        configurations: rules swapped in for this call, as in :func:`xa.backward`.
        max_memory: bytes, as in :func:`xa.backward`; over budget, chunks of source rows, or with
            ``batch_dim`` of samples.
        direction: ``"auto"`` (price both, run the cheaper), ``"forward"`` (jets of the diagonal's
            rows) or ``"backward"`` (backprop with the leaf's positions tied).
        create_graph: whether the result carries a gradient, as in :func:`xa.backward`.

    Returns:
        ``(*source.shape, *wrt.shape)``, in ``wrt``'s dtype and on its device; with ``batch_dim``,
        ``wrt.shape`` is one sample's (a shared leaf's whole shape). For a sequence of leaves, a
        tuple of them in that order.

    Raises:
        QueryError: ``order`` is not a positive int. TargetError: ``wrt`` is not a leaf of the
        source's graph. TypeError: ``wrt`` is not a tensor or a sequence of tensors.

    Example:
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
        >>> u = (x[:, :1] ** 3 * x[:, 1:] ** 2)                   # (2, 1): one value per point
        >>> xa.diagonal(u, x, order=2, batch_dim=0).tolist()     # (6 x0 x1^2, 2 x0^3) per point
        [[[24.0, 2.0]], [[288.0, 54.0]]]
        >>> W = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
        >>> losses = torch.tanh(x @ W.T).sum(1)                   # (2,): one loss per point
        >>> xa.diagonal(losses, W, order=2, batch_dim=0).shape   # each point's Hessian diagonal
        torch.Size([2, 3, 2])
    """
    query = Pure(wrt, order)
    with torch.set_grad_enabled(checks.create_graph(create_graph)):
        request = requests.query(source, query, batch_dim, configurations, max_memory, direction, create_graph)
        return diagonal_of(request, query)


def _answer(source, query, batch_dim, configurations, max_memory, direction, create_graph):
    with torch.set_grad_enabled(checks.create_graph(create_graph)):
        request = requests.query(source, query, batch_dim, configurations, max_memory, direction, create_graph)
        return answer(request, query)
