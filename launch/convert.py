"""Convert PyTorch weights to Flax/orbax once: see dynamicid_jax/convert.py for the flags.

    python launch/convert.py --base_model PATH --out DIR [--vision_encoder PATH] [--dynamicid PATH]
"""

import sys

from dynamicid_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
