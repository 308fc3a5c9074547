"""ml_collections config scripts: `--config=configs/<phase>.py:<variant>` with `get_config(arg)`."""
