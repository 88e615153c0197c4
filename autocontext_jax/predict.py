"""`python -m autocontext_jax.predict`, kept as documented: the command is cli/predict.py."""

from autocontext_jax.cli.predict import run

if __name__ == "__main__":
    run()
