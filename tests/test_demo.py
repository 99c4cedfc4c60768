"""The README demo flow end to end at toy scale: pretraining with its probes and baselines, a Tune grid over both
finetune arms (LP-FT), each arm's winner scored once on the test split; the table prints only numbers from the run."""

import math

import pytest
from tiny import TINY

from arm_platform import demo, recipes


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """This process connected to a private 3-CPU head (a pretrain of 2 x 0.5 CPU; 1-worker trials, two side by side)."""
    from ray_cluster import connected_head

    with connected_head(3, tmp_path_factory.mktemp("ray") / "ray-start.log"):
        yield


def _plan() -> recipes.DemoPlan:
    """The short demo with every count shrunk: 256 train / 64 labelled / 64 held-out / 256 test images."""
    short = recipes.DEMO["short"]
    quiet = {"tracking.system_metrics": False}
    return recipes.DemoPlan(
        pretrain=short.pretrain | quiet | {"optim.batch_size": 16},
        finetune=short.finetune | quiet | {"optim.batch_size": 16, "optim.epochs": 2, "eval_every_n_epochs": 1},
        lrs=(1e-3,),
    )


@pytest.mark.ray
@pytest.mark.slow
def test_demo_table_comes_from_one_run_with_its_baselines(tmp_path, ray_head):
    from arm_platform.data import fashion_mnist
    from arm_platform.data.manifest import read_manifest

    if fashion_mnist.find_root() is None:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    data = tmp_path / "fm"
    fashion_mnist.prepare(str(data), limit_per_split=256, few_labels=64)
    assert read_manifest(str(data)).counts == {"train": 256, "val": 256, "labelled": 64, "heldout": 64}
    demo.ensure_dataset(str(data))  # has the few-label splits: nothing rewritten
    overrides = [*TINY, f"data.data_path={data}", f"--output_dir={tmp_path / 'runs'}"]

    scores = demo.run(overrides, plan=_plan())

    assert (scores["pretrain_images"], scores["labels"], scores["test_images"]) == (256, 64, 256)
    assert scores["heldout"] == 64  # max_val_samples 500 > the 64 held-out images
    assert scores["pretrain_steps"] == 256 // (2 * 16)  # one epoch, 2 workers x 16
    accuracies = ["probe_pretrained", "probe_random_init", "probe_pixels", "knn_pretrained", "knn_random_init"]
    accuracies += ["finetune_pretrained", "finetune_scratch", "finetune_pretrained_heldout", "finetune_scratch_heldout"]
    for key in accuracies:
        assert 0.0 <= scores[key] <= 100.0, key
    # the per-(position, value) variance of norm-pix targets: positive, and at most 1 (each patch has unit variance)
    assert 0.0 < scores["loss_constant_baseline"] <= 1.0 and math.isfinite(scores["pretrain_val_loss"])
    for arm in ("finetune_pretrained", "finetune_scratch"):
        assert scores[f"{arm}_lr"] == 1e-3 and scores[f"{arm}_weights"] in ("raw", "ema")
        assert scores[f"{arm}_steps"] in (4, 8)  # the best epoch's checkpoint: 2 passes of 64 images per epoch / 32
    text = demo.table(scores)
    assert "256 test images" in text and "64 labels" in text
    assert f"{scores['finetune_pretrained']:5.1f}" in text and f"{scores['probe_random_init']:5.1f}" in text
    assert "n/a" not in text


def test_demo_trials_keep_the_global_batch_and_run_two_at_once_on_two_cores():
    from arm_platform import sweep

    for plan in recipes.DEMO.values():
        _, ft_cfg = demo.configs(plan)
        trial = demo.per_trial(ft_cfg, plan.trial_workers)
        assert (trial.cluster.num_workers, trial.optim.batch_size) == (1, 128)  # recipe: 2 workers x 64
        assert trial.optim.accum_iter == ft_cfg.optim.accum_iter and trial.optim.lr == ft_cfg.optim.lr
        need, held = sweep.trial_resources(trial), sweep.trial_holdings(trial)
        assert sweep.max_concurrent_trials(need, {"CPU": 2.0}, held) == 2
        assert (
            sweep.max_concurrent_trials(sweep.trial_resources(ft_cfg), {"CPU": 2.0}, sweep.trial_holdings(ft_cfg)) == 1
        )
    with pytest.raises(ValueError, match="global batch 128 does not split over 3 trial workers"):
        demo.per_trial(ft_cfg, 3)
