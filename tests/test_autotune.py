"""`model.conv_impl=auto`: timed once per host and shapes, cached, and never for a named one."""

import json
from unittest import mock

import jax
import pytest
from conftest import load_config

from autocontext_jax.models import conv
from autocontext_jax.runtime import autotune

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="auto is timed on CPU only; elsewhere it is native"
)


class SpyMeasure:
    """A `measure` that records its calls and answers the given seconds at once."""

    def __init__(self, seconds=None):
        self.calls = []
        self.seconds = seconds or {impl: 1.0 for impl in conv.NAMED_CONV_IMPLS}
        self.seconds = {**self.seconds, "folded_ynnpack": 0.25}

    def __call__(self, candidates, layers, dtype):
        self.calls.append((tuple(candidates), tuple(layers), dtype))
        return {impl: self.seconds[impl] for impl in candidates}


@pytest.fixture
def auto_config(tiny_config):
    """The tiny config with the lowering left to `auto` (the tiny runs name one)."""
    tiny_config.model.conv_impl = "auto"
    return tiny_config


def _resolve(config, folder, measure, said=None):
    return autotune.resolve_lowering(
        config, folder, measure=measure, say=(said.append if said is not None else None)
    )


def test_the_choice_is_timed_once_then_read_from_the_cache(auto_config, tmp_path):
    measure = SpyMeasure()
    first = _resolve(auto_config, tmp_path, measure)
    assert len(measure.calls) == 1
    assert set(measure.calls[0][0]) == set(conv.NAMED_CONV_IMPLS)
    assert first.conv_impl == "folded_ynnpack" and first.how == "timed"
    cache = json.loads((tmp_path / autotune.CACHE_FILE).read_text())
    (entry,) = cache["choices"].values()
    assert entry["conv_impl"] == "folded_ynnpack" and entry["key"]["dtype"] == "float32"
    # A second start, with another measure that would choose otherwise: read, not timed.
    again = SpyMeasure({impl: 1.0 for impl in conv.NAMED_CONV_IMPLS} | {"native": 0.1})
    second = _resolve(auto_config, tmp_path, again)
    assert again.calls == []
    assert second.conv_impl == "folded_ynnpack" and second.how == "cached"
    assert second.seconds == first.seconds
    assert "read from" in second.describe() and "timed on this host" in first.describe()


@pytest.mark.parametrize("named", ["native", "folded", "depth_folded_ynnpack"])
def test_a_named_conv_impl_is_not_timed(auto_config, tmp_path, named):
    auto_config.model.conv_impl = named
    measure = SpyMeasure()
    lowering = _resolve(auto_config, tmp_path, measure)
    assert measure.calls == [] and not (tmp_path / autotune.CACHE_FILE).exists()
    assert (lowering.conv_impl, lowering.how) == (named, "named")
    assert lowering.describe().startswith(named)


def test_without_a_cache_folder_auto_is_the_untimed_default(auto_config):
    measure = SpyMeasure()
    lowering = _resolve(auto_config, "", measure)
    assert measure.calls == []
    assert (lowering.conv_impl, lowering.how) == ("depth_folded", "untimed")
    assert lowering.record() == {
        "conv_impl": "depth_folded",
        "conv_impl_how": "untimed",
        "conv_impl_seconds": {},
    }


@pytest.mark.parametrize(
    "damage",
    [
        "{not json",
        '{"choices": []}',
        '["a list"]',
    ],
)
def test_an_unreadable_cache_is_timed_again_and_rewritten_in_one_line(
    auto_config, tmp_path, damage
):
    (tmp_path / autotune.CACHE_FILE).write_text(damage)
    measure, said = SpyMeasure(), []
    lowering = _resolve(auto_config, tmp_path, measure, said)
    assert len(measure.calls) == 1 and lowering.how == "timed"
    # One line, that says what and that it is timed again.
    (line,) = said
    assert line.startswith(f"{tmp_path / autotune.CACHE_FILE}: unreadable (") and "\n" not in line
    assert "timing the convolution's lowerings again and rewriting it" in line
    # Rewritten: the next start reads it.
    assert _resolve(auto_config, tmp_path, measure).how == "cached"
    assert len(measure.calls) == 1


