"""Communication layer: which Horovod collective carries which codec payload."""
