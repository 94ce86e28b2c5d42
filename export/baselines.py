"""Classical collaborative-filtering baselines the two-stage recommender is measured against.

Every baseline follows the same small contract (:class:`Recommender`): ``fit`` takes a
users x items CSR matrix of interaction weights and ``score`` returns a dense float32 block
of scores for the requested users over *all* items. Masking already-seen items, top-k
selection and metric computation are deliberately left to the caller so that every model,
including the two-stage one, is evaluated by exactly the same code.

Implemented baselines:

* :class:`Popularity` -- item interaction counts, the non-personalised floor.
* :class:`ItemKNN` -- item-based neighbourhood model with shrunk cosine similarity
  (Sarwar et al., 2001; Deshpande & Karypis, 2004).
* :class:`EASE` -- closed-form linear item-item autoencoder (Steck, 2019).
* :class:`ALS` -- implicit-feedback matrix factorisation (Hu, Koren & Volinsky, 2008) via
  the ``implicit`` package.

:data:`GRIDS` holds the small validation grids the evaluation harness tunes over and
:func:`make` builds a baseline by name.

Importing this module is cheap on purpose: ``implicit`` (and its BLAS checks) is only
imported when an :class:`ALS` model is actually fitted.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.linalg
import scipy.sparse

__all__ = [
    "ALS",
    "EASE",
    "GRIDS",
    "ItemKNN",
    "Popularity",
    "Recommender",
    "make",
]


@runtime_checkable
class Recommender(Protocol):
    """The interface every baseline implements.

    Attributes:
        name: Stable identifier, also the key in :data:`GRIDS` and for :func:`make`.
    """

    name: str

    def fit(self, interactions: scipy.sparse.csr_matrix) -> Recommender:
        """Learns the model from a users x items matrix of interaction weights.

        Args:
            interactions: CSR matrix, rows are users and columns items; stored values are
                float32 weights where 1.0 means "interacted".

        Returns:
            The fitted model itself, so calls can be chained.
        """
        ...

    def score(self, users: np.ndarray) -> np.ndarray:
        """Scores every item for each of the given users.

        Args:
            users: 1-D integer array of row indices into the matrix given to ``fit``.

        Returns:
            A new, writable float32 array of shape ``[len(users), n_items]``; higher is
            better. Items the user has already seen are *not* masked.
        """
        ...


# --------------------------------------------------------------------------- helpers


def _as_interactions(
    interactions: scipy.sparse.spmatrix | scipy.sparse.sparray,
) -> scipy.sparse.csr_matrix:
    """Validates the training matrix and returns it as a canonical float32 CSR matrix."""
    if not scipy.sparse.issparse(interactions):
        raise TypeError(f"interactions must be a scipy.sparse matrix (users x items), got {type(interactions).__name__}")
    if interactions.ndim != 2:
        raise ValueError(f"interactions must be 2-D, got shape {interactions.shape}")
    # csr_matrix (not csr_array) keeps `@` / indexing semantics identical across scipy versions.
    matrix = scipy.sparse.csr_matrix(interactions, dtype=np.float32)
    # Duplicate (user, item) entries would otherwise be counted separately by some
    # kernels and summed by others; summing once here makes all baselines agree.
    matrix.sum_duplicates()
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"interactions must have at least one user and one item, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix.data)):
        raise ValueError("interactions contain NaN or infinite values")
    return matrix


def _as_users(users: np.ndarray, n_users: int) -> np.ndarray:
    """Validates a batch of user indices against the number of users seen in ``fit``."""
    users = np.asarray(users)
    if users.ndim != 1:
        raise ValueError(f"users must be a 1-D array of row indices, got shape {users.shape}")
    if users.size and not np.issubdtype(users.dtype, np.integer):
        raise TypeError(f"users must be integer row indices, got dtype {users.dtype}")
    users = users.astype(np.int64, copy=False)
    if users.size and (users.min() < 0 or users.max() >= n_users):
        raise IndexError(f"user indices must lie in [0, {n_users}), got range [{users.min()}, {users.max()}]")
    return users


def _not_fitted(name: str) -> RuntimeError:
    return RuntimeError(f"{name}: call fit() before score()")


# --------------------------------------------------------------------------- baselines


class Popularity:
    """Recommends the most interacted-with items to everyone.

    The standard non-personalised reference point: any personalised model that cannot beat
    it on a time-based split is not learning anything useful (Cremonesi, Koren & Turrin,
    "Performance of Recommender Algorithms on Top-N Recommendation Tasks", RecSys 2010).

    Attributes:
        name: ``"popularity"``.
        counts: After ``fit``, float32 ``[n_items]`` sum of interaction weights per item.
    """

    name: str = "popularity"

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None
        self._n_users = 0

    def fit(self, interactions: scipy.sparse.csr_matrix) -> Popularity:
        """Sums the interaction weights of every item.

        Args:
            interactions: users x items CSR matrix of interaction weights.

        Returns:
            ``self``.
        """
        matrix = _as_interactions(interactions)
        self._n_users = matrix.shape[0]
        self.counts = np.asarray(matrix.sum(axis=0), dtype=np.float32).ravel()
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        """Returns the popularity vector once per requested user.

        Args:
            users: 1-D integer array of user row indices.

        Returns:
            float32 ``[len(users), n_items]``; every row is identical.
        """
        if self.counts is None:
            raise _not_fitted(self.name)
        users = _as_users(users, self._n_users)
        # np.tile rather than broadcast_to: the caller masks seen items in place, which a
        # read-only broadcast view would not allow (and would corrupt across rows).
        return np.tile(self.counts, (users.size, 1))


class ItemKNN:
    """Item-based k-nearest-neighbour collaborative filtering.

    Item-item similarity is cosine similarity between item columns with a shrinkage term
    in the denominator, ``sim(a, b) = <x_a, x_b> / (|x_a| |x_b| + shrink)``, which pulls the
    similarity of items with little co-occurrence evidence towards zero. For each target
    item only its ``neighbours`` most similar items are kept (column-wise pruning), and a
    user's score for item ``j`` is the sum of the similarities between ``j`` and the items
    the user interacted with (weighted by the interaction values): ``score = x_u @ S``.

    References:
        Sarwar, Karypis, Konstan & Riedl, "Item-Based Collaborative Filtering
        Recommendation Algorithms", WWW 2001.
        Deshpande & Karypis, "Item-Based Top-N Recommendation Algorithms", ACM TOIS 22(1),
        2004.

    Attributes:
        name: ``"item_knn"``.
        neighbours: Number of neighbours kept per target item.
        shrink: Shrinkage added to the cosine denominator.
        similarity: After ``fit``, CSR float32 ``[n_items, n_items]``; column ``j`` holds
            the (at most ``neighbours``) positive similarities of item ``j``'s neighbours.
            The diagonal is zero so an item never recommends itself.
    """

    name: str = "item_knn"

    # Upper bound on the dense similarity block materialised at once (entries, float64),
    # ~256 MiB; keeps memory flat when the catalogue grows beyond MovieLens 100K.
    _BLOCK_ENTRIES: int = 1 << 25

    def __init__(self, neighbours: int = 100, shrink: float = 10.0) -> None:
        """Configures the model.

        Args:
            neighbours: How many most-similar items to keep per item; must be >= 1.
            shrink: Non-negative shrinkage term added to the cosine denominator.

        Raises:
            ValueError: If a parameter is out of range.
        """
        if int(neighbours) != neighbours or neighbours < 1:
            raise ValueError(f"neighbours must be a positive integer, got {neighbours!r}")
        if not np.isfinite(shrink) or shrink < 0:
            raise ValueError(f"shrink must be a finite non-negative number, got {shrink!r}")
        self.neighbours = int(neighbours)
        self.shrink = float(shrink)
        self.similarity: scipy.sparse.csr_matrix | None = None
        self._train: scipy.sparse.csr_matrix | None = None

    def fit(self, interactions: scipy.sparse.csr_matrix) -> ItemKNN:
        """Computes the pruned item-item similarity matrix.

        Args:
            interactions: users x items CSR matrix of interaction weights.

        Returns:
            ``self``.
        """
        matrix = _as_interactions(interactions)
        n_items = matrix.shape[1]
        # float64 for the similarity arithmetic: co-occurrence dot products of popular
        # items get large and the shrunk ratio should not depend on float32 rounding.
        item_user = matrix.T.tocsr().astype(np.float64)
        user_item = matrix.tocsc().astype(np.float64)
        norms = np.sqrt(np.asarray(user_item.multiply(user_item).sum(axis=0)).ravel())

        k = min(self.neighbours, n_items - 1)
        block = max(1, self._BLOCK_ENTRIES // n_items)
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        for start in range(0, n_items, block):
            stop = min(start + block, n_items)
            width = stop - start
            # Raw co-occurrence between every item (rows) and this block's items (columns).
            dots = (item_user @ user_item[:, start:stop]).toarray()
            denom = np.outer(norms, norms[start:stop]) + self.shrink
            sim = np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)
            sim[np.arange(start, stop), np.arange(width)] = 0.0
            if k <= 0:
                continue
            if k < n_items:
                top = np.argpartition(-sim, k - 1, axis=0)[:k]
            else:
                top = np.broadcast_to(np.arange(n_items)[:, None], (n_items, width))
            top_vals = np.take_along_axis(sim, top, axis=0)
            # Non-positive similarities carry no evidence (and are plain zeros for
            # non-negative data), so storing them would only densify S.
            keep = top_vals > 0
            rows.append(top[keep])
            cols.append(np.broadcast_to(np.arange(start, stop)[None, :], top.shape)[keep])
            vals.append(top_vals[keep])

        if rows:
            data = np.concatenate(vals).astype(np.float32)
            coo = scipy.sparse.coo_matrix((data, (np.concatenate(rows), np.concatenate(cols))), shape=(n_items, n_items))
            self.similarity = coo.tocsr()
        else:
            self.similarity = scipy.sparse.csr_matrix((n_items, n_items), dtype=np.float32)
        self._train = matrix
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        """Scores all items as similarity-weighted sums over each user's history.

        Args:
            users: 1-D integer array of user row indices.

        Returns:
            float32 ``[len(users), n_items]``.
        """
        if self.similarity is None or self._train is None:
            raise _not_fitted(self.name)
        users = _as_users(users, self._train.shape[0])
        scores = (self._train[users] @ self.similarity).toarray()
        return np.ascontiguousarray(scores, dtype=np.float32)


class EASE:
    """Embarrassingly Shallow Autoencoder: a closed-form item-item linear model.

    Solves ``min_B |X - X B|_F^2 + lam |B|_F^2`` subject to ``diag(B) = 0``, whose solution
    is ``B = I - P diag(1 / diag(P))`` with ``P = (X^T X + lam I)^-1``. Scores are
    ``X_u B``. The Gram matrix and its inverse are dense ``n_items x n_items``, so the model
    is limited to catalogues of at most ``max_items`` items.

    References:
        Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019.

    Attributes:
        name: ``"ease"``.
        lam: L2 regularisation strength added to the diagonal of the Gram matrix.
        max_items: Largest catalogue ``fit`` accepts.
        weights: After ``fit``, dense float32 ``B`` of shape ``[n_items, n_items]`` with a
            zero diagonal.
    """

    name: str = "ease"

    def __init__(self, lam: float = 500.0, max_items: int = 30000) -> None:
        """Configures the model.

        Args:
            lam: Positive L2 regularisation strength.
            max_items: Refuse catalogues larger than this (the dense inverse needs
                ``8 * n_items**2`` bytes, ~7 GiB at 30 000 items).

        Raises:
            ValueError: If a parameter is out of range.
        """
        if not np.isfinite(lam) or lam <= 0:
            raise ValueError(f"lam must be a finite positive number, got {lam!r}")
        if int(max_items) != max_items or max_items < 1:
            raise ValueError(f"max_items must be a positive integer, got {max_items!r}")
        self.lam = float(lam)
        self.max_items = int(max_items)
        self.weights: np.ndarray | None = None
        self._train: scipy.sparse.csr_matrix | None = None

    def fit(self, interactions: scipy.sparse.csr_matrix) -> EASE:
        """Computes the closed-form weight matrix ``B``.

        Args:
            interactions: users x items CSR matrix of interaction weights.

        Returns:
            ``self``.

        Raises:
            ValueError: If the catalogue has more than ``max_items`` items.
            numpy.linalg.LinAlgError: If the regularised Gram matrix is numerically not
                positive definite (only possible with negative weights and a tiny ``lam``).
        """
        matrix = _as_interactions(interactions)
        n_items = matrix.shape[1]
        if n_items > self.max_items:
            raise ValueError(
                f"EASE needs a dense {n_items} x {n_items} inverse; n_items={n_items} exceeds "
                f"max_items={self.max_items}. Raise max_items if you have the memory "
                f"(~{8 * n_items**2 / 2**30:.1f} GiB per dense matrix) or prune the catalogue."
            )
        # float64 throughout the inversion: with lam small relative to the Gram diagonal
        # the system is ill-conditioned enough that float32 visibly perturbs B.
        x64 = matrix.astype(np.float64)
        gram = (x64.T @ x64).toarray()
        gram[np.diag_indices(n_items)] += self.lam
        precision = _spd_inverse(gram)
        weights = precision / (-np.diag(precision))[None, :]
        weights[np.diag_indices(n_items)] = 0.0
        self.weights = weights.astype(np.float32)
        self._train = matrix
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        """Reconstructs each user's row through ``B``.

        Args:
            users: 1-D integer array of user row indices.

        Returns:
            float32 ``[len(users), n_items]``.
        """
        if self.weights is None or self._train is None:
            raise _not_fitted(self.name)
        users = _as_users(users, self._train.shape[0])
        scores = self._train[users] @ self.weights
        return np.ascontiguousarray(scores, dtype=np.float32)


def _spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverts a symmetric positive-definite matrix via Cholesky (LAPACK potrf + potri).

    About a third of the flops of a general LU-based inverse, and the result is exactly
    symmetric. ``matrix`` is overwritten.
    """
    potrf, potri = scipy.linalg.get_lapack_funcs(("potrf", "potri"), (matrix,))
    factor, info = potrf(matrix, lower=False, overwrite_a=True, clean=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"Gram matrix is not positive definite (potrf info={info})")
    inverse, info = potri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"Cholesky inverse failed (potri info={info})")
    # potri fills only the upper triangle; mirror it.
    upper = np.triu(inverse)
    return upper + np.triu(upper, 1).T


