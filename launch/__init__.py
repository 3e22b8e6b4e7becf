"""What the scripts share to launch a run: flags with presets and config files (`flags`), loading the models and
building the reward model for a reward mode, then the call into `r2m.train` (`runner`), experiment tracking
(`tracking`), the API judge's client (`api_client`), the tiny offline models and data (`tiny`), and model configs
from config files, whole or cut to a tiny size, for the memory plan and the GPU check (`configs`).

These modules build on `r2m.py`, `brme.py` and `plumbing/`; nothing there imports them."""
