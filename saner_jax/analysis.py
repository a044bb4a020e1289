r"""Measuring the paper's mechanism: the clean/noisy gradient split and sharpness.

Both tools work on any parameter pytree and any loss; model state such as
BatchNorm statistics goes in through the loss's extra arguments and is never
updated here. They cost extra passes, so call them on logged steps only.

**The clean/noisy decomposition.** For a batch of :math:`N` examples with
per-example losses :math:`\ell_j` and noise mask :math:`z_j` (True where the
training label is wrong),

.. math::
   c = \nabla \tfrac1N \textstyle\sum_{j:\,\lnot z_j} \ell_j(w), \qquad
   n = \nabla \tfrac1N \textstyle\sum_{j:\,z_j} \ell_j(w), \qquad
   c + n = g = \nabla L_B(w),

and :math:`c', n'` are the same at :math:`w + \epsilon`, with :math:`\epsilon`
the perturbation formed from :math:`g` (so :math:`c' + n' = g^{SAM}`). The
SANER paper (Section 3) argues in words that SAM shrinks the coordinates
where the noisy samples' gradient dominates; the definitions below are this project's operational reading of
those words, not formulas from the paper. Coordinate :math:`i` is

- *noisy-dominated* when :math:`n_i c_i < 0` and :math:`|n_i| > |c_i|` (the
  noisy part decides the sign of :math:`g_i`),
- *clean-dominated* when :math:`n_i c_i < 0` and :math:`|c_i| > |n_i|`,
- *aligned* when :math:`n_i` and :math:`c_i` have the same strict sign,

and otherwise (a zero part, or a tie) of no kind. Signs are compared
directly, as in :func:`saner_jax.group_mask`, so nothing underflows.

**Sharpness.** The largest-magnitude eigenvalue of the Hessian of the loss
by power iteration, and its trace by Hutchinson's estimator, both on
Hessian-vector products :math:`Hv = \partial_t \nabla L(w + t v)|_{t=0}`
(``jax.jvp`` of ``jax.grad``, forward over reverse), as PyHessian (and the
SANER authors' utils/pyhessian) does.

References:
  Luong, Nguyen, Tran and Tran, `Understanding SAM's Robustness to Noisy Labels through Gradient
  Down-weighting <https://arxiv.org/abs/2411.17132>`__, AISTATS 2026

  Yao, Gholami, Keutzer and Mahoney, `PyHessian: Neural Networks Through the Lens of the Hessian
  <https://arxiv.org/abs/1912.07145>`__, IEEE BigData 2020

  Hutchinson, "A Stochastic Estimator of the Trace of the Influence Matrix for Laplacian
  Smoothing Splines", Communications in Statistics - Simulation and Computation, 1990
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saner_jax import _validation
from saner_jax.saner import group_mask

KINDS = ("noisy_dom", "clean_dom", "aligned")


def _kind_masks(clean: jax.Array, noisy: jax.Array) -> dict[str, jax.Array]:
  opposite = ((clean > 0) & (noisy < 0)) | ((clean < 0) & (noisy > 0))
  aligned = ((clean > 0) & (noisy > 0)) | ((clean < 0) & (noisy < 0))
  return {
    "noisy_dom": opposite & (jnp.abs(noisy) > jnp.abs(clean)),
    "clean_dom": opposite & (jnp.abs(clean) > jnp.abs(noisy)),
    "aligned": aligned,
  }


def _flat(tree: Any) -> jax.Array:
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(_validation.widened(tree))])


def _check_noise_mask(noise_mask: Any, losses: jax.Array) -> None:
  dtype = getattr(noise_mask, "dtype", None)
  if dtype is None or jnp.dtype(dtype) != jnp.bool_:
    raise TypeError(
      f"noise_mask must be a boolean array (True where the label is noisy), got dtype {dtype}; pass mask.astype(bool)"
    )
  if jnp.shape(losses) != jnp.shape(noise_mask) or jnp.ndim(losses) != 1:
    raise ValueError(
      f"noise_mask has shape {jnp.shape(noise_mask)} but the per-example losses have shape {jnp.shape(losses)}; "
      "give one flag per example, and a loss_fn that returns one loss per example"
    )


def coordinate_kinds(clean_grads: Any, noisy_grads: Any) -> dict[str, Any]:
  r"""Which coordinates are noisy-dominated, clean-dominated or aligned.

  With :math:`c` and :math:`n` the clean and noisy parts of the gradient
  (:func:`clean_noisy_grads`), coordinate :math:`i` is noisy-dominated when
  :math:`n_i c_i < 0` and :math:`|n_i| > |c_i|`, clean-dominated when
  :math:`n_i c_i < 0` and :math:`|c_i| > |n_i|`, aligned when both have the
  same strict sign, and of no kind otherwise (see the module docstring).

  Args:
    clean_grads: :math:`c`, any pytree.
    noisy_grads: :math:`n`, the same structure.

  Returns:
    ``{"noisy_dom": ..., "clean_dom": ..., "aligned": ...}``, each a pytree
    of boolean masks shaped like the gradients. Jit-able.

  Examples:
    >>> import jax.numpy as jnp
    >>> from saner_jax import analysis
    >>> kinds = analysis.coordinate_kinds(jnp.array([-0.5, -0.05, 1.0]), jnp.array([0.1, 1.0, 2.0]))
    >>> print({kind: mask.tolist() for kind, mask in kinds.items()})
    {'noisy_dom': [False, True, False], 'clean_dom': [True, False, False], 'aligned': [False, False, True]}
  """
  _validation.check_same_structure("noisy_grads", noisy_grads, clean_grads, "clean_grads")
  per_leaf = [_kind_masks(c, n) for c, n in zip(jax.tree.leaves(clean_grads), jax.tree.leaves(noisy_grads))]
  treedef = jax.tree.structure(clean_grads)
  return {kind: jax.tree.unflatten(treedef, [masks[kind] for masks in per_leaf]) for kind in KINDS}


def clean_noisy_grads(
  per_example_loss_fn: Callable[..., Any], *, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
  r"""Builds the gradients of a batch loss's clean and noisy parts.

  For per-example losses :math:`\ell_j` and noise mask :math:`z_j`,

  .. math::
     c = \nabla \tfrac1N \textstyle\sum_{j:\,\lnot z_j} \ell_j(w), \qquad
     n = \nabla \tfrac1N \textstyle\sum_{j:\,z_j} \ell_j(w), \qquad
     c + n = \nabla L_B(w),

  both over the full batch size :math:`N`, so that they add up to the batch
  gradient. Cost: one forward and two backward passes.

  Args:
    per_example_loss_fn: ``fn(params, *args, **kwargs)`` returning the
      ``[N]`` per-example losses, or ``(losses, aux)`` with ``has_aux``
      (``aux`` is ignored).
    has_aux: whether the loss returns ``(losses, aux)``.

  Returns:
    ``fn(params, noise_mask, *args, **kwargs)`` returning ``(c, n)``, two
    pytrees like ``params``; ``noise_mask`` is a boolean ``[N]`` array, True
    where the label is noisy. Jit-able.

  Examples:
    >>> import jax.numpy as jnp
    >>> from saner_jax import analysis
    >>> losses = lambda w, x, y: 0.5 * (x @ w - y) ** 2
    >>> x, y = jnp.array([[1.0, 0.1], [0.1, 1.0]]), jnp.array([1.0, -2.0])
    >>> c, n = analysis.clean_noisy_grads(losses)(jnp.zeros(2), jnp.array([False, True]), x, y)
    >>> print(c, n)
    [-0.5  -0.05] [0.1 1. ]
  """

  def split(params: Any, noise_mask: jax.Array, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    def losses(p: Any) -> Any:
      out = per_example_loss_fn(p, *args, **kwargs)
      return out[0] if has_aux else out  # the aux (BatchNorm updates) is not kept

    values, vjp = jax.vjp(losses, params)
    _check_noise_mask(noise_mask, values)
    weight = jnp.asarray(1.0 / values.shape[0], values.dtype)
    (clean,) = vjp(jnp.where(noise_mask, 0.0, weight).astype(values.dtype))
    (noisy,) = vjp(jnp.where(noise_mask, weight, 0.0).astype(values.dtype))
    return clean, noisy

  return split


def clean_noisy_decomposition(
  per_example_loss_fn: Callable[..., Any],
  perturbation: optax.GradientTransformation,
  *,
  alpha: float = 0.5,
  has_aux: bool = False,
) -> Callable[..., dict[str, jax.Array]]:
  r"""Builds the clean/noisy gradient decomposition of one probe batch.

  See the module docstring for :math:`c, n, c', n'` and the kinds of
  coordinate (:func:`clean_noisy_grads` and :func:`coordinate_kinds` give
  them coordinate by coordinate). With :math:`G_X` SANER's groups between :math:`g^{SAM}` and
  :math:`g` (:func:`saner_jax.group_mask`), the returned dict holds:

  - ``frac_{kind}``: the share of all coordinates of each kind;
  - ``p_{X}_{kind}``: :math:`P(i \in G_X \mid i \text{ of that kind})`;
  - ``amp_clean`` and ``amp_noisy``: the medians of :math:`|c'_i| / |c_i|` and
    :math:`|n'_i| / |n_i|` over the noisy-dominated coordinates (the paper's
    claim: the clean one is the larger);
  - ``noisy_weight_{sgd,sam,saner}``: the noisy part's weight in the update
    :math:`d`, :math:`\langle d, n \rangle / \langle g, n \rangle`, relative
    to SGD (whose value is 1 by definition), with :math:`d = g^{SAM}` for
    SAM and SANER's :math:`d` (group B scaled by ``alpha``);
    ``clean_weight_{sam,saner}`` the same with :math:`c`.

  A quantity that needs both kinds of sample is NaN when the batch has no
  noisy or no clean example (the kinds are then empty by construction), as
  is a conditional probability or median over an empty kind: there is
  nothing to measure, and a NaN cannot be mistaken for a measurement.

  Cost: two forward passes and four backward passes (one forward and two
  cotangents at :math:`w` and at :math:`w + \epsilon`), only when called.

  Args:
    per_example_loss_fn: ``fn(params, *args, **kwargs)`` returning the
      ``[N]`` per-example losses, or ``(losses, aux)`` with ``has_aux``
      (``aux`` is ignored: BatchNorm updates are not kept).
    perturbation: the transform that forms :math:`\epsilon` from :math:`g`,
      e.g. :func:`saner_jax.sam`; its state is read, not advanced.
    alpha: SANER's factor for ``noisy_weight_saner``, in [0, 1].
    has_aux: whether the loss returns ``(losses, aux)``.

  Returns:
    ``fn(params, perturbation_state, noise_mask, *args, **kwargs)`` returning
    a dict of scalars; ``noise_mask`` is a boolean ``[N]`` array. Jit-able.

  Examples:
    Two examples of a linear model; the second is noisy and dominates the
    second coordinate:

    >>> import jax.numpy as jnp
    >>> from saner_jax import analysis, sam
    >>> def losses(w, x, y):
    ...   return 0.5 * (x @ w - y) ** 2
    >>> x, y = jnp.array([[1.0, 0.1], [0.1, 1.0]]), jnp.array([1.0, -2.0])
    >>> w = jnp.zeros(2)
    >>> fn = analysis.clean_noisy_decomposition(losses, sam(0.05))
    >>> out = fn(w, sam(0.05).init(w), jnp.array([False, True]), x, y)
    >>> print(out["frac_noisy_dom"], out["frac_clean_dom"])
    0.5 0.5

  References:
    Luong, Nguyen, Tran and Tran, `Understanding SAM's Robustness to Noisy Labels through Gradient
    Down-weighting <https://arxiv.org/abs/2411.17132>`__, AISTATS 2026 (Section 3)
  """
  _validation.check_scalar_range("alpha", alpha, 0.0, 1.0)

  split = clean_noisy_grads(per_example_loss_fn, has_aux=has_aux)

  def decomposition(
    params: Any, perturbation_state: Any, noise_mask: jax.Array, *args: Any, **kwargs: Any
  ) -> dict[str, jax.Array]:
    clean, noisy = split(params, noise_mask, *args, **kwargs)
    g = jax.tree.map(jnp.add, clean, noisy)
    eps, _ = perturbation.update(g, perturbation_state, params)
    clean_p, noisy_p = split(optax.apply_updates(params, eps), noise_mask, *args, **kwargs)
    g_sam = jax.tree.map(jnp.add, clean_p, noisy_p)
    c, n, c_p, n_p, g_flat, s_flat = map(_flat, (clean, noisy, clean_p, noisy_p, g, g_sam))
    return _summary(c, n, c_p, n_p, g_flat, s_flat, noise_mask, alpha)

  return decomposition


def _summary(
  c: jax.Array,
  n: jax.Array,
  c_p: jax.Array,
  n_p: jax.Array,
  g: jax.Array,
  g_sam: jax.Array,
  noise_mask: jax.Array,
  alpha: float,
) -> dict[str, jax.Array]:
  nan = jnp.asarray(jnp.nan, g.dtype)
  has_noisy, has_clean = jnp.any(noise_mask), jnp.any(~noise_mask)
  both = has_noisy & has_clean
  kinds = _kind_masks(c, n)
  groups = {x: group_mask(g_sam, g, x) for x in ("A", "B", "C")}
  out: dict[str, jax.Array] = {}
  for kind, in_kind in kinds.items():
    count = jnp.sum(in_kind)
    out[f"frac_{kind}"] = jnp.where(both, count / g.size, nan)
    for x, in_group in groups.items():
      out[f"p_{x}_{kind}"] = jnp.where(both & (count > 0), jnp.sum(in_kind & in_group) / count, nan)
  noisy_dom = kinds["noisy_dom"]
  for name, after, before in (("amp_clean", c_p, c), ("amp_noisy", n_p, n)):
    ratio = jnp.abs(after) / jnp.where(noisy_dom, jnp.abs(before), 1.0)  # nonzero there: opposite strict signs
    out[name] = jnp.where(both, jnp.nanmedian(jnp.where(noisy_dom, ratio, nan)), nan)
  d_saner = jnp.where(groups["B"], alpha * g_sam, g_sam)
  for part, vector, present in (("noisy", n, has_noisy), ("clean", c, has_clean)):
    sgd = jnp.vdot(g, vector)
    names = {"sam": g_sam, "saner": d_saner} if part == "clean" else {"sgd": g, "sam": g_sam, "saner": d_saner}
    for name, d in names.items():
      out[f"{part}_weight_{name}"] = jnp.where(present, jnp.vdot(d, vector) / sgd, nan)
  return out


def _hvp_fn(
  loss_fn: Callable[..., Any], has_aux: bool, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[Any, Any], Any]:
  def scalar_loss(p: Any) -> Any:
    out = loss_fn(p, *args, **kwargs)
    return out[0] if has_aux else out

  grad = jax.grad(scalar_loss)
  return lambda params, v: jax.jvp(grad, (params,), (v,))[1]


def _traced(tree: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _normalised(tree: Any) -> Any:
  norm = optax.tree.norm(_validation.widened(tree))
  return jax.tree.map(lambda x: (x / norm).astype(x.dtype), tree)


def _power_step(hvp: Callable[[Any, Any], Any], params: Any, v: Any) -> tuple[jax.Array, Any]:
  """One power iteration: the Rayleigh quotient at ``v`` and the next (unit) vector."""
  hv = hvp(params, v)
  lam = optax.tree.vdot(_validation.widened(v), _validation.widened(hv))
  return lam, _normalised(hv)


def _hutchinson_sample(hvp: Callable[[Any, Any], Any], params: Any, key: jax.Array) -> jax.Array:
  """:math:`v^\top H v` for one Rademacher vector ``v`` drawn from ``key``."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  v = jax.tree.unflatten(treedef, [jax.random.rademacher(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
  product: jax.Array = optax.tree.vdot(_validation.widened(v), _validation.widened(hvp(params, v)))
  return product