class ALS:
    """Implicit-feedback matrix factorisation by alternating least squares.

    Interaction weights ``r_ui`` become preferences ``p_ui = 1`` with confidence
    ``c_ui = 1 + alpha * r_ui`` (unobserved cells get ``p = 0, c = 1``), and user/item
    factors are fitted by weighted ridge regressions that alternate between the two sides.
    Delegates to ``implicit.cpu.als.AlternatingLeastSquares`` (conjugate-gradient solver,
    Takács, Pilászy & Tikk, RecSys 2011). The CPU class is used explicitly so that results
    do not change when a GPU build of ``implicit`` happens to be installed.

    Determinism: the initial factors come from ``numpy.random.default_rng(seed)`` and each
    half-step solves every row independently of the others, so fits are bit-for-bit
    repeatable and do not depend on ``num_threads`` (checked with 1, 2, 8 and 0 = all
    cores); single-threading is therefore not needed for determinism. OpenBLAS is pinned to one thread
    during ``fit``, which both matches ``implicit``'s own performance advice and silences
    the ``RuntimeWarning`` it would otherwise emit.

    References:
        Hu, Koren & Volinsky, "Collaborative Filtering for Implicit Feedback Datasets",
        ICDM 2008.

    Attributes:
        name: ``"als"``.
        user_factors: After ``fit``, float32 ``[n_users, factors]``.
        item_factors: After ``fit``, float32 ``[n_items, factors]``.
    """

    name: str = "als"

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        iterations: int = 15,
        alpha: float = 10.0,
        seed: int = 0,
        num_threads: int = 0,
    ) -> None:
        """Configures the model.

        Args:
            factors: Latent dimensionality; must be >= 1.
            regularization: Non-negative L2 penalty on the factors.
            iterations: Number of alternating sweeps; must be >= 1.
            alpha: Non-negative confidence scale; ``implicit`` multiplies the interaction
                weights by it before fitting (so ``c_ui - 1 = alpha * r_ui``).
            seed: Seed for the random factor initialisation.
            num_threads: Worker threads for ``implicit``'s solver; 0 means all cores.
                Every row is solved independently from the other side's (fixed) factors,
                so the result does not depend on this value (bit-identical for 1, 2, 8
                and 0 threads on MovieLens 100K).

        Raises:
            ValueError: If a parameter is out of range.
        """
        if int(factors) != factors or factors < 1:
            raise ValueError(f"factors must be a positive integer, got {factors!r}")
        if not np.isfinite(regularization) or regularization < 0:
            raise ValueError(f"regularization must be finite and non-negative, got {regularization!r}")
        if int(iterations) != iterations or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be finite and non-negative, got {alpha!r}")
        if int(num_threads) != num_threads or num_threads < 0:
            raise ValueError(f"num_threads must be a non-negative integer, got {num_threads!r}")
        self.factors = int(factors)
        self.regularization = float(regularization)
        self.iterations = int(iterations)
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.num_threads = int(num_threads)
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None

    def fit(self, interactions: scipy.sparse.csr_matrix) -> ALS:
        """Factorises the interaction matrix.

        Args:
            interactions: users x items CSR matrix of interaction weights.

        Returns:
            ``self``.
        """
        # Deferred: implicit pulls in its compiled extensions and probes BLAS on import.
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        matrix = _as_interactions(interactions)
        # The model must be *constructed* inside the limit too: implicit checks the BLAS
        # thread count in __init__ and warns once per process if it is above one.
        with threadpool_limits(limits=1, user_api="blas"):
            model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=self.alpha,
                iterations=self.iterations,
                dtype=np.float32,
                calculate_training_loss=False,
                num_threads=self.num_threads,
                random_state=self.seed,
            )
            # implicit >= 0.5 takes user x item rows and applies alpha itself.
            model.fit(matrix, show_progress=False)
        self.user_factors = np.ascontiguousarray(model.user_factors, dtype=np.float32)
        self.item_factors = np.ascontiguousarray(model.item_factors, dtype=np.float32)
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        """Dot products between the users' factors and every item's factors.

        Args:
            users: 1-D integer array of user row indices.

        Returns:
            float32 ``[len(users), n_items]``.
        """
        if self.user_factors is None or self.item_factors is None:
            raise _not_fitted(self.name)
        users = _as_users(users, self.user_factors.shape[0])
        return np.ascontiguousarray(self.user_factors[users] @ self.item_factors.T, dtype=np.float32)


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type] = {
    Popularity.name: Popularity,
    ItemKNN.name: ItemKNN,
    EASE.name: EASE,
    ALS.name: ALS,
}

# Validation grids for the harness. Kept small so that tuning every baseline on
# MovieLens 100K stays well under a minute on a laptop-class CPU.
GRIDS: dict[str, list[dict[str, Any]]] = {
    "popularity": [{}],
    "item_knn": [{"neighbours": k, "shrink": s} for k in (20, 50, 100, 200) for s in (0.0, 10.0, 50.0)],
    "ease": [{"lam": v} for v in (10, 50, 100, 200, 500, 1000, 2000, 5000)],
    "als": [{"factors": f, "regularization": r, "alpha": a} for f in (32, 64, 128) for r in (0.01, 0.1) for a in (1.0, 10.0, 40.0)],
}


def make(name: str, **params: Any) -> Recommender:
    """Builds an unfitted baseline by name.

    Args:
        name: One of ``"popularity"``, ``"item_knn"``, ``"ease"``, ``"als"``.
        **params: Constructor keyword arguments, e.g. one entry of :data:`GRIDS`.

    Returns:
        The configured, unfitted recommender.

    Raises:
        ValueError: If ``name`` is not a known baseline.
        TypeError: If ``params`` contains a keyword the baseline does not accept.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; expected one of {sorted(_REGISTRY)}") from None
    return cls(**params)
