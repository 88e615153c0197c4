"""`python -m autocontext_jax.preprocess`, kept as documented: the command is cli/preprocess.py."""

from autocontext_jax.cli.preprocess import run

if __name__ == "__main__":
    run()