def test_a_damaged_entry_is_timed_again(auto_config, tmp_path):
    measure = SpyMeasure()
    _resolve(auto_config, tmp_path, measure)
    path = tmp_path / autotune.CACHE_FILE
    cache = json.loads(path.read_text())
    (entry,) = cache["choices"].values()
    entry["conv_impl"] = "winograd"
    path.write_text(json.dumps(cache))
    said = []
    assert _resolve(auto_config, tmp_path, measure, said).conv_impl == "folded_ynnpack"
    assert len(measure.calls) == 2
    assert said == [
        f"{tmp_path / autotune.CACHE_FILE}: its entry for these shapes on this host is "
        "unreadable; timing the convolution's lowerings again and rewriting it ..."
    ]


def test_an_unwritable_cache_says_so_and_keeps_the_timed_choice(auto_config, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    said = []
    lowering = _resolve(auto_config, blocked, SpyMeasure(), said)
    assert lowering.conv_impl == "folded_ynnpack"
    assert any("cannot keep the timing" in line for line in said)


def test_the_key_changes_with_the_shapes_and_dtype(auto_config, tmp_path):
    def key(config, devices=1):
        layers = autotune.probe_layers(config, devices)
        return autotune.key_id(autotune.cache_key(layers, config.model.compute_dtype))

    base = key(auto_config)
    assert key(auto_config) == base
    changed = []
    for field, value in [
        ("data.crop_size", 16),
        ("model.width", 4),
        ("train.batch_size", 4),
        ("model.compute_dtype", "bfloat16"),
    ]:
        other = auto_config.copy_and_resolve_references()
        section, name = field.split(".")
        other[section][name] = value
        changed.append(key(other))
    assert base not in changed and len(set(changed)) == len(changed)
    assert key(auto_config, devices=2) != base  # another batch per device
    # A deeper U-Net: the same timed layer (its finest level), the same key.
    deeper = auto_config.copy_and_resolve_references()
    deeper.model.num_poolings = 2
    assert key(deeper) == base
    # Another shape is timed on its own; the first choice stays in the file.
    measure = SpyMeasure()
    _resolve(auto_config, tmp_path, measure)
    bigger = auto_config.copy_and_resolve_references()
    bigger.data.crop_size = 16
    _resolve(bigger, tmp_path, measure)
    assert len(measure.calls) == 2
    assert len(json.loads((tmp_path / autotune.CACHE_FILE).read_text())["choices"]) == 2


def test_the_probe_is_one_convolution_per_level_at_the_run_shapes():
    # Batch 2 at 24^3, width 8: the U-Net's widest convolution at full size (its first
    # synthesis one, 2w + 4w -> 2w channels) holds most of the work; the coarser levels hold
    # less than COVERAGE and are not timed.
    assert autotune.probe_layers(load_config("default"), 1) == ((2, 24, 24, 24, 48, 16),)
    # The paper's batch of 3 64^3 crops at width 32 is cut to MIN_SLICES depth slices of one.
    paper = load_config("paper")
    assert autotune.probe_layers(paper, 1) == ((1, autotune.MIN_SLICES, 64, 64, 192, 64),)
    # Every level when all are needed to cover the work.
    with mock.patch.object(autotune, "COVERAGE", 1.0):
        layers = autotune.probe_layers(load_config("default"), 2)
    assert [layer[1:] for layer in layers] == [
        (24, 24, 24, 48, 16),
        (12, 12, 12, 96, 32),
        (6, 6, 6, 192, 64),
        (3, 3, 3, 64, 128),
    ]
    assert {layer[0] for layer in layers} == {1}  # the batch per device of two devices


def test_the_untimed_default_stays_unless_another_is_clearly_faster():
    # 1.92x faster in the probe: what one layer alone showed on the development CPU for a
    # lowering the train step found within a few per cent. Not enough to switch.
    seconds = {"depth_folded": 1.92, "folded": 1.0, "native": 4.0}
    assert autotune.choose(seconds, "depth_folded") == "depth_folded"
    seconds["native"] = 0.6  # the default over three times the fastest: switched
    assert autotune.choose(seconds, "depth_folded") == "native"
    # Without the default among the candidates, the fastest.
    assert autotune.choose({"native": 2.0, "folded": 1.0}, "depth_folded") == "folded"


def test_measuring_times_each_candidate_on_real_convolutions():
    layers = [(1, 4, 6, 6, 3, 2)]
    seconds = autotune.measure_candidates(("native", "depth_folded_ynnpack"), layers, "float32")
    assert set(seconds) == {"native", "depth_folded_ynnpack"}
    assert all(0 < value < 60 for value in seconds.values())
