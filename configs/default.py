"""Fields shared by every experiment, with the paper's CIFAR-10 values as defaults.

Each experiment file (cifar10.py, digits.py, ...) starts from ``get_config()``
here and changes what differs. The fields, their comments and defaults are in
the package: ``ddpm_jax/config_schema.py`` (so that an installed ddpm_jax can
check a config).
"""

from ddpm_jax.config_schema import get_config  # pylint: disable=unused-import
