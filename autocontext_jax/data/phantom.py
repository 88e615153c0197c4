"""Kept so the documented `python -m autocontext_jax.data.phantom` command keeps working.

The phantom generator lives in `autocontext_jax/phantom/`, its command in
`autocontext_jax/cli/phantom.py`.
"""

from autocontext_jax.cli.phantom import run

if __name__ == "__main__":
    run()
