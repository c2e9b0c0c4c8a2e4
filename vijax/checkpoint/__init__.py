"""Pickle-free checkpoints of fit results: ``res.save(path)`` (:mod:`.write`) and
``vj.load(path, model)`` (:mod:`.read`), in a zip container of ``.npy`` arrays
(:mod:`.archive`); configuration objects as tagged JSON (:mod:`.config`).

File format (``FORMAT_VERSION`` 3; format 2 held the stopping rule's state without its
gradient statistics, format 1 stored full-rank Cholesky off-diagonals in absolute units; both
are refused). One uncompressed zip archive, a valid ``.npz`` file (so
``numpy.load(path, allow_pickle=False)`` can inspect it), with these members:

- ``manifest.json``: UTF-8 JSON, described below.
- ``a0.npy``, ``a1.npy``, ...: one ``.npy`` array (written with ``allow_pickle=False``) per
  distinct array leaf of the result (a leaf shared by two fields, e.g. ``params`` and
  ``state.avg_params``, is stored once). Typed PRNG keys are stored as their key data
  (``jax.random.key_data``, uint32) and non-NumPy dtypes (bfloat16, ...) as unsigned ints of
  the same width.

The manifest holds:

- ``format`` (``"vijax-checkpoint"``), ``format_version``, ``vijax_version``, ``jax_version``,
  ``numpy_version``;
- ``latents``: ``[{"name", "shape", "support"}, ...]`` in declaration order (``support`` is
  the constraint's ``repr``), checked against the model given to :func:`load`;
- ``guide_spec``, ``estimator``, ``diagnostics``: tagged JSON (``{"class": "IAF", "fields":
  {...}}`` for the configuration classes of :mod:`vijax.guides` and :mod:`vijax.estimators`,
  ``{"tuple": [...]}``, ``{"list": [...]}``, ``{"dict": {...}}``; scalars and strings as is).
  A fit with local latents stores its ``LocalSpec``: ``row`` as ``{"row": tree}``, the data
  row's own nesting with one ``"dtype:d0,d1"`` string per leaf, and an encoder the user gave
  as ``{"user_encoder": description}`` (its weights are stored; the network itself is given
  again to :func:`load` through ``guide=``);
- ``optimizer``: ``{"kind": "default", "learning_rate": lr}`` (``vj.default_optimizer(lr)``),
  ``{"kind": "local_default", "global_learning_rate": lr, "has_params": bool}`` (the default
  of a local fit, ``vijax.optim.local_default_optimizer``) or ``{"kind": "custom"}``;
- ``members``: ``[{"name", "dtype", "shape"}, ...]``, the stored arrays in order;
- ``trees``: for each of ``params``, ``last_params``, ``opt_state``, ``state``,
  ``init_point``, ``losses``, ``loop_key``: ``null`` or the list of its leaves in
  ``jax.tree_util`` order, each ``{"path": keystr, "shape", "dtype", "member",
  "numpy": bool}`` (plus ``"key_impl"`` for PRNG keys). Tree structures are not stored: the
  loader rebuilds them from the guide, optimizer and estimator (``guide.init``,
  ``optimizer.init``, :func:`vijax.loop.init_state` with and without a stopping rule, under
  ``jax.eval_shape``: traced, not run) and requires the saved leaves to match one of them
  exactly (paths, shapes, dtypes). ``numpy`` marks leaves that were NumPy arrays (``losses``);
  the others come back as JAX arrays;
- ``sha256``: hex SHA-256 of the canonical JSON of the manifest without this entry
  (``json.dumps(sort_keys=True, separators=(",", ":"))``) followed, for every member in
  order, by the line ``"{name} {dtype.str} {shape}\\n"`` and the array's C-order bytes.

Nothing is ever unpickled: arrays are read with ``allow_pickle=False`` and a file whose
members would need pickle (object arrays, anything other than ``.npy`` arrays and the
manifest) is refused.

Nothing is read unchecked either: the file must hold the zip archive alone (members back to
back from byte 0, then the central directory and end records; no bytes before, between or
after them, which the digest would not cover); every member must be stored uncompressed and
no larger (zip header ``file_size``) than the manifest's shape and dtype allow (plus a
``.npy`` header), and is read with a bounded read; the manifest itself is capped at 64 MiB.
Manifests that no fit can produce are refused even with a valid digest: negative or
inconsistent counts (``n_nonfinite_skipped > n_steps``, ``max_steps < n_steps``, a losses
length or loop-state step other than ``n_steps``), numbers that are not numbers, a learning
rate that is not positive and finite, member shapes that are not lists of non-negative ints.
"""
