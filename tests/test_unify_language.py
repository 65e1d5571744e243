"""The language path end to end: a tiny transformers LLaMA decoder on a synthetic multi-domain token task.

Domains are arithmetic token streams: in domain d every sequence starts at a random token and steps by
``STEPS[d]`` modulo the vocabulary, so a domain is learnable only from its own data. Three client domains; the
public pool mixes them with two distractor domains. The flow is the digits harness's: a seed decoder pre-trained
on the public pool (next-token loss), per client embeddings, relevance, DPP proxies, a proxy-aligned LoRA expert
and a package; the server validates the packages, builds the LoRA-expert MoE with context routing and trains the
routers on the union of the proxies. Checked: what DPP picks, that each expert learned its own domain, that the
unified model is better on average than any single expert and than its prototype-initialised (untrained) router.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from metamoe.models import create_seed_model
from metamoe.selection import relevance_scores, select_dpp, select_random
from metamoe.unify import (
    build_unified_model,
    embed,
    expert_from_package,
    proxy_training_set,
    train_expert,
    train_router,
    validate_packages,
    write_expert_package,
)

V, L = 32, 10
STEPS = {"c1": 1, "c2": 3, "c3": 5, "d1": 7, "d2": 11}
CLIENTS = ["c1", "c2", "c3"]
CFG = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=16,
)


def domain_seqs(step, n, rng):
    start = rng.integers(0, V, n)
    return ((start[:, None] + step * np.arange(L)[None, :]) % V).astype(np.int64)


def lm_loss(model, x):
    """Mean next-token cross-entropy (float64) of a model with .prepare / forward -> (n, L, V) logits."""
    with torch.no_grad():
        b = model.prepare(torch.from_numpy(x))
        logits = model(b).double()[:, :-1]
        return float(
            torch.nn.functional.cross_entropy(logits.reshape(-1, V), b["input_ids"][:, 1:].reshape(-1))
        )


def pretrain(seed_model, x, epochs, lr=3e-3, bs=32, seed=0):
    params = list(seed_model.net.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x)
    seed_model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), bs):
            b = seed_model.prepare(xt[perm[s : s + bs]])
            logits = seed_model(b)[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), b["input_ids"][:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    seed_model.eval()
    for p in params:
        p.requires_grad_(False)


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lang")
    rng = np.random.default_rng(0)
    pub_parts = [domain_seqs(STEPS[d], 60, rng) for d in STEPS]
    pub = np.concatenate(pub_parts)
    pub_dom = np.repeat(np.arange(len(STEPS)), 60)
    priv = {c: domain_seqs(STEPS[c], 40, rng) for c in CLIENTS}
    test = {c: domain_seqs(STEPS[c], 40, rng) for c in CLIENTS}
    seed = create_seed_model("hf:llama", seed=0, **CFG)
    pretrain(
        seed, pub, epochs=30
    )  # the seed has seen every domain of the pool (loss ~0.3 nats on the clients')
    pub_emb = embed(seed, pub, progress=False)
    paths, sels = [], {}
    for i, c in enumerate(CLIENTS):
        rel = relevance_scores(
            embed(seed, priv[c], progress=False), pub_emb, epochs=20, seed=i, progress=False
        )
        sel = select_dpp(pub_emb, 20, rel, kernel="rbf", progress=False)
        sels[c] = sel.indices
        ex = train_expert(
            seed, priv[c], pub[sel.indices], lora_rank=4, epochs=100, lr=2e-2, batch_size=16, seed=i
        )
        paths.append(write_expert_package(out / c, ex, proxy_indices=sel, public_pool_size=len(pub)))
    pkgs = validate_packages(paths, seed_model=seed, public_pool_size=len(pub))
    untrained = build_unified_model(seed, pkgs, top_k=2)  # routers from the prototypes only
    model = build_unified_model(seed, pkgs, top_k=2)
    x, y, idx = proxy_training_set(pkgs, pub, None, model.label_space)
    r = train_router(model, x, y, epochs=40, lr=5e-2, batch_size=16, seed=0)
    return dict(
        seed=seed,
        pkgs=pkgs,
        model=model,
        untrained=untrained,
        pub=pub,
        pub_dom=pub_dom,
        sels=sels,
        test=test,
        router=r,
        idx=idx,
    )


def test_dpp_proxies_come_from_the_clients_domain(flow):
    own = [np.mean(flow["pub_dom"][flow["sels"][c]] == i) for i, c in enumerate(CLIENTS)]
    rnd = [
        np.mean(flow["pub_dom"][select_random(len(flow["pub"]), 20, seed=i).indices] == i) for i in range(3)
    ]
    # 5 equal domains in the pool: random proxies are ~20 % own-domain
    assert np.mean(own) > 0.3 and np.mean(own) > np.mean(rnd) + 0.1, (own, rnd)


def test_packages_are_vocabulary_experts(flow):
    for p in flow["pkgs"]:
        assert p.label_space is None or p.label_space.get("kind", "vocabulary") != "classes"
        assert len(p.proxy_indices) == 20 and p.proxy_indices.max() < len(flow["pub"])
    assert flow["model"].label_space.kind == "vocabulary"
    assert len(flow["idx"]) == len(np.unique(np.concatenate(list(flow["sels"].values()))))
    assert all(math.isfinite(v) for v in flow["router"]["loss_per_epoch"])


def test_each_expert_learned_its_domain(flow):
    seed = flow["seed"]
    for i, c in enumerate(CLIENTS):
        e = expert_from_package(seed, flow["pkgs"][i])
        own = lm_loss(e, flow["test"][c])
        others = [lm_loss(e, flow["test"][o]) for o in CLIENTS if o != c]
        assert own < 0.8 * lm_loss(seed, flow["test"][c]), c
        assert own < min(others), (c, own, others)


def test_unified_beats_single_experts_and_router_training_helps(flow):
    # NOT asserted, because it does not hold here: that the unified model beats the seed on every client domain.
    # The seed was pre-trained on the whole pool (client domains included) and already predicts them well
    # (~0.3 nats); the trained routers stay close to uniform over the experts (measured: 0.26-0.41 of the
    # tokens per expert in every domain), so the unified model is a blend of experts that each forgot the other
    # domains (~1.0-1.4 nats there) and lands at 0.24-0.39 nats: better than any one expert, not better than
    # the seed on every domain. See README ("MetaMoE on the bundled digits", language path).
    seed, model = flow["seed"], flow["model"]
    uni = np.mean([lm_loss(model, flow["test"][c]) for c in CLIENTS])
    before = np.mean([lm_loss(flow["untrained"], flow["test"][c]) for c in CLIENTS])
    single = [
        np.mean([lm_loss(expert_from_package(seed, p), flow["test"][c]) for c in CLIENTS])
        for p in flow["pkgs"]
    ]
    print("unified", uni, "untrained router", before, "single experts (avg over domains)", single)
    assert uni < min(single), (uni, single)
    assert uni < before, (uni, before)


def test_command_line_on_token_arrays(tmp_path, monkeypatch, capsys):
    """train-expert / unify / evaluate with an hf:llama checkpoint and .npy token ids (no labels: next token)."""
    import yaml

    from metamoe.models import save_seed_model
    from metamoe.unify import cli as ucli
    from metamoe.unify import evaluate_cli as evcli
    from metamoe.unify import train_expert_cli as tecli

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    save_seed_model(create_seed_model("hf:llama", seed=0, **CFG), "seed")
    np.save("pub.npy", np.concatenate([domain_seqs(STEPS[d], 30, rng) for d in STEPS]))
    sm = {"name": "hf:llama", "checkpoint": "seed"}
    for c in ("c1", "c2"):
        np.save(f"{c}.npy", domain_seqs(STEPS[c], 20, rng))
        Path(f"{c}.yaml").write_text(
            yaml.safe_dump(
                {
                    "seed_model": sm,
                    "private": f"{c}.npy",
                    "public": "pub.npy",
                    "selection": {"k": 10},
                    "training": {"lora_rank": 2, "epochs": 3, "lr": 0.01, "batch_size": 16},
                    "output": f"pk/{c}",
                }
            )
        )
        assert tecli.main_train_expert(["--config", f"{c}.yaml", "--quiet"]) == 0, capsys.readouterr().err
    Path("s.yaml").write_text(
        yaml.safe_dump(
            {
                "seed_model": sm,
                "packages": ["pk/c1", "pk/c2"],
                "public": "pub.npy",
                "training": {"epochs": 2, "batch_size": 16},
                "output": "uni",
            }
        )
    )
    assert ucli.main_unify(["--config", "s.yaml", "--quiet"]) == 0, capsys.readouterr().err
    test = domain_seqs(STEPS["c1"], 20, rng)
    np.save("t.npy", test)
    capsys.readouterr()
    assert evcli.main_evaluate(["--model", "uni", "--data", "t.npy"]) == 0
    printed = float(capsys.readouterr().out.split("next-token loss")[1].split(",")[0])
    assert printed == pytest.approx(lm_loss(ucli.load_unified("uni"), test), abs=1e-4)
