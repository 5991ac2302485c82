"""Training: typed config (config.py), the loop (trainer.py), LR schedules, distributed setup, throughput bench."""
