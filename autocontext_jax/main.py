"""`python -m autocontext_jax.main`, kept as documented: the command is cli/train.py."""

from autocontext_jax.cli.train import run

if __name__ == "__main__":
    run()
