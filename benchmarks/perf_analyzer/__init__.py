"""perf_analyzer against the served models: valid input data (make_inputs) and the sweep (run)."""
