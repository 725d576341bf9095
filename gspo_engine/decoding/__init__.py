"""Generation's parts below rollout.py: keyed sampling, the slots' state and decode step, CUDA-graph replay."""
