"""`python -m autocontext_jax.plot`, kept as documented: the command is cli/plot.py."""

from autocontext_jax.cli.plot import run

if __name__ == "__main__":
    run()
