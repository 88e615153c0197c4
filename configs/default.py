"""Default run: a two-level pyramid trained on the generated phantom, sized for a laptop CPU.

    python -m autocontext_jax.main --config configs/default.py --workdir runs/default

Every field is at its default, declared once with its meaning and allowed values in
autocontext_jax/config/schema.py (the table: docs/configuration.md). Variants load this
file and change a few fields (configs/paper.py); any field can be overridden on the command
line, e.g. `--config.pyramid.levels=3`.
"""

import ml_collections

from autocontext_jax.config.schema import default_config


def get_config() -> ml_collections.ConfigDict:
    """Return the default configuration: every field of the schema at its default."""
    return default_config()