_ARRAY = object()  # where an array leaf of the loss's arguments goes in their static part

# cache=True's compiled products, per loss function, held weakly: they go when the loss goes.
_CACHED: weakref.WeakKeyDictionary[Callable[..., Any], dict[Any, Callable[..., Any]]] = weakref.WeakKeyDictionary()


def _cached_kernel(
  kernel: Callable[..., Any], loss_fn: Callable[..., Any], has_aux: bool, static: Any
) -> Callable[[Any, Any, list[Any]], Any] | None:
  """The compiled product kept for ``loss_fn`` and ``static``, made on first use; None where it cannot be kept."""
  try:
    per_loss = _CACHED.setdefault(loss_fn, {})
    compiled = per_loss.get((kernel, has_aux, static))
  except Exception:  # a loss without weak references, or a static part that cannot be hashed or compared
    return None
  if compiled is None:
    loss_ref, (treedef, rest) = weakref.ref(loss_fn), static  # no strong reference: the entry must not keep the loss

    def hessian_product(params: Any, x: Any, arrays: list[Any]) -> Any:
      leaves = iter(arrays)
      args, kwargs = jax.tree.unflatten(treedef, [next(leaves) if r is _ARRAY else r[1] for r in rest])
      loss = loss_ref()
      if loss is None:  # traced only from a call that holds the loss; a bug if not
        raise ReferenceError("the loss of a cached Hessian-vector product was collected")
      return kernel(_hvp_fn(loss, has_aux, args, kwargs), params, x)

    compiled = per_loss[(kernel, has_aux, static)] = jax.jit(hessian_product)
  return compiled


