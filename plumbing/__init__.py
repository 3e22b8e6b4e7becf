"""What the algorithm leans on and holds no part of: checkpoint files and resuming (`checkpoints`), running on N
processes (`distributed`), devices, precision and host memory (`devices`), the data side (`data`: data files,
prompts, chat templates, the RM's view of a trajectory, preference pairs) and LoRA (`lora`).

These modules import nothing of the project above them: `r2m.py` and `brme.py` import them, never the reverse."""
