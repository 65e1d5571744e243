"""Independent float64 NumPy references, written from the papers, shared by the tests."""

import numpy as np


def dpp_kernel(X, relevance=None, ridge=0.0):
    """L = diag(r) (Xn Xn^T + ridge I) diag(r) in float64."""
    X = np.asarray(X, dtype=np.float64)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    r = np.ones(len(X)) if relevance is None else np.asarray(relevance, dtype=np.float64)
    S = Xn @ Xn.T + ridge * np.eye(len(X))
    return r[:, None] * S * r[None, :]


def dpp_greedy_chen(L, k, eps=1e-12):
    """Fast greedy MAP of Chen, Zhang & Zhou (NeurIPS 2018), Algorithm 1, on an explicit kernel L.

    Returns (picks, residuals d_j^2 at pick time); argmax ties go to the lowest index.
    """
    L = np.asarray(L, dtype=np.float64)
    n = L.shape[0]
    cis = np.zeros((k, n))
    di2 = np.copy(np.diag(L))
    picks, resid = [], []
    avail = np.ones(n, dtype=bool)
    for t in range(k):
        cand = np.where(avail, di2, -np.inf)
        j = int(np.argmax(cand))  # first maximal index
        if not cand[j] > eps:
            break
        picks.append(j)
        resid.append(di2[j])
        dj = np.sqrt(di2[j])
        ei = (L[j, :] - cis[:t, j] @ cis[:t, :]) / dj
        cis[t, :] = ei
        di2 = di2 - ei * ei
        avail[j] = False
    return np.array(picks, dtype=np.int64), np.array(resid)


def dpp_greedy_features(X, relevance, k, ridge=0.0, eps=1e-12):
    """The same greedy MAP as :func:`dpp_greedy_chen` for the cosine kernel, without the N x N kernel: the
    factor's columns from feature space, q_t = (y_j - sum_s c_s q_s) / d_j with y_i = r_i xn_i and
    c_s = y_j . q_s (the ridge's coordinate of a pick is orthogonal to the earlier directions). Float64.

    Returns (picks, residuals d_j^2 at pick time); argmax ties go to the lowest index.
    """
    X = np.asarray(X, dtype=np.float64)
    r = np.asarray(relevance, dtype=np.float64)
    Y = X / np.linalg.norm(X, axis=1, keepdims=True) * r[:, None]
    d2 = r * r * (1.0 + ridge)
    Q = np.zeros((k, X.shape[1]))
    avail = np.ones(len(X), dtype=bool)
    picks, resid = [], []
    for t in range(k):
        cand = np.where(avail, d2, -np.inf)
        j = int(np.argmax(cand))  # first maximal index
        if not cand[j] > eps:
            break
        picks.append(j)
        resid.append(d2[j])
        c = Q[:t] @ Y[j]
        Q[t] = (Y[j] - c @ Q[:t]) / np.sqrt(d2[j])
        e = Y @ Q[t]
        d2 = d2 - e * e
        avail[j] = False
    return np.array(picks, dtype=np.int64), np.array(resid)


def logdet(L, S):
    S = list(S)
    if not S:
        return 0.0
    sign, val = np.linalg.slogdet(L[np.ix_(S, S)])
    return val if sign > 0 else -np.inf


def dpp_kernel_rbf(X, relevance=None, gamma=1.0, ridge=0.0):
    """L = diag(r) (K + ridge I) diag(r), K_ij = exp(-gamma ||xn_i - xn_j||^2) on L2-normalised rows, float64."""
    X = np.asarray(X, dtype=np.float64)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    sq = ((Xn[:, None, :] - Xn[None, :, :]) ** 2).sum(-1)
    r = np.ones(len(X)) if relevance is None else np.asarray(relevance, dtype=np.float64)
    K = np.exp(-gamma * sq) + ridge * np.eye(len(X))
    return r[:, None] * K * r[None, :]


def auc(scores_pos, scores_neg):
    """Area under the ROC curve (Mann-Whitney U, ties count 1/2), in float64."""
    pos = np.asarray(scores_pos, dtype=np.float64)
    neg = np.asarray(scores_neg, dtype=np.float64)
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):  # average ranks over ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return u / (len(pos) * len(neg))


def csr_to_dense(indptr, indices, similarities, n_cols):
    """A CSR graph (row i: entries indptr[i]:indptr[i+1]) as a dense float64 (M, N) matrix; missing = 0."""
    indptr = np.asarray(indptr)
    m = len(indptr) - 1
    S = np.zeros((m, n_cols))
    rows = np.repeat(np.arange(m), np.diff(indptr))
    S[rows, np.asarray(indices)] = np.asarray(similarities, dtype=np.float64)
    return S


def facility_location_value(S, picks, weights=None):
    """f(A) = sum_i w_i max(0, max_{j in A} S[i, j]) in float64 (0 for an empty A)."""
    S = np.asarray(S, dtype=np.float64)
    w = np.ones(S.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    picks = list(picks)
    if not picks:
        return 0.0
    return float((w * np.maximum(S[:, picks].max(axis=1), 0.0)).sum())


def facility_location_greedy_naive(S, k, weights=None):
    """Naive greedy for facility location on a dense (M ground x N candidates) similarity matrix S.

    Every step recomputes every candidate's marginal gain sum_i w_i max(0, S[i, j] - cur_i) and takes the
    argmax (ties to the lowest index). Returns (picks int64, gains float64, objective float64).
    """
    S = np.asarray(S, dtype=np.float64)
    m, n = S.shape
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    cur = np.zeros(m)
    avail = np.ones(n, dtype=bool)
    picks, gains = [], []
    for _ in range(k):
        g = (w[:, None] * np.maximum(S - cur[:, None], 0.0)).sum(axis=0)
        g[~avail] = -np.inf
        j = int(np.argmax(g))  # first maximal index
        picks.append(j)
        gains.append(g[j])
        avail[j] = False
        cur = np.maximum(cur, S[:, j])
    return np.array(picks, dtype=np.int64), np.array(gains), float((w * cur).sum())


def knn_brute_force(X, Q, k, metric="cosine"):
    """Exact float64 kNN: (sims (Nq, k), idx (Nq, k)), each row by decreasing similarity, ties to the lower index."""
    X = np.asarray(X, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    if metric == "cosine":
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
        Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    S = Q @ X.T
    if metric == "l2":
        S = -(((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    idx = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, idx, axis=1), idx
