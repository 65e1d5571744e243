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


def logdet(L, S):
    S = list(S)
    if not S:
        return 0.0
    sign, val = np.linalg.slogdet(L[np.ix_(S, S)])
    return val if sign > 0 else -np.inf
