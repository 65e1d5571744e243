"""The compared methods: names, shared experts, BTM, evaluation helpers, every method on a tiny run."""

import numpy as np
import pytest
import torch

from metamoe.unify.baselines import (
    METHOD_NAMES,
    PRIVACY_NOTE,
    check_methods,
    expert_set_key,
    method_spec,
)
from metamoe.unify.evaluate import ExpertEnsemble, accuracy, exact_accuracy, marginalize
from metamoe.unify.experiment import DigitsConfig, run_digits_experiment

TINY = DigitsConfig(
    n_private=24,
    n_test=12,
    public_per_domain=16,
    embed_dim=16,
    depth=1,
    seed_epochs=2,
    k=10,
    relevance_epochs=1,
    lora_rank=2,
    expert_epochs=1,
    expert_batch_size=16,
    router_epochs=1,
    router_batch_size=16,
    num_threads=1,
)


def test_method_names_are_exactly_the_papers():
    assert METHOD_NAMES == (
        "metamoe",
        "flexolmo",
        "random_proxy",
        "model_soup",
        "btm",
        "btx_oracle",
        "no_alignment",
        "no_context",
    )
    assert [m for m in METHOD_NAMES if method_spec(m).breaks_privacy] == ["btx_oracle"]
    assert method_spec("btx_oracle").router_data == "private"
    assert method_spec("btx_oracle").to_dict()["privacy"] == PRIVACY_NOTE
    assert "BREAKS PRIVACY" in PRIVACY_NOTE
    assert method_spec("metamoe").selection == "dpp" and method_spec("metamoe").context_routing
    assert method_spec("flexolmo").selection == "top_relevance" and not method_spec("flexolmo").context_routing
    assert method_spec("random_proxy").selection == "random"
    assert not method_spec("no_alignment").aligned and not method_spec("no_context").context_routing
    # experts shared where methods agree on the proxies and the alignment
    shared = {m for m in METHOD_NAMES if expert_set_key(method_spec(m)) == "dpp"}
    assert shared == {"metamoe", "model_soup", "btm", "btx_oracle", "no_context"}
    assert len({expert_set_key(method_spec(m)) for m in METHOD_NAMES}) == 4


def test_selections_use_the_selection_vocabulary():
    from metamoe.selection.methods import SELECTION_METHODS

    assert all(method_spec(m).selection in SELECTION_METHODS for m in METHOD_NAMES)
    assert expert_set_key(method_spec("flexolmo")) == "top_relevance"
    assert expert_set_key(method_spec("no_alignment")) == "dpp_unaligned"


def test_method_name_errors():
    with pytest.raises(ValueError, match="unknown method 'moe'; known: metamoe"):
        method_spec("moe")
    with pytest.raises(ValueError, match="duplicates"):
        check_methods(["btm", "btm"])
    with pytest.raises(TypeError, match="list of method names"):
        check_methods("metamoe")
    with pytest.raises(ValueError, match="empty"):
        check_methods([])


def test_marginalize_and_accuracy_against_loops(rng):
    p = rng.random((7, 6))
    p /= p.sum(1, keepdims=True)
    targets = np.array([2, 0, 1, 0, 2, 2])
    m = marginalize(p, targets)
    ref = np.zeros((7, 3))
    for i in range(7):
        for c in range(6):
            ref[i, targets[c]] += p[i, c]
    np.testing.assert_allclose(m, ref, rtol=0, atol=1e-15)
    y = rng.integers(0, 3, 7)
    assert accuracy(p, y, targets) == pytest.approx(np.mean([ref[i].argmax() == y[i] for i in range(7)]))
    yc = rng.integers(0, 6, 7)
    yc[:3] = p[:3].argmax(1)
    assert exact_accuracy(p, yc) == pytest.approx(np.mean(p.argmax(1) == yc))
    with pytest.raises(ValueError, match="class_targets"):
        marginalize(p, targets[:5])
    with pytest.raises(ValueError, match="y must be"):
        accuracy(p, y[:3], targets)


def test_btm_ensemble_averages_expert_probabilities(tmp_path):
    """Reference: each expert's softmax placed into the unified space by name, averaged (float64)."""
    from metamoe.data.digits import make_digits_domains
    from metamoe.models import create_seed_model
    from metamoe.unify import train_expert, write_expert_package
    from metamoe.unify.server import validate_packages

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = make_digits_domains(seed=1, n_private=16, n_test=6, public_per_domain=8)
        seed = create_seed_model(
            "timm:vit_tiny_patch16_224",
            seed=0,
            img_size=8,
            patch_size=2,
            in_chans=1,
            embed_dim=16,
            depth=1,
            num_heads=2,
            num_classes=10,
        )
        paths = []
        for i, c in enumerate(d.clients[:2]):
            spaces = {
                "private": [f"{c.domain}:{j}" for j in range(10)],
                "public": [str(j) for j in range(10)],
            }
            prox = np.array([i, i + 5, i + 9])
            ex = train_expert(
                seed,
                (c.x_train, c.y_train),
                (d.public_x[prox], d.public_y[prox]),
                spaces,
                lora_rank=2,
                epochs=1,
                batch_size=8,
                seed=i,
            )
            paths.append(
                write_expert_package(
                    tmp_path / c.domain,
                    ex,
                    proxy_indices=prox,
                    public_pool_size=len(d.public_x),
                    method="dpp",
                )
            )
        pkgs = validate_packages(paths, seed_model=seed)
        ens = ExpertEnsemble(seed, pkgs)
        x = d.clients[2].x_test
        got = ens.predict_proba(x, batch_size=4)
        names = ens.label_space.names
        ref = np.zeros_like(got)
        for p, expert in zip(pkgs, ens.experts):
            with torch.no_grad():
                q = torch.softmax(expert(expert.prepare(torch.from_numpy(x))).double(), -1).numpy()
            own = p.label_space["private"] + p.label_space["public"]
            for j, nm in enumerate(own):
                ref[:, names.index(nm)] += q[:, j] / len(pkgs)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)  # float32 experts, other batch split
        np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-12)
    finally:
        torch.set_num_threads(n)


def test_every_method_gives_accuracies_in_unit_interval():
    r = run_digits_experiment(0, config=TINY, progress=False)
    assert tuple(r["methods"]) == METHOD_NAMES
    for name, m in r["methods"].items():
        assert set(m["per_domain"]) == {"upright", "rotated", "inverted"}, name
        for v in list(m["per_domain"].values()) + list(m["per_domain_exact"].values()):
            assert 0.0 <= v <= 1.0, name
        assert m["average"] == pytest.approx(np.mean(list(m["per_domain"].values())))
        # n_test = 12 samples per domain: every accuracy is a multiple of 1/12
        for v in m["per_domain"].values():
            assert abs(v * 12 - round(v * 12)) < 1e-9, name
        assert m["breaks_privacy"] == (name == "btx_oracle")
    assert r["methods"]["btx_oracle"]["privacy"] == PRIVACY_NOTE
    assert r["methods"]["btx_oracle"]["router"]["n_train"] == 3 * 24  # trained on the private sets
    assert r["methods"]["metamoe"]["router"]["n_train"] <= 3 * 10  # the union of the proxies
    assert r["methods"]["model_soup"]["router"] is None and r["methods"]["btm"]["router"] is None
    for name in ("metamoe", "random_proxy", "btx_oracle", "no_alignment"):
        assert len(r["methods"][name]["router"]["final_lambda"]) == 1  # depth 1: one context lambda
    for name in ("flexolmo", "no_context"):
        assert r["methods"][name]["router"]["final_lambda"] is None