def _eager_kernel(
  kernel: Callable[..., Any],
  loss_fn: Callable[..., Any],
  has_aux: bool,
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
  cache: bool,
) -> Callable[[Any, Any], Any]:
  """``kernel(hvp, params, x)`` compiled, as ``(params, x) -> ...``.

  Without ``cache``, compiled for this call, the loss's arguments constants
  in it. With it, the loss's array arguments (numpy scalars included) are
  arguments of the compiled function, which is kept for the same loss object
  and the same other arguments (compared with their types, so that ``True``
  and ``1`` differ); where that cannot be kept, as without ``cache``.
  """
  if cache:
    leaves, treedef = jax.tree.flatten((args, kwargs))
    is_array = [isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves]
    rest = tuple(_ARRAY if a else (type(x), x) for x, a in zip(leaves, is_array))
    compiled = _cached_kernel(kernel, loss_fn, has_aux, (treedef, rest))
    if compiled is not None:
      arrays = [jnp.asarray(x) for x, a in zip(leaves, is_array) if a]  # on the device once, not at every product
      return lambda params, x: compiled(params, x, arrays)
  return jax.jit(functools.partial(kernel, _hvp_fn(loss_fn, has_aux, args, kwargs)))


@jax.jit
def _random_unit_vector(key: jax.Array, params: Any) -> Any:
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return _normalised(
    jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
  )


