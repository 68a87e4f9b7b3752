"""Every test runs offline: no hub, no data set or metric downloads (set before any test module imports the
libraries, which read some of these at import time)."""

import os

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"
