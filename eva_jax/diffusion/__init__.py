"""Flow-matching diffusion: schedules (shift, Wan/EVA timesteps), solvers (Euler, UniPC, DPM++),
EVA's dual guidance, the jitted I2V sampler, and the SDE step used by Flow-GRPO (sde.py)."""