def hessian_top_eigenvalue(
  loss_fn: Callable[..., Any],
  params: Any,
  *args: Any,
  key: jax.Array,
  has_aux: bool = False,
  max_iterations: int = 100,
  tol: float = 1e-3,
  cache: bool = False,
  **kwargs: Any,
) -> jax.Array:
  r"""The Hessian's eigenvalue of largest magnitude, by power iteration.

  .. math::
     v_0 \sim \mathcal N(0, I)/\lVert\cdot\rVert, \quad
     \lambda_k = \langle v_k, H v_k \rangle, \quad
     v_{k+1} = H v_k / \lVert H v_k \rVert,

  stopping when :math:`|\lambda_k - \lambda_{k-1}| < \mathrm{tol}\,
  (|\lambda_{k-1}| + 10^{-6})` (PyHessian's rule) or after
  ``max_iterations`` Hessian-vector products. Near a minimum the Hessian's
  largest-magnitude eigenvalue is its top one, :math:`\lambda_{\max}`, the
  usual sharpness measure; far from one it may be a negative eigenvalue, as
  in PyHessian. Inner products are in at least float32.

  Under ``jit`` the iteration is a ``lax.while_loop``. Called outside
  ``jit``, it is a Python loop over one compiled step, with the same
  arithmetic: XLA's CPU backend runs the convolutions of a while loop's body
  as much slower generic kernels (a ResNet-8 product on 256 images took 75 s
  in the loop against 2.8 s compiled alone on a 2-core CPU), so call it
  eagerly on a CPU. Each such call compiles its step anew, unless
  ``cache`` keeps it (see below).

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)``, a scalar, or ``(scalar,
      aux)`` with ``has_aux`` (BatchNorm statistics in ``args``; ``aux`` is
      dropped). In train mode BatchNorm normalises with batch statistics.
    params: the point the Hessian is taken at, any pytree.
    *args: the loss's other arguments (batch, model state).
    key: PRNG key of the starting vector.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    max_iterations: the most Hessian-vector products, >= 1.
    tol: the relative change that stops the iteration, >= 0.
    cache: outside ``jit``, keep the compiled step for later calls with
      the same ``loss_fn`` object (held weakly) and the same non-array
      arguments, so that a measurement every few epochs compiles once. The
      loss must then be a pure function of its arguments (what it closes
      over is read when it is first compiled), and its array arguments are
      traced, so it may not use their values in Python. Pass what changes
      between calls (the batch, BatchNorm statistics) as arrays in ``args``.
    **kwargs: the loss's keyword arguments.

  Returns:
    A scalar. Jit-able (with ``max_iterations`` static).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from saner_jax import analysis
    >>> loss = lambda w: 0.5 * (3.0 * w[0] ** 2 + w[1] ** 2)  # H = diag(3, 1)
    >>> lam = analysis.hessian_top_eigenvalue(loss, jnp.ones(2), key=jax.random.key(0), tol=0.0)
    >>> print(round(float(lam), 4))
    3.0

  References:
    Yao, Gholami, Keutzer and Mahoney, `PyHessian: Neural Networks Through the Lens of the Hessian
    <https://arxiv.org/abs/1912.07145>`__, IEEE BigData 2020
  """
  if max_iterations < 1:
    raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
  _validation.check_scalar_range("tol", tol, 0.0)
  leaves = jax.tree.leaves(params)
  wide = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)

  def changing(lam: jax.Array, previous: jax.Array) -> jax.Array:
    return jnp.abs(lam - previous) >= tol * (jnp.abs(previous) + 1e-6)

  v, lam, previous = _random_unit_vector(key, params), jnp.zeros([], wide), jnp.zeros([], wide)
  if not _traced((params, args, kwargs)):
    if all(isinstance(x, jax.Array) for x in leaves):  # placed like the steps' outputs: one compilation
      v = jax.device_put(v, jax.tree.map(lambda x: x.sharding, params))
    step = _eager_kernel(_power_step, loss_fn, has_aux, args, kwargs, cache)
    for i in range(max_iterations):
      if i >= 2 and not changing(lam, previous):
        break
      previous = lam
      lam, v = step(params, v)
    return lam
  hvp = _hvp_fn(loss_fn, has_aux, args, kwargs)

  def cond(state: tuple[Any, ...]) -> jax.Array:
    i, _, lam, previous = state
    going: jax.Array = (i < max_iterations) & ((i < 2) | changing(lam, previous))
    return going

  def body(state: tuple[Any, ...]) -> tuple[Any, ...]:
    i, v, lam, _ = state
    new_lam, new_v = _power_step(hvp, params, v)
    return i + 1, new_v, new_lam, lam

  _, _, lam, _ = jax.lax.while_loop(cond, body, (jnp.zeros([], jnp.int32), v, lam, previous))
  return lam


