"""Low-rank factorisations behind the LoRA tools (``networks/resize_lora.py``, ``networks/svd_merge_lora.py``,
``networks/extract_lora_from_models.py``), in numpy, following kohya's formulas.

kohya computes a full ``torch.linalg.svd`` of every module's delta weight and keeps the first singular
triplets. The same triplets are computed here without the full decomposition, because a full SVD of SDXL's
widest layers is many seconds per layer on a CPU:

* a delta that is a sum of LoRA products (``resize``, ``svd_merge``) is ``U_cat @ D_cat``; the SVD of the
  small core ``R_u @ R_d.T`` of the two QR factorisations gives the exact SVD of the product;
* a full-rank difference of two checkpoints (``extract``) is factorised through the eigenvectors of its
  smaller Gram matrix in float64, which holds the leading singular values to ~1e-8 of the largest one.

Where kohya's output contains singular vectors beyond the delta's rank (a rank larger than the delta has),
they are whatever orthonormal completion LAPACK returns; that case falls back to the full SVD, as kohya.
Singular vectors are defined up to sign: which sign LAPACK picks differs between builds (torch's and
numpy's agree on most vectors, not all), so kohya's files differ from these by the sign of some
``(lora_up column, lora_down row)`` pairs; the products, ranks and alphas are the same.
"""
import numpy as np

MIN_SV = 1e-6            # kohya resize_lora: a module whose largest singular value is below this gets rank 1
CLAMP_QUANTILE = 0.99    # kohya svd_merge_lora / extract_lora_from_models default
# Gram-matrix singular values are trusted down to this fraction of the largest; below it the module is
# decomposed by a full SVD instead (a difference of (nearly) lower rank than asked for).
_GRAM_RELIABLE = 1e-4


def flatten_weight(w):
    """A Linear (out, in) or conv (out, in, kh, kw) weight as the (out, in*kh*kw) matrix kohya decomposes."""
    w = np.asarray(w)
    return w.reshape(w.shape[0], -1)


def lora_factors_2d(up, down):
    """``lora_up`` / ``lora_down`` of a Linear or conv module as (out, rank) and (rank, in*kh*kw) matrices."""
    up, down = np.asarray(up), np.asarray(down)
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)


# ---------------------------------------------------------------------------
# decompositions


def product_svd(up2d, down2d):
    """Thin SVD ``(U, S, Vh)`` of ``up2d @ down2d`` (out x r) @ (r x n), from QR factors, in float64;
    ``len(S) == min(out, r, n)``."""
    qu, ru = np.linalg.qr(np.asarray(up2d, np.float64))
    qd, rd = np.linalg.qr(np.asarray(down2d, np.float64).T)
    u, s, vh = np.linalg.svd(ru @ rd.T)
    return qu @ u, s, vh @ qd.T


def full_svd(mat):
    """kohya's decomposition: LAPACK SVD of the float32 matrix (thin: the first min(out, n) vectors, which
    are the only ones kohya keeps)."""
    u, s, vh = np.linalg.svd(np.asarray(mat, np.float32), full_matrices=False)
    return u.astype(np.float64), s.astype(np.float64), vh.astype(np.float64)


def gram_top_svd(mat, k):
    """The first ``k`` singular triplets ``(U_k, S_k, Vh_k)`` of a full matrix, through the eigenvectors of its
    smaller Gram matrix (float64); a full SVD where the k-th singular value is too small for that."""
    a = np.asarray(mat, np.float64)
    m, n = a.shape
    k = min(k, m, n)
    tall = m >= n
    g = a.T @ a if tall else a @ a.T
    w, v = np.linalg.eigh(g)
    w, v = w[::-1][:k], v[:, ::-1][:, :k]
    s = np.sqrt(np.maximum(w, 0.0))
    if s[0] == 0.0 or s[-1] < _GRAM_RELIABLE * s[0]:
        u, s_all, vh = full_svd(a)
        return u[:, :k], s_all[:k], vh[:k]
    if tall:
        return (a @ v) / s, s, v.T
    return v, s, (v.T @ a) / s[:, None]


