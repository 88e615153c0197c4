"""`python -m autocontext_jax.compare`, kept as documented: the command is cli/compare.py."""

from autocontext_jax.cli.compare import run

if __name__ == "__main__":
    run()
