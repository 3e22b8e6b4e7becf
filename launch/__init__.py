"""What the scripts share to launch a run: flags with presets and config files (`flags`), loading the models and
building the reward model for a reward mode, then the call into `r2m.train` (`runner`), experiment tracking
(`tracking`), the API judge's client (`api_client`), and the tiny offline models and data (`tiny`).

These modules build on `r2m.py`, `brme.py` and `plumbing/`; nothing there imports them."""
