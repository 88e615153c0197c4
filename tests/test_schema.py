"""The config schema: every field declared once, and everything derived from it."""

import re

import ml_collections
import pytest
from conftest import REPO, load_config

from autocontext_jax.config import schema
from autocontext_jax.config.schema import ConfigError, validate_config
from autocontext_jax.runtime import checkpointing

PACKAGE = REPO / "autocontext_jax"


@pytest.mark.parametrize(
    "name", ["default", "paper", "totalseg_example", "ablation_base_cpu", "ablation_depth_cpu"]
)
def test_every_shipped_config_is_valid(name):
    validate_config(load_config(name), 1)


def test_the_depth_ablation_is_valid_at_every_depth_mode_and_fold_it_runs():
    for levels in (1, 2, 3):
        for mode in ("end_to_end", "none"):
            for fold in range(load_config("ablation_depth_cpu").data.num_folds):
                config = load_config("ablation_depth_cpu")
                config.pyramid.levels, config.pyramid.mode, config.data.fold = levels, mode, fold
                validate_config(config, 1)


def test_the_default_config_is_the_schemas_defaults():
    assert load_config("default").to_dict() == schema.default_config().to_dict()


def test_a_field_added_to_a_config_without_the_schema_is_refused():
    config = load_config("default")
    config.model.dropout_rate = 0.1
    with pytest.raises(ConfigError, match=r"config\.model\.dropout_rate: not a field"):
        validate_config(config, 1)
    config = load_config("default")
    config.model.widht = 8  # a typo is named with the field it resembles
    with pytest.raises(ConfigError, match=r"config\.model\.widht: .*did you mean model\.width"):
        validate_config(config, 1)
    config = load_config("default")
    config.inference = ml_collections.ConfigDict({"tile_size": 64})
    with pytest.raises(ConfigError, match=r"config\.inference: not a field"):
        validate_config(config, 1)


def test_a_config_missing_a_field_is_refused_naming_it():
    config = load_config("default")
    del config.train["ema_decay"]
    with pytest.raises(ConfigError, match=r"config\.train\.ema_decay: missing"):
        validate_config(config, 1)


def test_a_value_of_the_wrong_type_is_refused():
    # A config file that builds its ConfigDict itself can hold any type.
    values = load_config("default").to_dict()
    values["model"]["width"] = "8"
    config = ml_collections.ConfigDict(values)
    with pytest.raises(ConfigError, match=r"config\.model\.width='8': must be of type int"):
        validate_config(config, 1)


@pytest.mark.parametrize(
    ("field", "value", "devices"),
    [
        ("data.crop_size", 12, 1),
        ("pyramid.levels", 0, 1),
        ("pyramid.levels", 5, 1),
        ("pyramid.mode", "sideways", 1),
        ("train.batch_size", 3, 2),
        ("loss.name", "focal", 1),
        ("model.compute_dtype", "float16", 1),
        ("train.learning_rate", float("inf"), 1),
        ("train.learning_rate", float("nan"), 1),
        ("train.final_lr_fraction", -1.0, 1),
        ("train.final_lr_fraction", 1.5, 1),
        ("data.intensity_clip", (1000.0, -1000.0), 1),
        ("augment.probability", 1.5, 1),
        ("augment.elastic_probability", -0.1, 1),
        ("augment.device", "gpu", 1),
        ("augment.scale", 1.0, 1),
        ("eval.nsd_tolerance_mm", -2.0, 1),
        ("eval.nsd_tolerance_mm", 0.0, 1),
        ("eval.every", -1, 1),
        ("eval.num_cases", 0, 1),
        ("data.fold", 5, 1),  # num_folds is 5: folds 0 to 4
        ("data.fold", -2, 1),
        ("data.num_folds", 1, 1),
    ],
)
def test_bad_configs_are_refused_naming_the_field(tiny_config, field, value, devices):
    section, name = field.split(".")
    tiny_config.data.crop_size = 16
    tiny_config.model.num_poolings = 3
    setattr(tiny_config[section], name, value)
    with pytest.raises(ConfigError, match=rf"config\.{field}="):
        validate_config(tiny_config, devices)


def test_an_older_runs_config_gets_the_values_it_trained_with(tmp_path):
    saved = load_config("default").to_dict()
    for section, name in [
        ("eval", "nsd_tolerance_mm"),
        ("model", "conv_impl"),
        ("pyramid", "context_dropout"),
        ("pyramid", "level_steps"),
    ]:
        del saved[section][name]
    (tmp_path / "config.json").write_text(ml_collections.ConfigDict(saved).to_json())
    config = checkpointing.read_run_config(tmp_path)
    assert config.eval.nsd_tolerance_mm == 2.0 and config.model.conv_impl == "auto"
    assert config.pyramid.context_dropout == 0.0 and tuple(config.pyramid.level_steps) == ()
    validate_config(config, 1)

    migrated, added = schema.migrate(ml_collections.ConfigDict(saved))
    assert sorted(added) == sorted(
        [
            "eval.nsd_tolerance_mm",
            "model.conv_impl",
            "pyramid.context_dropout",
            "pyramid.level_steps",
        ]
    )
    # A field every run saved cannot be guessed: the run's config is refused, naming it.
    del saved["model"]["width"]
    (tmp_path / "config.json").write_text(ml_collections.ConfigDict(saved).to_json())
    with pytest.raises(checkpointing.CheckpointError, match=r"config\.model\.width: missing"):
        checkpointing.read_run_config(tmp_path)


def test_the_docs_table_is_the_schemas():
    page = (REPO / "docs" / "configuration.md").read_text()
    table = page.split("<!-- schema-table:start -->\n", 1)[1].split("<!-- schema-table:end -->")[0]
    assert table == schema.markdown_table(), (
        "docs/configuration.md's field table differs from the schema: run "
        "python scripts/write_config_table.py"
    )
    for spec in schema.FIELDS:
        assert f"| `{spec.name}` |" in table


def test_the_help_lists_every_field():
    listing = "\n".join(schema.help_lines())
    for spec in schema.FIELDS:
        assert f"  {spec.name} = " in listing


def test_no_allowed_values_are_written_outside_the_schema():
    # Each field's allowed values appear as a literal tuple only in config/schema.py.
    literals = {
        spec.name: "(" + ", ".join(f'"{c}"' for c in spec.choices) + ")"
        for spec in schema.FIELDS
        if len(spec.choices) > 1
    }
    for path in PACKAGE.rglob("*.py"):
        if path.name == "schema.py":
            continue
        text = re.sub(r"\s+", " ", path.read_text())
        for name, literal in literals.items():
            assert literal not in text, f"{path}: repeats the allowed values of {name}"
