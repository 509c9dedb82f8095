"""``python -m ddpm_jax.convert --src=FOLDER --workdir=DIR``: see ``diffusers.py``."""

import sys

from ddpm_jax.convert import diffusers

sys.exit(diffusers.main())
