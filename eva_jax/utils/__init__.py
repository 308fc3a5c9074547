"""Small utilities split by topic: run directories, metrics, progress bars, timing."""