def hessian_trace(
  loss_fn: Callable[..., Any],
  params: Any,
  *args: Any,
  key: jax.Array,
  has_aux: bool = False,
  num_samples: int = 100,
  cache: bool = False,
  **kwargs: Any,
) -> jax.Array:
  r"""Hutchinson's estimate of the Hessian's trace.

  .. math::
     \operatorname{tr} H \approx \frac1m \sum_{k=1}^m v_k^\top H v_k,
     \qquad v_k \text{ with i.i.d. Rademacher } (\pm 1) \text{ entries},

  unbiased, with variance :math:`2 \sum_{i \ne j} H_{ij}^2 / m` (PyHessian's
  ``trace``). The products run one after another, holding one vector in memory: under ``jit`` as a ``lax.map``, outside it
  as a Python loop over one compiled product (much faster for convolutions
  on a CPU; see :func:`hessian_top_eigenvalue`).

  Args:
    loss_fn: as for :func:`hessian_top_eigenvalue`.
    params: the point, any pytree.
    *args: the loss's other arguments.
    key: PRNG key of the probe vectors.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    num_samples: ``m``, >= 1.
    cache: as for :func:`hessian_top_eigenvalue`.
    **kwargs: the loss's keyword arguments.

  Returns:
    A scalar in at least float32. Jit-able (with ``num_samples`` static).

  Examples:
    A diagonal Hessian gives its trace exactly, whatever the signs:

    >>> import jax, jax.numpy as jnp
    >>> from saner_jax import analysis
    >>> loss = lambda w: 0.5 * (3.0 * w[0] ** 2 + w[1] ** 2)
    >>> print(analysis.hessian_trace(loss, jnp.ones(2), key=jax.random.key(0), num_samples=3))
    4.0

  References:
    Hutchinson, "A Stochastic Estimator of the Trace of the Influence Matrix for Laplacian
    Smoothing Splines", Communications in Statistics - Simulation and Computation, 1990

    Yao, Gholami, Keutzer and Mahoney, `PyHessian: Neural Networks Through the Lens of the Hessian
    <https://arxiv.org/abs/1912.07145>`__, IEEE BigData 2020
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  sample_keys = jax.random.split(key, num_samples)
  if not _traced((params, args, kwargs)):
    sample = _eager_kernel(_hutchinson_sample, loss_fn, has_aux, args, kwargs, cache)
    return jnp.mean(jnp.stack([sample(params, k) for k in sample_keys]))
  hvp = _hvp_fn(loss_fn, has_aux, args, kwargs)
  return jnp.mean(jax.lax.map(lambda k: _hutchinson_sample(hvp, params, k), sample_keys))
