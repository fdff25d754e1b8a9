from dataclasses import dataclass, field

import pytest

from pipeline import config


@dataclass
class Inner:
    size: tuple[int, int]
    rate: float = 0.5


@dataclass
class Outer:
    name: str
    inner: Inner
    sizes: tuple[tuple[int, int], ...] = ()
    items: list[Inner] = field(default_factory=list)
    path: str | None = None
    flag: bool = False


def test_nested_dataclasses_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\ninner: {size: [2, 1]}\nitems: [{size: [4, 2], rate: 1}]\n")
    cfg = config.load(Outer, str(path), ["inner.rate=0.25", "sizes=[[8, 4], [16, 8]]", "flag=true"])
    assert cfg == Outer("a", Inner((2, 1), 0.25), ((8, 4), (16, 8)), [Inner((4, 2), 1.0)], None, True)
    assert config.from_dict(Outer, config.to_dict(cfg)) == cfg
    assert config.flatten(config.to_dict(cfg))["inner.size"] == "[2, 1]"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "a", "inner": {"size": [2, 1]}, "colour": 1}, "unknown config key.*colour"),
        ({"name": "a", "inner": {"size": [2, 1], "rat": 1}}, "inner.rat"),
        ({"name": "a"}, "missing required config key.*inner"),
        ({"name": "a", "inner": {"size": [2]}}, "inner.size: expected 2 values"),
        ({"name": "a", "inner": {"size": [2, 1], "rate": "fast"}}, "inner.rate: expected float"),
        ({"name": 3, "inner": {"size": [2, 1]}}, "name: expected str"),
        ({"name": "a", "inner": {"size": [2, 1]}, "flag": "yes"}, "flag: expected true or false"),
        ({"name": "a", "inner": {"size": [2, 1]}, "items": [{"size": [1, "x"]}]}, r"items\[0\].size\[1\]"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict(Outer, data)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="key.sub=value"):
        config.load(Outer, None, ["name"])
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(Outer, str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("path, source_frames", [
    ("configs/gta5_cityscapes.yaml", 24966),
    ("configs/synthia_cityscapes.yaml", 9400),
])
def test_reproduction_configs_follow_the_released_protocol(path, source_frames):
    """Reference §5 and the released run_task files: epochs of the source list at the
    released batch sizes; batch norm trained in source-only, FREEZEBN afterwards."""
    from pipeline.experiment import ExperimentConfig

    cfg = config.load(ExperimentConfig, path)

    def epochs(stage):
        return stage.iterations * stage.batch_size / source_frames

    assert (cfg.source_only.batch_size, cfg.source_only.lr, cfg.source_only.batchnorm) == (8, 1e-4, "train")
    assert epochs(cfg.source_only) == pytest.approx(8, rel=0.01)
    assert (cfg.adversarial.batch_size, cfg.adversarial.lr, cfg.adversarial.batchnorm) == (4, 2e-5, "frozen_affine")
    assert epochs(cfg.adversarial) == pytest.approx(4, rel=0.01)
    st = cfg.self_training
    assert (st.batch_size, st.batchnorm, st.gamma, st.beta) == (8, "frozen_affine", 8.0, 0.9)
    assert epochs(st) == pytest.approx(2, rel=0.01)
    assert [(r.alpha, r.lr) for r in st.rounds] == [(0.2, 3e-5), (0.25, 2.5e-5), (0.3, 2e-5)]
    assert (st.confident_weight, st.ignored_weight) == (0.1, 3.0)
