import pytest

from pipeline import config
from pipeline.experiment import ExperimentConfig


def test_check_validates_every_stage_before_any_runs(tmp_path):
    # source-only (batch 8) would train 25k steps before the adversarial stage (batch 4) failed
    cfg = config.load(ExperimentConfig, "configs/gta5_cityscapes.yaml",
                      [f"output={tmp_path / 'out'}", "compute.num_workers=8"])
    with pytest.raises(ValueError, match="adversarial: batch_size 4 must be divisible by num_workers 8"):
        cfg.check()
    cfg = config.load(ExperimentConfig, "configs/gta5_cityscapes.yaml",
                      [f"output={tmp_path / 'out'}", "compute.num_workers=2", "self_training.iterations=0"])
    with pytest.raises(ValueError, match="round_1: iterations must be >= 1"):
        cfg.check()
    cfg = config.load(ExperimentConfig, "configs/gta5_cityscapes.yaml",
                      [f"output={tmp_path / 'out'}", "compute.num_workers=4", "oracle.iterations=10",
                       "oracle.batch_size=6"])
    with pytest.raises(ValueError, match="oracle: batch_size 6 must be divisible by num_workers 4"):
        cfg.check()
    cfg = config.load(ExperimentConfig, "configs/gta5_cityscapes.yaml",
                      [f"output={tmp_path / 'out'}", "source_only.iterations=0"])
    with pytest.raises(ValueError, match="no warm-up to start from"):
        cfg.check()
    assert not (tmp_path / "out").exists()


def test_rounds_can_train_the_backbone_at_their_own_lr_ratio(tmp_path):
    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml", [f"output={tmp_path / 'out'}"])
    assert cfg.model.backbone_lr_mult == 1.0 and cfg.self_training.backbone_lr_mult == 0.1
    assert cfg.warmup_config("source_only", None).backbone_lr_mult == 1.0
    assert cfg.warmup_config("oracle", None).backbone_lr_mult == 1.0
    assert cfg.round_train_config(1, "init.pt").backbone_lr_mult == 0.1
    unset = config.load(ExperimentConfig, "configs/benchmark.yaml",
                        [f"output={tmp_path / 'out'}", "self_training.backbone_lr_mult=null"])
    assert unset.round_train_config(1, "init.pt").backbone_lr_mult == 1.0  # the model's
    with pytest.raises(ValueError, match="self_training.backbone_lr_mult must be > 0"):
        config.load(ExperimentConfig, "configs/benchmark.yaml",
                    [f"output={tmp_path / 'out'}", "self_training.backbone_lr_mult=0"])


def test_a_held_out_source_split_is_optional_and_checked_when_given(tmp_path):
    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml",
                      [f"output={tmp_path / 'out'}", "data.source_val=null"])
    assert cfg.data.source_val is None
    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml",
                      [f"output={tmp_path / 'out'}", f"data.source_val.root={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cfg.data.source_val.samples()


REPRODUCTIONS = {"configs/gta5_cityscapes.yaml": (6234, 2800, 6000), "configs/synthia_cityscapes.yaml": (2350, 800, 2000)}


@pytest.mark.parametrize("path", sorted(REPRODUCTIONS))
def test_the_reproduction_configs_carry_the_released_protocol(path, tmp_path):
    steps, generator, init = REPRODUCTIONS[path]
    cfg = config.load(ExperimentConfig, path, [f"output={tmp_path / 'out'}"])
    assert cfg.protocol == "released"
    assert not cfg.final_eval.flip and cfg.final_eval.report_flip  # released: no flip; with flip reported apart
    assert cfg.chain.report == "best" and cfg.chain.adversarial_init == "best" and cfg.chain.round1_generator == "best"
    source_only, adversarial = cfg.warmup_config("source_only", None), cfg.warmup_config("adversarial", "/w.pt")
    assert (source_only.val_every, source_only.eval_size, source_only.cosine_period) == (500, (1024, 512), 1.0)
    assert (adversarial.val_every, adversarial.eval_size) == (400, (1280, 640))
    assert adversarial.discriminator_betas == (0.9, 0.999) and adversarial.discriminator_schedule == "cosine"
    rounds = [cfg.round_train_config(r, "/w.pt") for r in (1, 2, 3)]
    for train in rounds:
        assert (train.iterations, train.cosine_period, train.lr_floor_of) == (steps, 1.5, "head")
        assert (train.val_every, train.eval_size) == (400, (1536, 768))
    # round r's steps that label and start round r+1 are kept; the last round's are not needed
    assert [r.keep_steps for r in rounds] == [(generator, init), (generator, init), ()]
    assert source_only.keep_steps == adversarial.keep_steps == ()
    label = cfg.round_label_config(1, "/w.pt")
    assert (label.selector.instance_size, label.order, label.resize) == (2, "released_permutation", "lanczos")
    cfg.check_stages()
    cfg.check_chain()


def test_the_clean_protocol_chooses_nothing_on_the_target_val_set(tmp_path):
    cfg = config.load(ExperimentConfig, ["configs/gta5_cityscapes.yaml", "configs/protocols/clean.yaml"],
                      [f"output={tmp_path / 'out'}"])
    assert cfg.protocol == "clean"
    assert {getattr(cfg.chain, k) for k in ("adversarial_init", "round1_generator", "round1_init", "generator",
                                             "init", "report")} == {"last"}
    assert cfg.source_only.val_every == cfg.adversarial.val_every == cfg.self_training.val_every == 0
    assert [cfg.round_train_config(r, "/w.pt").keep_steps for r in (1, 2, 3)] == [(), (), ()]
    # what the overlay leaves alone stays released
    assert cfg.self_training.cosine_period == 1.5 and cfg.self_training.iterations == 6234
    assert not cfg.final_eval.flip and cfg.final_eval.report_flip


def test_a_chain_choice_that_no_stage_keeps_is_refused_before_any_work(tmp_path):
    base = ["configs/gta5_cityscapes.yaml"]
    cases = {
        "self_training.val_every=0": "round_2 generator takes 'best'",
        "adversarial.val_every=0": "adversarial keeps no best checkpoint; set adversarial.val_every",
        "chain.generator=7000": "round_1 runs 6234 steps only",
        "chain.init=0": "chain.init must be last, best or a step >= 1",
    }
    for override, message in cases.items():
        extra = ["chain.generator=best"] if override == "self_training.val_every=0" else []
        with pytest.raises(ValueError, match=message):
            config.load(ExperimentConfig, base, [f"output={tmp_path / 'out'}", override, *extra]).check_chain()
    given = config.load(ExperimentConfig, base, [f"output={tmp_path / 'out'}", "source_only.iterations=0",
                                                 "adversarial.iterations=0", "model.init=/w/m.pt"])
    with pytest.raises(ValueError, match="the warm-up is model.init, a single file"):
        given.check_chain()
