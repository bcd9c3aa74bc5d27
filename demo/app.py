"""The MSViT / DiT compute-knob demo: `python demo/app.py --model runs/msvit-digits` (or a Hub id).

On a Hugging Face Space (made by `hf_msvit.hub.push_demo_space`) the checkpoint comes from the HF_MSVIT_MODEL
variable. The app's logic lives in `hf_msvit.demo`.
"""

import sys

from hf_msvit.demo import main


if __name__ == "__main__":
    sys.exit(main())
