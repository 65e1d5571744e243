"""The digits harness: results.json schema, the PNG chart, timings, options, determinism."""

import json
import math

import numpy as np
import pytest
import torch

from metamoe.unify.experiment import (
    CHART_FILE,
    RESULTS_FILE,
    DigitsConfig,
    config_domains,
    format_table,
    run_digits_experiment,
)

TINY = DigitsConfig(
    n_private=20,
    n_test=10,
    public_per_domain=12,
    embed_dim=16,
    depth=1,
    seed_epochs=1,
    k=8,
    relevance_epochs=1,
    lora_rank=2,
    expert_epochs=1,
    expert_batch_size=16,
    router_epochs=1,
    router_batch_size=16,
    num_threads=1,
)
METHODS = ["metamoe", "model_soup", "btm", "btx_oracle"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    lines = []
    r = run_digits_experiment(3, methods=METHODS, out_dir=out, progress=lines.append, config=TINY)
    return r, out, lines


def test_results_json_schema(run):
    r, out, _ = run
    on_disk = json.loads((out / RESULTS_FILE).read_text())
    assert on_disk == json.loads(json.dumps(r))  # what is returned is what is written
    assert list(on_disk["methods"]) == METHODS
    for m in on_disk["methods"].values():
        assert set(m["per_domain"]) == {"upright", "rotated", "inverted"}
        assert all(isinstance(v, float) and 0 <= v <= 1 for v in m["per_domain"].values())
        assert isinstance(m["average"], float)
        assert m["average"] == pytest.approx(sum(m["per_domain"].values()) / 3)
        assert isinstance(m["breaks_privacy"], bool) and isinstance(m["description"], str)
    for name in ("metamoe", "btx_oracle"):  # MoE methods: routing quality per client domain, a probability
        own = on_disk["methods"][name]["own_expert_weight"]
        assert set(own) == {"upright", "rotated", "inverted"} and all(0 < v < 1 for v in own.values())
    assert "own_expert_weight" not in on_disk["methods"]["model_soup"]
    assert on_disk["methods"]["btx_oracle"]["breaks_privacy"] is True
    # selection diagnostics: one ROC AUC per client domain; the share of own-domain proxies per selection
    assert set(on_disk["relevance_auc"]) == {"upright", "rotated", "inverted"}
    assert all(0 <= v <= 1 for v in on_disk["relevance_auc"].values())
    assert all(len(v) == 3 and all(0 <= x <= 1 for x in v) for v in on_disk["proxies_from_own_domain"].values())
    # default: the proxies supervise the routers (the routing loss towards each proxy's client runs every epoch)
    assert len(on_disk["methods"]["metamoe"]["router"]["route_loss_per_epoch"]) == TINY.router_epochs
    assert "BREAKS PRIVACY" in on_disk["methods"]["btx_oracle"]["privacy"]
    assert on_disk["seed"] == 3 and on_disk["domains"] == ["upright", "rotated", "inverted"]
    assert on_disk["config"] == TINY.to_dict()
    # by default the seed pre-trains on the split's own public pre-training set
    assert on_disk["sizes"]["seed_training_set"] == on_disk["sizes"]["pretrain"] == 3 * 40 + 5 * 300
    for stage, t in on_disk["timing"].items():
        assert t["wall_s"] >= 0 and t["cpu_s"] >= 0, stage
    assert {
        "data",
        "seed: build + pretrain on public data",
        "client: relevance",
        "client: select (dpp)",
        "client: train experts (dpp)",
        "server: metamoe",
        "eval: btm",
    } <= set(on_disk["timing"])
    assert "client: select (top_relevance)" not in on_disk["timing"]  # only what the requested methods need
    assert "client: select (random)" not in on_disk["timing"]
    assert on_disk["total_wall_s"] >= sum(t["wall_s"] for t in on_disk["timing"].values()) - 1e-6
    # routing fractions: per domain, per layer, a distribution over the experts
    for rows in on_disk["methods"]["metamoe"]["routing"].values():
        assert np.allclose(np.sum(rows, axis=1), 1.0, atol=1e-3)
    # packages are kept with an out_dir and hold no private sample: the manifests list public indices only
    pkgs = sorted((out / "packages" / "dpp").iterdir())
    assert [p.name for p in pkgs] == ["inverted", "rotated", "upright"]
    for p in pkgs:
        assert sorted(f.name for f in p.iterdir()) == [
            "head.safetensors",
            "lora.safetensors",
            "manifest.json",
            "prototypes.safetensors",
        ]


def test_chart_and_progress(run):
    r, out, lines = run
    png = (out / CHART_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert any("server: metamoe" in ln and "cpu" in ln for ln in lines)
    table = format_table(r)
    assert "btx_oracle" in table and "(breaks privacy)" in table and "average" in table


def test_same_seed_same_results_and_threads_restored(run):
    r, _, _ = run
    n = torch.get_num_threads()
    again = run_digits_experiment(3, methods=["metamoe"], progress=False, config=TINY)
    assert torch.get_num_threads() == n
    assert again["methods"]["metamoe"]["per_domain"] == r["methods"]["metamoe"]["per_domain"]
    assert (
        again["methods"]["metamoe"]["router"]["loss_per_epoch"]
        == r["methods"]["metamoe"]["router"]["loss_per_epoch"]
    )
    assert all(math.isfinite(v) for v in again["methods"]["metamoe"]["router"]["loss_per_epoch"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        run_digits_experiment(0, methods=["metamoe", "moe"], config=TINY, progress=False)
    with pytest.raises(ValueError, match="unknown config field"):
        run_digits_experiment(0, config=TINY, progress=False, kk=3)
    with pytest.raises(ValueError, match="seed"):
        run_digits_experiment(-1, config=TINY, progress=False)
    with pytest.raises(ValueError, match="num_threads"):
        run_digits_experiment(0, config=TINY, progress=False, num_threads=0)
    with pytest.raises(ValueError, match="router_loss"):
        run_digits_experiment(0, config=TINY, progress=False, router_loss="half")
    with pytest.raises(ValueError, match="route_loss"):
        run_digits_experiment(0, config=TINY, progress=False, route_loss=-1.0)
    with pytest.raises(ValueError, match="exceeds the public pool"):
        run_digits_experiment(0, methods=["btm"], config=TINY, progress=False, k=10_000)


def test_route_loss_reaches_every_trained_router():
    r = run_digits_experiment(4, methods=["metamoe", "btx_oracle", "model_soup"], progress=False, config=TINY,
                              route_loss=0.5)
    for name in ("metamoe", "btx_oracle"):  # proxies (by their owners) and the oracle's private data
        losses = r["methods"][name]["router"]["route_loss_per_epoch"]
        assert len(losses) == TINY.router_epochs and all(0 < v < 10 for v in losses)
    assert r["methods"]["model_soup"]["router"] is None
    off = run_digits_experiment(4, methods=["metamoe"], progress=False, config=TINY, route_loss=0.0)
    assert "route_loss_per_epoch" not in off["methods"]["metamoe"]["router"]  # task + load balancing only


def test_config_domains_pool_composition():
    """public_per_client_domain sets the client domains' share of the pool; distractor_domains its other part."""
    cfg = DigitsConfig(
        n_private=20,
        n_test=10,
        public_per_domain=30,
        public_per_client_domain=7,
        distractor_domains=("mirrored", "shifted"),
    )
    d = config_domains(5, cfg)
    assert d.domain_names == ["upright", "rotated", "inverted", "mirrored", "shifted"]
    counts = np.bincount(d.public_domain, minlength=5)
    np.testing.assert_array_equal(counts, [7, 7, 7, 30, 30])
    assert len(d.public_x) == len(d.public_y) == 3 * 7 + 2 * 30
    # each public image really is its domain's transform of some digit image, with that digit's label
    from metamoe.data.digits import TRANSFORMS, load_digit_images

    images, labels = load_digit_images()
    shifted = TRANSFORMS["shifted"](images)
    for i in np.flatnonzero(d.public_domain == 4)[:5]:
        hits = np.flatnonzero((shifted == d.public_x[i]).all(axis=(1, 2)))
        assert len(hits) and d.public_y[i] in labels[hits]
    default = config_domains(5)  # the harness's default pool: mostly out-of-domain, 15.5x a private set
    np.testing.assert_array_equal(np.bincount(default.public_domain), [120] * 3 + [300] * 5)
    assert len(default.public_x) == 1860 >= 10 * len(default.clients[0].x_train)
    np.testing.assert_array_equal(np.bincount(default.pretrain_domain), [40] * 3 + [300] * 5)
    assert len(default.pretrain_x) == len(default.pretrain_y) == 1620
    none = config_domains(5, DigitsConfig(pretrain_per_domain=0, pretrain_per_client_domain=0))
    assert none.pretrain_x is None  # no pre-training set: the whole rest of the source images is the pool's
    np.testing.assert_array_equal(np.bincount(none.public_domain), [120] * 3 + [300] * 5)
    with pytest.raises(ValueError, match="public_per_client_domain"):
        config_domains(5, DigitsConfig(public_per_client_domain=-1))
    with pytest.raises(ValueError, match="unknown domain"):
        config_domains(5, DigitsConfig(distractor_domains=("sideways",)))


def _source_indices(x, domain):
    """The digit images (indices into load_digit_images) that ``x`` (n, 8, 8) shows under ``domain``'s transform."""
    from metamoe.data.digits import TRANSFORMS, load_digit_images

    images, _ = load_digit_images()
    lookup = {TRANSFORMS[domain](images[i : i + 1])[0].tobytes(): i for i in range(len(images))}
    return np.array([lookup[np.ascontiguousarray(im).tobytes()] for im in x])


def _pool_sources(x, dom, names):
    return {int(i) for d, name in enumerate(names) for i in _source_indices(x[dom == d], name)}


def test_heldoutpool_keeps_every_set_on_its_own_source_images():
    """The default split: private sets, the shared test images, the selection pool and the seed's pre-training
    set come from pairwise disjoint source images (the pool never holds what the seed was trained on, no test
    digit is in any training set); the three clients' test sets are the same digits, each under its transform."""
    d = config_domains(7)
    private = [set(_source_indices(c.x_train, c.domain).tolist()) for c in d.clients]
    tests = [_source_indices(c.x_test, c.domain) for c in d.clients]
    assert all(len(t) == 300 for t in tests) and all(np.array_equal(tests[0], t) for t in tests)
    for c, t in zip(d.clients, tests):  # labels travel with their images
        from metamoe.data.digits import load_digit_images

        np.testing.assert_array_equal(c.y_test, load_digit_images()[1][t])
    pool = _pool_sources(d.public_x, d.public_domain, d.domain_names)
    pre = _pool_sources(d.pretrain_x, d.pretrain_domain, d.domain_names)
    sets = private + [set(tests[0].tolist()), pool, pre]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j], (i, j)
    assert len(pool) >= 300 and len(pre) >= 300 and all(len(p) == 120 for p in private)


def test_per_client_test_sets_without_sharing():
    d = config_domains(7, DigitsConfig(n_test=150, shared_test=False))
    tests = [set(_source_indices(c.x_test, c.domain).tolist()) for c in d.clients]
    assert all(len(t) == 150 for t in tests)
    assert not (tests[0] & tests[1]) and not (tests[0] & tests[2]) and not (tests[1] & tests[2])


def test_split_sizes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="pre-training set"):
        config_domains(0, DigitsConfig(pretrain_per_domain=700))
    with pytest.raises(ValueError, match="public pool"):
        config_domains(0, DigitsConfig(n_test=1400))
    with pytest.raises(ValueError, match="pretrain_per_client_domain"):
        config_domains(0, DigitsConfig(pretrain_per_client_domain=-3))
    with pytest.raises(ValueError, match="selection_features"):
        run_digits_experiment(0, config=TINY, progress=False, selection_features="pixels")


def test_seed_training_set():
    """seed_training_set(data) -> (x, y) replaces what pre-trains the seed; without it the split must hold a
    pre-training set."""
    no_pre = dict(pretrain_per_domain=0, pretrain_per_client_domain=0)
    with pytest.raises(ValueError, match="pass seed_training_set"):
        run_digits_experiment(0, methods=["btm"], config=TINY, progress=False, **no_pre)
    with pytest.raises(TypeError, match="callable"):
        run_digits_experiment(0, methods=["btm"], config=TINY, progress=False, seed_training_set=3)
    seen = []

    def distractors_only(data):
        seen.append(data)
        rows = np.flatnonzero(data.public_domain >= len(data.clients))
        return data.public_x[rows], data.public_y[rows]

    r = run_digits_experiment(
        0, methods=["btm"], config=TINY, progress=False, seed_training_set=distractors_only, **no_pre
    )
    assert len(seen) == 1 and seen[0].pretrain_x is None
    assert r["sizes"]["pretrain"] is None and r["sizes"]["public_pool"] == 3 * 120 + 5 * 12
    assert r["sizes"]["seed_training_set"] == 5 * 12
    assert len(r["seed_model"]["loss_per_epoch"]) == TINY.seed_epochs
