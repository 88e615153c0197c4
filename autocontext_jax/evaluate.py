"""`python -m autocontext_jax.evaluate`, kept as documented: the command is cli/evaluate.py."""

from autocontext_jax.cli.evaluate import run

if __name__ == "__main__":
    run()