# ---------------------------------------------------------------------------
# kohya's rank rules (networks/resize_lora.py)


def index_sv_cumulative(s, target):
    cumulative = np.cumsum(s) / float(np.sum(s))
    index = int(np.searchsorted(cumulative, target)) + 1
    return max(1, min(index, len(s) - 1))


def index_sv_fro(s, target):
    squared = s ** 2
    cumulative = np.cumsum(squared) / float(np.sum(squared))
    index = int(np.searchsorted(cumulative, target ** 2)) + 1
    return max(1, min(index, len(s) - 1))


def index_sv_ratio(s, target):
    index = int(np.sum(s > s[0] / target))
    return max(1, min(index, len(s) - 1))


DYNAMIC_METHODS = {"sv_ratio": index_sv_ratio, "sv_cumulative": index_sv_cumulative, "sv_fro": index_sv_fro}


def scaled_alpha(scale, rank):
    """``float(scale * rank)``; a float32 scale (kohya's ``alpha tensor / old rank``) multiplies in float32, as
    torch does, so the alpha written to the metadata has kohya's digits."""
    if isinstance(scale, np.float32):
        return float(scale * np.float32(rank))
    return float(scale * rank)


def rank_resize(s, rank, dynamic_method=None, dynamic_param=None, scale=1.0):
    """kohya's ``rank_resize``: the new rank and alpha (``scale * new_rank``, scale = old alpha / old rank) of a
    module with singular values ``s`` (all ``min(out, n)`` of them, descending), and the retention stats."""
    s = np.asarray(s, np.float64)
    if dynamic_method:
        new_rank = DYNAMIC_METHODS[dynamic_method](s, dynamic_param) + 1
    else:
        new_rank = rank
    if s[0] <= MIN_SV:  # a zero matrix: rank 1
        new_rank = 1
    elif new_rank > rank:  # the dynamic rank is capped at --new_rank
        new_rank = rank
    squared = s ** 2
    total = float(np.sum(np.abs(s)))
    fro = float(np.sqrt(np.sum(squared)))
    return {
        "new_rank": int(new_rank),
        "new_alpha": scaled_alpha(scale, new_rank),
        "sum_retained": float(np.sum(np.abs(s[:new_rank]))) / total if total else float("nan"),
        "fro_retained": float(np.sqrt(np.sum(squared[:new_rank]))) / fro if fro else float("nan"),
        "max_ratio": float(s[0] / s[new_rank - 1]) if s[new_rank - 1] else float("inf"),
    }


# ---------------------------------------------------------------------------
# kohya's clamp (svd_merge_lora / extract_lora_from_models)


def clamp_factors(up2d, down2d, quantile=CLAMP_QUANTILE):
    """Clamp ``up`` (U*S) and ``down`` (Vh) to +-the ``quantile`` of their values taken together (float32, as
    kohya's ``torch.quantile`` with linear interpolation)."""
    up2d = np.asarray(up2d, np.float32)
    down2d = np.asarray(down2d, np.float32)
    dist = np.concatenate([up2d.reshape(-1), down2d.reshape(-1)])
    hi = np.float32(np.quantile(dist, quantile))
    lo = -hi
    return np.clip(up2d, lo, hi), np.clip(down2d, lo, hi)


def split_top(u, s, vh, k):
    """(lora_up = U_k * S_k, lora_down = Vh_k) as float32 matrices."""
    return (u[:, :k] * s[:k]).astype(np.float32), np.ascontiguousarray(vh[:k], np.float32)


def to_module_shapes(up2d, down2d, weight_shape):
    """Reshape the factors of a (out, in[, kh, kw]) module: conv modules get (out, r, 1, 1) / (r, in, kh, kw)."""
    r = down2d.shape[0]
    if len(weight_shape) == 4:
        return (np.ascontiguousarray(up2d).reshape(weight_shape[0], r, 1, 1),
                np.ascontiguousarray(down2d).reshape(r, *weight_shape[1:]))
    return np.ascontiguousarray(up2d), np.ascontiguousarray(down2d)
